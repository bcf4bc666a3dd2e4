"""Where a training step's time goes: torch.profiler over one step of the bench's trainer, run in-process.

  python bench/profile_step.py --setting full --file-dtype fp16 [--mixed-precision bf16] [--step 3] [--top 20]
      [--frozen-weights auto|keep|upcast]   # an fp16 file's weights after the first step (models/upcast.py)

Prints, as JSON, the timeline before the first step (from the trainer's events), the step's wall time, and its
self CPU time per category (frozen-layer matmuls and convolutions, attention, weight casts and copies, norms,
element-wise ops, optimizer) and per operator. The settings and files are bench/train_bench.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_bench import FILE_DTYPES, SETTINGS, prepare  # noqa: E402

# first match wins; names are aten operators (self time, so a parent's time is not counted twice)
CATEGORIES = [
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention|baddbmm|bmm|softmax"),
    ("matmul", r"aten::(mm|addmm|matmul|linear|_mkl_linear|mkldnn_linear)\b|_linear_pointwise"),
    ("convolution", r"conv|slow_conv|im2col|col2im|_nnpack|unfold|fold"),
    ("casts and copies", r"aten::(copy_|_to_copy|to|clone|contiguous|cat|empty_like|_copy_from)\b"),
    ("norms", r"norm"),
    ("optimizer", r"adam|_foreach|_fused|lerp|addcdiv|addcmul|sqrt"),
    ("element-wise", r"aten::(add|add_|mul|mul_|sub|div|silu|gelu|sigmoid|neg|pow|rsub|fill_|zero_|where)"),
    ("memory", r"aten::(empty|empty_strided|resize_|as_strided|view|reshape|permute|transpose|t|expand)\b"),
]


def categorise(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other"


def run(
    setting: str, file_dtype: str, mixed_precision: str, step: int, top: int, cache: Path
) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kohya_backend.config.parse import parse_config
    from kohya_backend.config.validate import validate_config
    from kohya_backend.train.events import EventLog
    from kohya_backend.train.loop import train
    from kohya_backend.train.runtime import tune_allocator

    config_path = prepare(setting, cache, file_dtype, mixed_precision)
    parsed = parse_config(config_path.read_text(encoding="utf-8"))
    parsed.values["max_train_steps"] = step
    config = validate_config(parsed, str(SETTINGS[setting]["family"]))
    timeline: list[tuple[float, str]] = []
    prof = profile(activities=[ProfilerActivity.CPU])
    marks: dict[str, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        label = event["kind"] + (
            f" {event['what']} {event['done']}/{event['total']}" if "what" in event else ""
        )
        if event["kind"] == "log":
            label = f"log: {event.get('message', '')}"[:90]
        timeline.append((time.time(), label if event["kind"] != "step" else f"step {event['step']}"))
        if event["kind"] == "step" and event["step"] == step - 1:
            marks["start"] = time.perf_counter()
            prof.start()
        elif event["kind"] == "step" and event["step"] == step:
            prof.stop()
            marks["stop"] = time.perf_counter()

    tune_allocator()
    events = EventLog(None, console=None)
    events.subscribe(on_event)
    started = time.time()
    train(config, events=events)
    by_op: dict[str, float] = defaultdict(float)
    for avg in prof.key_averages():
        by_op[avg.key] += avg.self_cpu_time_total / 1e6
    by_cat: dict[str, float] = defaultdict(float)
    for name, seconds in by_op.items():
        by_cat[categorise(name)] += seconds
    total = sum(by_op.values())
    return {
        "setting": setting,
        "file_dtype": file_dtype,
        "mixed_precision": mixed_precision,
        "frozen_weights": os.environ.get("TRAIN_MANAGEMENT_FROZEN_WEIGHTS", "auto"),
        "threads": torch.get_num_threads(),
        "timeline_s": [
            [round(t - started, 2), label] for t, label in timeline if not label.startswith("step ")
        ]
        + [[round(t - started, 2), label] for t, label in timeline if label.startswith("step ")][:2],
        "profiled_step": step,
        "step_wall_s": round(marks["stop"] - marks["start"], 3),
        "self_cpu_s_by_category": {
            k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1]) if v >= 0.001
        },
        "self_cpu_s_total": round(total, 3),
        "top_ops": [[name, round(s, 3)] for name, s in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mid")
    parser.add_argument("--file-dtype", choices=sorted(FILE_DTYPES), default="fp16")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--frozen-weights", choices=["auto", "keep", "upcast"], default="auto")
    parser.add_argument(
        "--step", type=int, default=3, help="the step profiled (from the end of the one before)"
    )
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    parser.add_argument(
        "--cache", default=str(ROOT / "bench" / ".cache"), help="where models and data are kept"
    )
    args = parser.parse_args()
    if args.step < 2:
        parser.error("--step must be 2 or more: the profile runs from the end of the step before")
    os.environ["TRAIN_MANAGEMENT_FROZEN_WEIGHTS"] = args.frozen_weights
    result = run(args.setting, args.file_dtype, args.mixed_precision, args.step, args.top, Path(args.cache))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
