"""Training benchmark: seconds per step after warm-up, time to the first finished step, latent-caching time and
peak memory, printed as JSON. The trainer runs as a child process exactly as a job would.

  python bench/train_bench.py --setting mid    # mid-size random SD1.5-shaped UNet (128/256/512), 256 px
  python bench/train_bench.py --setting full   # full-size SD1.5 architecture, random weights (issue setting b)
  python bench/train_bench.py --setting sdxl   # full-size SDXL base (fp16 file), random weights, 1 step at 128 px
  --repeat N                                   # the median of N runs, with each figure's range

Reference for setting full on the 2-core CPU machine class, kohya sd-scripts at the same settings: 3.7 s/step,
32 s to the first finished step (14 s of it caching latents), 6.7 GB peak RSS; SDXL: 37 s end to end, 18.3 GB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KOHYA_REFERENCE = {
    "full": {"s_per_step": 3.7, "s_to_first_step": 32.0, "s_caching_latents": 14.0, "peak_rss_gb": 6.7},
    "sdxl": {"s_total": 37.0, "peak_rss_gb": 18.3},
}
SETTINGS = {
    "mid": {"family": "sd_1_5", "size": "mid", "px": 256, "steps": 6, "dtype": "float32"},
    "full": {"family": "sd_1_5", "size": "full", "px": 256, "steps": 6, "dtype": "float32"},
    # SDXL base as published: fp16 weights, a 6.9 GB file (trained in fp32 all the same: mixed_precision "no")
    "sdxl": {"family": "sd_xl", "size": "full", "px": 128, "steps": 1, "dtype": "float16"},
}


def prepare(setting: str, cache: Path) -> Path:
    """Write (once) the checkpoint and the 8-image 512x512 dataset; write the config; return its path."""
    from kohya_backend.assets.checkpoints import write_checkpoint
    from kohya_backend.assets.dataset import write_demo_dataset

    spec = SETTINGS[setting]
    cache.mkdir(parents=True, exist_ok=True)
    import torch

    suffix = "" if spec["dtype"] == "float32" else f"-{spec['dtype']}"
    model = cache / f"{spec['family']}-{spec['size']}{suffix}.safetensors"
    if not model.exists():
        write_checkpoint(
            model, spec["family"], size=spec["size"], seed=0, dtype=getattr(torch, str(spec["dtype"]))
        )
    data = cache / "data"
    if not (data / "10_demo").exists():
        write_demo_dataset(data, folder="10_demo", count=8, size=(512, 512))
    px = spec["px"]
    config = cache / f"{setting}.toml"
    config.write_text(
        "\n".join(
            [
                f'pretrained_model_name_or_path = "{model.as_posix()}"',
                f'train_data_dir = "{data.as_posix()}"',
                f'output_dir = "{(cache / "out").as_posix()}"',
                f'output_name = "bench-{setting}"',
                'caption_extension = ".txt"',
                f'resolution = "{px},{px}"',
                "enable_bucket = false",
                "train_batch_size = 1",
                f"max_train_steps = {spec['steps']}",
                "network_dim = 8",
                "network_alpha = 8",
                'optimizer_type = "AdamW"',
                "learning_rate = 1e-4",
                'lr_scheduler = "constant"',
                'mixed_precision = "no"',
                'save_precision = "fp16"',
                "cache_latents = true",
                "seed = 42",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def measure(config: Path, events: Path) -> dict[str, float | None]:
    """Run the trainer as a child and read the figures off its events and rusage."""
    events.unlink(missing_ok=True)
    # A fresh hash cache: the base model is hashed as on a first run (the trainer overlaps it with training).
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TRAIN_MANAGEMENT_HASH_CACHE": str(scratch / "sha256.json"),
    }
    start = time.time()
    with (scratch / "stderr.txt").open("w+b") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kohya_backend",
                "train",
                "--config",
                str(config),
                "--events",
                str(events),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max over every run
        total = time.time() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{stderr[-4000:]}")
    peak_rss_gb = usage.ru_maxrss / 1024**2  # KiB on Linux
    evs = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    steps = [e["t"] for e in evs if e["kind"] == "step"]
    caching = [e["t"] for e in evs if e["kind"] == "caching" and e.get("what") == "latents"]
    done = next((e for e in evs if e["kind"] == "done"), {})
    intervals = [b - a for a, b in itertools.pairwise(steps)]
    return {
        "s_per_step": round(sum(intervals[1:]) / len(intervals[1:]), 3) if len(intervals) > 1 else None,
        "s_to_first_step": round(steps[0] - start, 2) if steps else None,
        "s_caching_latents": round(caching[-1] - caching[0], 2) if len(caching) > 1 else None,
        "s_total": round(total, 2),
        "peak_rss_gb": round(peak_rss_gb, 2),
        "peak_cuda_gb": done.get("peak_cuda_gb"),
        "steps": len(steps),
    }


def summarise(runs: list[dict[str, float | None]]) -> dict[str, object]:
    """Median of each figure over the runs, plus its range when there are several (this shared VM varies ~20%)."""
    out: dict[str, object] = {}
    ranges: dict[str, list[float]] = {}
    for key in runs[0]:
        values = [float(v) for r in runs if isinstance(v := r[key], (int, float))]
        out[key] = round(statistics.median(values), 3) if values else None
        if len(values) > 1:
            ranges[key] = [min(values), max(values)]
    if ranges:
        out["range"] = ranges
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mid")
    parser.add_argument("--repeat", type=int, default=1, help="runs to take the median of")
    parser.add_argument(
        "--cache", default=str(ROOT / "bench" / ".cache"), help="where models and data are kept"
    )
    args = parser.parse_args()
    cache = Path(args.cache)
    config = prepare(args.setting, cache)
    import torch

    runs = [measure(config, cache / f"{args.setting}-events.jsonl") for _ in range(max(1, args.repeat))]
    result: dict[str, object] = {
        "setting": args.setting,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "runs": len(runs),
        **summarise(runs),
    }
    ref = KOHYA_REFERENCE.get(args.setting)
    if ref and result["device"] == "cpu":
        result["kohya_reference_cpu"] = ref
        result["ratio_to_kohya"] = {
            k: round(float(result[k]) / v, 2)  # type: ignore[arg-type]
            for k, v in ref.items()
            if isinstance(result.get(k), (int, float))
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
