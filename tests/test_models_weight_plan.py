"""How a run stores its frozen weights: the plan per device and precision, the CPU's bf16 check, the log line."""

from __future__ import annotations

import torch
from torch import nn

from kohya_backend.models.weight_plan import WeightPlan, describe_weights, has_bf16_flags, plan_weights

_X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n\n"
_ARM = "processor\t: 0\nFeatures\t: fp asimd sve {extra}\nCPU implementer\t: 0x41\n"


def test_native_bf16_is_read_off_the_cpu_flags() -> None:
    assert has_bf16_flags(_X86.format(extra="avx512_vnni avx512_bf16"))
    assert has_bf16_flags(_X86.format(extra="amx_tile amx_bf16"))
    assert has_bf16_flags(_ARM.format(extra="i8mm bf16"))
    assert not has_bf16_flags(_X86.format(extra="avx512_vnni"))  # AVX-512 alone: oneDNN emulates bf16
    assert not has_bf16_flags(_ARM.format(extra="sve2"))
    assert not has_bf16_flags("model name\t: bf16 marketing name\n")  # only the flags/features line counts


def test_the_plan_keeps_file_precision_on_the_cpu_and_stores_bf16_for_bf16_autocast() -> None:
    assert plan_weights("cuda", torch.float16) == WeightPlan(keep_file_precision=False, compute_dtype=None)
    assert plan_weights("cuda:1", None) == WeightPlan(keep_file_precision=False, compute_dtype=None)
    assert plan_weights("cpu", None) == WeightPlan(keep_file_precision=True, compute_dtype=None)
    native = plan_weights(torch.device("cpu"), torch.bfloat16, native_bf16=True)
    assert native == WeightPlan(keep_file_precision=True, compute_dtype=torch.bfloat16)
    emulated = plan_weights("cpu", torch.bfloat16, native_bf16=False)
    assert emulated.compute_dtype == torch.bfloat16 and len(emulated.warnings) == 1
    assert "slower than fp32" in emulated.warnings[0] and 'mixed_precision = "no"' in emulated.warnings[0]


def test_the_log_line_gives_bytes_per_dtype_and_how_they_compute() -> None:
    kept = nn.Linear(1000, 1000).requires_grad_(False)
    kept.weight.data = kept.weight.data.half()  # 2.00 MB fp16 weight, 0.004 MB fp32 bias
    meta = nn.Linear(10, 10, device="meta")  # a dropped module (e.g. the VAE after caching) is not counted
    cpu = plan_weights("cpu", None)
    text = describe_weights([kept, meta], cpu, "cpu")
    assert text.startswith("frozen base-model weights on cpu: 0.00 GB float16, 0.00 GB float32")
    assert "kept as stored and upcast to fp32" in text
    full = nn.Linear(10, 10)
    assert "kept as stored" not in describe_weights([full], cpu, "cpu")
    bf16 = describe_weights([full], plan_weights("cpu", torch.bfloat16, native_bf16=True), "cpu")
    assert "stored in bf16 for bf16 autocast" in bf16 and "LoRA weights and optimizer in fp32" in bf16
    assert describe_weights([full], plan_weights("cuda", None), "cuda").endswith("0.00 GB float32")
