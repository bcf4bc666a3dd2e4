"""An interleaved A/B/C of an fp16 file's frozen weights on the CPU, in one process: kept fp16 (upcast per call),
upcast once to fp32, and stored bf16 under bf16 autocast. UNet forward + backward (the bench's resolution) and text
encoder forward + backward (77 tokens), the variants taking turns in a rotating order, so a noisy minute on a
shared machine falls on each alike; medians of process CPU and wall seconds, and per-round CPU ratios.

  python bench/frozen_ab.py --setting full [--rounds 6]    # full-size SD 1.5 at 256 px (~8 GB of memory)
  python bench/frozen_ab.py --setting mid [--rounds 10]

The trainer's own paths: models/load.py loads each variant, models/frozen.py routes its layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_bench import SETTINGS, checkpoint_path, prepare  # noqa: E402

VARIANTS = ("kept", "upcast", "bf16")


def _load(path: Path, family: str) -> dict[str, Any]:
    import torch

    from kohya_backend.models.frozen import route_frozen_layers
    from kohya_backend.models.load import load_checkpoint

    options = {
        "kept": {"keep_file_precision": True},
        "upcast": {"keep_file_precision": False},
        "bf16": {"keep_file_precision": True, "compute_dtype": torch.bfloat16},
    }
    models = {}
    for name in VARIANTS:
        model = load_checkpoint(path, family, **options[name])  # type: ignore[arg-type]
        model.vae = None  # type: ignore[assignment]  # not timed: free its memory
        for module in (model.unet, model.text_encoders[0]):
            route_frozen_layers(module)
        models[name] = model
    return models


def _steps(px: int) -> dict[str, Callable[[str, Any], None]]:
    """UNet and text-encoder forward + backward on fixed inputs (gradients flow to the inputs)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, px // 8, px // 8, generator=gen)
    hidden = torch.randn(1, 77, 768, generator=gen)
    ids = torch.randint(0, 49000, (1, 77), generator=gen)
    timestep = torch.tensor([500])

    @contextlib.contextmanager
    def precision(name: str) -> Iterator[None]:
        with torch.autocast("cpu", torch.bfloat16) if name == "bf16" else contextlib.nullcontext():
            yield

    def unet(name: str, model: Any) -> None:
        x, c = latents.clone().requires_grad_(), hidden.clone().requires_grad_()
        with precision(name):
            out = model.unet(x, timestep, encoder_hidden_states=c).sample
        out.float().square().mean().backward()

    def text(name: str, model: Any) -> None:
        te = model.text_encoders[0]
        embeddings = next(
            m for n, m in te.named_modules() if n.split(".")[-1] == "embeddings"
        )  # token + position embeddings: their output carries the gradient
        hook = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
        with precision(name):
            out = te(ids).last_hidden_state
        out.float().square().mean().backward()
        hook.remove()

    return {"unet": unet, "text_encoder": text}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=["mid", "full"], default="mid")
    parser.add_argument("--rounds", type=int, default=6, help="turns each variant takes, after one warm-up")
    parser.add_argument(
        "--cache", default=str(ROOT / "bench" / ".cache"), help="where models and data are kept"
    )
    args = parser.parse_args()
    import torch

    from kohya_backend.train.runtime import tune_allocator

    tune_allocator()
    cache = Path(args.cache)
    prepare(args.setting, cache, "fp16")  # writes the fp16 file once
    spec = SETTINGS[args.setting]
    models = _load(checkpoint_path(args.setting, "fp16", cache), str(spec["family"]))
    report: dict[str, Any] = {
        "setting": args.setting,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
    }
    for what, step in _steps(int(spec["px"])).items():  # type: ignore[call-overload]
        for name in VARIANTS:
            step(name, models[name])  # warm-up: allocator, oneDNN primitives, upcast buffers
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for round_ in range(max(1, args.rounds)):
            for name in VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]:
                cpu, wall = time.process_time(), time.perf_counter()
                step(name, models[name])
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
        part: dict[str, Any] = {}
        for name, pairs in times.items():
            part[f"{name}_cpu_s"] = round(statistics.median(c for c, _ in pairs), 3)
            part[f"{name}_wall_s"] = round(statistics.median(w for _, w in pairs), 3)
        for name in ("kept", "bf16"):
            ratios = [a[0] / b[0] for a, b in zip(times[name], times["upcast"])]
            part[f"{name}_to_upcast_cpu"] = {
                "median": round(statistics.median(ratios), 3),
                "range": [round(min(ratios), 3), round(max(ratios), 3)],
            }
        report[what] = part
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
