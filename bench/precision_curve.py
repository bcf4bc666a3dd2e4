"""fp32 against bf16 on the CPU: the loss at every step and the LoRA each trains, from the same seed.

  python bench/precision_curve.py --setting demo [--steps 40]   # the bundled tiny demo model, 64 px
  python bench/precision_curve.py --setting mid [--steps 30]    # bench/train_bench.py's mid setting (fp16 file)

Both runs happen in this process, one after the other, with the same seed, so each step draws the same timesteps
and noise: the curves differ only by bf16's rounding. Prints JSON: both curves, the largest difference between
them, the relative difference of the final LoRA weights, and each run's seconds per step (this process's, so use
bench/train_bench.py --mixed-precision bf16 for speed figures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_bench import prepare  # noqa: E402


def _config_text(setting: str, work: Path, cache: Path, steps: int) -> str:
    from kohya_backend.assets.demo import prepare_demo

    if setting == "demo":
        return prepare_demo(work / "demo", fm_type="sd_1_5", steps=steps).read_text(encoding="utf-8")
    text = prepare(setting, cache, "fp16", "no").read_text(encoding="utf-8")
    return "\n".join(
        f"max_train_steps = {steps}" if line.startswith("max_train_steps") else line
        for line in text.splitlines()
    )


def _train(text: str, mixed_precision: str, out: Path) -> dict[str, Any]:
    import torch

    from kohya_backend.config.parse import parse_config
    from kohya_backend.config.validate import validate_config
    from kohya_backend.lora.save import load_lora
    from kohya_backend.train.events import EventLog
    from kohya_backend.train.loop import train

    parsed = parse_config(text)
    parsed.values.update(mixed_precision=mixed_precision, output_dir=str(out), save_precision="float")
    config = validate_config(parsed, "sd_1_5")
    times: list[float] = []
    events = EventLog(None, console=None)
    events.subscribe(lambda e: times.append(e["t"]) if e["kind"] == "step" else None)
    result = train(config, events=events)
    assert result.output is not None
    weights, _ = load_lora(result.output)
    intervals = [b - a for a, b in itertools.pairwise(times)][1:]
    return {
        "losses": result.losses,
        "weights": {k: v.to(torch.float32) for k, v in weights.items()},
        "s_per_step": round(sum(intervals) / len(intervals), 3) if intervals else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=["demo", "mid"], default="demo")
    parser.add_argument("--steps", type=int, default=None, help="default: 40 (demo), 30 (mid)")
    parser.add_argument(
        "--cache", default=str(ROOT / "bench" / ".cache"), help="where models and data are kept"
    )
    args = parser.parse_args()
    steps = args.steps or (40 if args.setting == "demo" else 30)
    import torch

    with tempfile.TemporaryDirectory(prefix="precision-curve-") as tmp:
        work = Path(tmp)
        text = _config_text(args.setting, work, Path(args.cache), steps)
        fp32 = _train(text, "no", work / "fp32")
        bf16 = _train(text, "bf16", work / "bf16")
    pairs = list(zip(fp32["losses"], bf16["losses"]))
    num = sum(float((bf16["weights"][k] - w).square().sum()) for k, w in fp32["weights"].items())
    den = sum(float(w.square().sum()) for w in fp32["weights"].values())
    report = {
        "setting": args.setting,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "loss_fp32": [round(a, 5) for a, _ in pairs],
        "loss_bf16": [round(b, 5) for _, b in pairs],
        "max_abs_loss_difference": round(max(abs(a - b) for a, b in pairs), 5),
        "mean_loss_fp32": round(sum(a for a, _ in pairs) / len(pairs), 5),
        "mean_loss_bf16": round(sum(b for _, b in pairs) / len(pairs), 5),
        "lora_relative_difference": round((num / den) ** 0.5, 5) if den else None,
        "s_per_step_fp32": fp32["s_per_step"],
        "s_per_step_bf16": bf16["s_per_step"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
