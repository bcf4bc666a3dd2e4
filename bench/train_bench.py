"""Training benchmark: seconds per step after warm-up, time to the first finished step, latent-caching time and
peak memory, for a checkpoint file stored in fp16 and in fp32, printed as JSON with kohya's figures beside ours.
The trainer runs as a child process exactly as a job would.

  python bench/train_bench.py --setting mid    # mid-size random SD1.5-shaped UNet (128/256/512), 256 px
  python bench/train_bench.py --setting full   # full-size SD1.5 architecture, random weights (the issue's setting)
  python bench/train_bench.py --setting sdxl   # full-size SDXL base, random weights, 1 step at 128 px
  --file-dtype fp16|fp32|both                  # how the checkpoint file stores its weights (default: both;
                                               # sdxl: fp16, the published file)
  --mixed-precision no|bf16                    # bf16: CPU autocast with bf16 frozen weights (CPUs with bf16 support)
  --frozen-weights auto|keep|upcast[,...]      # an fp16 file's frozen weights on the CPU: the trainer's choice after
                                               # the first step (auto), kept fp16, or upcast; several interleave
  --repeat N                                   # N runs of each file, interleaved; the median and each range

kohya sd-scripts (commit 48d368fa) at the same settings on the 2-core CPU machine class, from issue 13 (SD 1.5:
interleaved runs, quiet pairs) and the original SDXL measurement, are in KOHYA_REFERENCE; GOAL holds issue 13's
ratios to meet.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_DTYPES = {"fp16": "float16", "fp32": "float32"}
# (setting, file dtype) -> kohya's figures; s/step, first step and caching are medians of the ranges measured
KOHYA_REFERENCE: dict[tuple[str, str], dict[str, float]] = {
    ("full", "fp16"): {
        "s_per_step": 3.56,
        "s_to_first_step": 28.5,
        "s_caching_latents": 7.8,
        "peak_rss_gb": 6.41,
    },
    ("full", "fp32"): {"s_per_step": 3.44, "s_to_first_step": 24.0, "peak_rss_gb": 8.39},
    ("sdxl", "fp16"): {"s_total": 37.0, "peak_rss_gb": 18.3},
}
KOHYA_RANGES = {
    ("full", "fp16"): {
        "s_per_step": [3.46, 3.66],
        "s_to_first_step": [26.0, 31.0],
        "s_caching_latents": [7.2, 8.4],
    },
}
GOAL = {"s_per_step": 0.75, "s_to_first_step": 0.4, "peak_rss_gb": 0.6, "s_total": 0.6}
SETTINGS = {
    "mid": {"family": "sd_1_5", "size": "mid", "px": 256, "steps": 6, "file_dtypes": ("fp16", "fp32")},
    "full": {"family": "sd_1_5", "size": "full", "px": 256, "steps": 6, "file_dtypes": ("fp16", "fp32")},
    # SDXL base as published: fp16 weights, a 6.9 GB file
    "sdxl": {"family": "sd_xl", "size": "full", "px": 128, "steps": 1, "file_dtypes": ("fp16",)},
}


def checkpoint_path(setting: str, file_dtype: str, cache: Path) -> Path:
    """Where the setting's checkpoint in `file_dtype` lives (written once, by `prepare`)."""
    spec = SETTINGS[setting]
    suffix = "" if file_dtype == "fp32" else f"-{FILE_DTYPES[file_dtype]}"
    return cache / f"{spec['family']}-{spec['size']}{suffix}.safetensors"


def config_lines(setting: str, model: Path, data: Path, out: Path, mixed_precision: str) -> list[str]:
    """The bench's kohya-style config: batch 1, dim 8, text encoder trained, AdamW, cached latents."""
    spec = SETTINGS[setting]
    px = spec["px"]
    return [
        f'pretrained_model_name_or_path = "{model.as_posix()}"',
        f'train_data_dir = "{data.as_posix()}"',
        f'output_dir = "{out.as_posix()}"',
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
        f'mixed_precision = "{mixed_precision}"',
        'save_precision = "fp16"',
        "cache_latents = true",
        "seed = 42",
        "",
    ]


def prepare(setting: str, cache: Path, file_dtype: str = "fp32", mixed_precision: str = "no") -> Path:
    """Write (once) the checkpoint and the 8-image 512x512 dataset; write the config; return its path."""
    import torch

    from kohya_backend.assets.checkpoints import write_checkpoint
    from kohya_backend.assets.dataset import write_demo_dataset

    spec = SETTINGS[setting]
    cache.mkdir(parents=True, exist_ok=True)
    model = checkpoint_path(setting, file_dtype, cache)
    if not model.exists():
        dtype = getattr(torch, FILE_DTYPES[file_dtype])
        write_checkpoint(model, str(spec["family"]), size=str(spec["size"]), seed=0, dtype=dtype)
    data = cache / "data"
    if not (data / "10_demo").exists():
        write_demo_dataset(data, folder="10_demo", count=8, size=(512, 512))
    config = cache / f"{setting}-{file_dtype}-{mixed_precision}.toml"
    lines = config_lines(setting, model, data, cache / "out", mixed_precision)
    config.write_text("\n".join(lines), encoding="utf-8")
    return config


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads (Linux's /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _StepCpu(threading.Thread):
    """Follows the child's events file and notes its CPU seconds as each step event appears: on a shared machine
    CPU seconds move far less than wall seconds, and their ratio tells how many cores the run really had."""

    def __init__(self, pid: int, events: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.events = pid, events
        self.at_steps: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.wait(0.01):
            try:
                lines = self.events.read_text(encoding="utf-8").split("\n")[:-1]
            except OSError:
                continue
            for line in lines[seen:]:
                if '"kind": "step"' in line and (cpu := _cpu_seconds(self.pid)) is not None:
                    self.at_steps.append(cpu)
            seen = len(lines)


def measure(
    config: Path, events: Path, code: Path = ROOT, frozen_weights: str = "auto"
) -> dict[str, float | str | None]:
    """Run the trainer (of the checkout `code`) as a child and read the figures off its events and rusage;
    `frozen_weights` is its TRAIN_MANAGEMENT_FROZEN_WEIGHTS (models/upcast.py)."""
    events.unlink(missing_ok=True)
    # A fresh hash cache: the base model is hashed as on a first run (the trainer overlaps it with training).
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TRAIN_MANAGEMENT_HASH_CACHE": str(scratch / "sha256.json"),
        "TRAIN_MANAGEMENT_FROZEN_WEIGHTS": frozen_weights,
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
        watch = _StepCpu(proc.pid, events)
        watch.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max over every run
        total = time.time() - start
        watch.done.set()
        watch.join()
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
    weights = next((e for e in evs if e["kind"] == "weights"), {})
    intervals = [b - a for a, b in itertools.pairwise(steps)]
    cpu = watch.at_steps
    return {
        "s_per_step": round(sum(intervals[1:]) / len(intervals[1:]), 3) if len(intervals) > 1 else None,
        "s_to_first_step": round(steps[0] - start, 2) if steps else None,
        "s_caching_latents": round(caching[-1] - caching[0], 2) if len(caching) > 1 else None,
        "s_total": round(total, 2),
        "peak_rss_gb": round(peak_rss_gb, 2),
        "peak_cuda_gb": done.get("peak_cuda_gb"),
        "steps": len(steps),
        "cpu_s_per_step": round((cpu[-1] - cpu[1]) / (len(cpu) - 2), 3) if len(cpu) > 2 else None,
        "cpu_s_to_first_step": round(cpu[0], 2) if cpu else None,
        "cpu_s_total": round(usage.ru_utime + usage.ru_stime, 2),
        # what the trainer did with an fp16 file's kept weights after the first step (none for an fp32 file)
        "frozen_weights": weights.get("choice"),
    }


def summarise(runs: list[dict[str, float | str | None]]) -> dict[str, object]:
    """Median of each figure over the runs, plus its range when there are several (this shared VM varies ~20%);
    a text field (the frozen-weights choice) is listed per run."""
    out: dict[str, object] = {}
    ranges: dict[str, list[float]] = {}
    for key in runs[0]:
        if any(isinstance(r[key], str) for r in runs):
            out[key] = sorted({str(r[key]) for r in runs})
            continue
        values = [float(v) for r in runs if isinstance(v := r[key], (int, float))]
        out[key] = round(statistics.median(values), 3) if values else None
        if len(values) > 1:
            ranges[key] = [min(values), max(values)]
    if ranges:
        out["range"] = ranges
    return out


def compare(result: dict[str, object], setting: str, file_dtype: str) -> dict[str, object]:
    """kohya's figures for this setting and file, our ratio to each, and whether it meets issue 13's goal."""
    ref = KOHYA_REFERENCE.get((setting, file_dtype))
    if not ref:
        return {}
    ratios = {
        k: round(float(result[k]) / v, 2)  # type: ignore[arg-type]
        for k, v in ref.items()
        if isinstance(result.get(k), (int, float))
    }
    out: dict[str, object] = {"kohya_reference_cpu": ref, "ratio_to_kohya": ratios}
    if (setting, file_dtype) in KOHYA_RANGES:
        out["kohya_ranges"] = KOHYA_RANGES[(setting, file_dtype)]
    out["goal"] = {k: GOAL[k] for k in ratios if k in GOAL}
    out["goal_met"] = {k: ratios[k] <= GOAL[k] for k in ratios if k in GOAL}
    return out


def command(
    setting: str, file_dtype: str, mixed_precision: str, repeat: int, frozen_weights: str = "auto"
) -> str:
    """The command line that reproduces one result."""
    extra = "" if mixed_precision == "no" else f" --mixed-precision {mixed_precision}"
    extra += "" if frozen_weights == "auto" else f" --frozen-weights {frozen_weights}"
    return (
        f"python bench/train_bench.py --setting {setting} --file-dtype {file_dtype}{extra} --repeat {repeat}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mid")
    parser.add_argument("--file-dtype", choices=[*FILE_DTYPES, "both"], default=None)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument(
        "--frozen-weights",
        default="auto",
        help="auto, keep or upcast, or several separated by commas (their runs interleave): what the trainer does "
        "with an fp16 file's frozen weights after the first step (TRAIN_MANAGEMENT_FROZEN_WEIGHTS)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each file to take the median of")
    parser.add_argument(
        "--cache", default=str(ROOT / "bench" / ".cache"), help="where models and data are kept"
    )
    parser.add_argument(
        "--code",
        action="append",
        default=None,
        help="a checkout whose trainer runs (default: this one); given twice or more, their runs interleave "
        "(an A/B of two versions: e.g. `git archive main | tar -x -C /tmp/main`)",
    )
    args = parser.parse_args()
    codes = [Path(c).resolve() for c in args.code] if args.code else [ROOT]
    modes = [m.strip() for m in args.frozen_weights.split(",") if m.strip()]
    if not modes or any(m not in ("auto", "keep", "upcast") for m in modes):
        parser.error(
            f"--frozen-weights: auto, keep or upcast, separated by commas, not {args.frozen_weights!r}"
        )
    cache = Path(args.cache)
    if args.file_dtype in (None, "both"):
        dtypes = list(SETTINGS[args.setting]["file_dtypes"] if args.file_dtype is None else FILE_DTYPES)
    else:
        dtypes = [args.file_dtype]
    configs = {d: prepare(args.setting, cache, d, args.mixed_precision) for d in dtypes}
    import torch

    repeat = max(1, args.repeat)
    variants = [(c, d, m) for c in codes for d in dtypes for m in modes]
    runs: dict[tuple[Path, str, str], list[dict[str, float | str | None]]] = {v: [] for v in variants}
    for _ in range(repeat):  # interleaved, so a noisy minute on a shared machine falls on every variant alike
        for code, d, mode in variants:
            events = cache / f"{args.setting}-{d}-events.jsonl"
            runs[(code, d, mode)].append(measure(configs[d], events, code, mode))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for (code, d, mode), measured in runs.items():
        result: dict[str, object] = {
            "setting": args.setting,
            "file_dtype": d,
            "mixed_precision": args.mixed_precision,
            "command": command(args.setting, d, args.mixed_precision, repeat, mode),
            **({"code": str(code)} if len(codes) > 1 else {}),
            "device": device,
            "threads": torch.get_num_threads(),
            "runs": len(measured),
            **summarise(measured),
        }
        if device == "cpu" and args.mixed_precision == "no":
            result.update(compare(result, args.setting, d))
        results.append(result)
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
