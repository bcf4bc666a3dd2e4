"""The trainer's device rules (CUDA, ROCm, MPS, CPU; precision; 8-bit optimizers on macOS) with the platform's
facts injected, and their wiring into a real (tiny, CPU) training run."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from test_train_loop import assets, make_config, run  # noqa: F401 (the module-scoped fixture)

from kohya_backend.errors import TrainingError
from kohya_backend.train import precision as precision_module
from kohya_backend.train.device import (
    DEVICE_ENV,
    DeviceFacts,
    DevicePlan,
    detect_facts,
    device_label,
    optimizer_for_platform,
    plan_device,
)
from kohya_backend.train.events import EventLog, read_events
from kohya_backend.train.loop import Trainer
from kohya_backend.train.precision import Precision

CUDA = DeviceFacts(cuda=True)
ROCM = DeviceFacts(cuda=True, rocm=True)
MAC = DeviceFacts(cuda=False, mps=True, mps_bf16=True)
OLD_MAC = DeviceFacts(cuda=False, mps=True, mps_bf16=False)
CPU = DeviceFacts(cuda=False)


@pytest.mark.parametrize("facts", [CUDA, ROCM], ids=["cuda", "rocm"])
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_cuda_and_rocm_train_in_the_precision_asked_for(facts: DeviceFacts, precision: str) -> None:
    assert plan_device(precision, facts) == DevicePlan("cuda", precision, precision)


def test_rocm_is_cuda_to_torch_and_named_rocm_in_messages() -> None:
    assert device_label(plan_device("fp16", ROCM), ROCM) == "ROCm"
    assert device_label(plan_device("fp16", CUDA), CUDA) == "CUDA"
    assert (
        device_label(plan_device("no", MAC), MAC) == "MPS"
        and device_label(plan_device("no", CPU), CPU) == "CPU"
    )


def test_mps_trains_in_fp32_or_bf16_where_macos_supports_it_and_fp16_as_kohya_does() -> None:
    assert plan_device("no", MAC) == DevicePlan("mps", "no", "no")
    assert plan_device("bf16", MAC) == DevicePlan("mps", "bf16", "bf16")
    # fp16 passes to accelerate as in kohya: autocast with a grad scaler on MPS (torch >= 2.5)
    assert plan_device("fp16", MAC) == DevicePlan("mps", "fp16", "fp16")
    old = plan_device("bf16", OLD_MAC)
    assert (old.kind, old.mixed_precision, old.weight_dtype) == ("mps", "no", "no")
    assert len(old.notes) == 1 and "macOS 14" in old.notes[0] and "fp32" in old.notes[0]


def test_the_cpu_trains_in_fp32_with_bf16_autocast_and_never_fp16() -> None:
    assert plan_device("no", CPU) == DevicePlan("cpu", "no", "no")
    assert plan_device("bf16", CPU) == DevicePlan("cpu", "bf16", "no")  # autocast; frozen weights stay fp32
    fp16 = plan_device("fp16", CPU)
    assert (fp16.mixed_precision, fp16.weight_dtype) == ("no", "no") and "needs a GPU" in fp16.notes[0]


def test_the_best_device_is_taken_unless_the_runner_names_one() -> None:
    both = DeviceFacts(cuda=True, mps=True, mps_bf16=True)
    assert plan_device("no", both).kind == "cuda"
    assert (
        plan_device("no", DeviceFacts(cuda=False, mps=True, forced="cpu")).kind == "cpu"
    )  # a Mac's CPU slot
    assert plan_device("no", DeviceFacts(cuda=True, forced="cuda")).kind == "cuda"
    with pytest.raises(TrainingError, match="sees none") as err:
        plan_device(
            "fp16", DeviceFacts(cuda=False, forced="cuda")
        )  # a GPU job never trains on the CPU unseen
    assert "install a torch build" in (err.value.hint or "")
    with pytest.raises(TrainingError, match="not a device kind"):
        plan_device("no", DeviceFacts(cuda=False, forced="tpu"))


def test_detect_facts_asks_torch_and_reads_the_runners_choice() -> None:
    facts = detect_facts({DEVICE_ENV: " CPU "})
    assert facts.forced == "cpu" and facts.cuda == torch.cuda.is_available()
    assert facts.mps == torch.backends.mps.is_available()
    assert detect_facts({}).forced is None


def test_bitsandbytes_optimizers_are_skipped_on_macos_with_a_clear_message() -> None:
    assert optimizer_for_platform("AdamW8bit", "linux") == ("AdamW8bit", None)
    assert optimizer_for_platform("AdamW8bit", "win32") == ("AdamW8bit", None)
    assert optimizer_for_platform("AdamW", "darwin") == ("AdamW", None)
    name, why = optimizer_for_platform("adamw8bit", "darwin")
    assert name == "AdamW" and why is not None
    assert "bitsandbytes" in why and "macOS" in why and "AdamW" in why
    # every bitsandbytes-only optimizer kohya names falls back to its 32-bit counterpart, not only AdamW8bit
    assert optimizer_for_platform("Lion8bit", "darwin")[0] == "Lion"
    assert optimizer_for_platform("PagedAdamW8bit", "darwin")[0] == "AdamW"
    assert optimizer_for_platform("SGDNesterov8bit", "darwin")[0] == "SGDNesterov"
    assert optimizer_for_platform("Lion", "darwin") == ("Lion", None)


def test_on_macos_an_8bit_optimizer_trains_as_adamw_with_a_warning(
    assets,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    events = tmp_path / "events.jsonl"
    trainer, result = run(
        make_config(assets, tmp_path, max_train_steps=2, optimizer_type="AdamW8bit"), events
    )
    assert result.step == 2 and type(trainer.s.optimizer) is torch.optim.AdamW
    warnings = [e["message"] for e in read_events(events) if e["kind"] == "warning"]
    assert any("AdamW8bit needs bitsandbytes" in w for w in warnings)


def test_the_run_uses_the_device_plan_and_reports_its_notes(
    assets,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An old Mac asked for bf16: the plan says fp32 with a warning (the run itself is on this machine's CPU).
    monkeypatch.setattr(precision_module, "detect_facts", lambda: OLD_MAC)
    planned = Precision.for_run("bf16")
    assert planned.device.type == "mps" and planned.weight_dtype == torch.float32 and planned.label == "MPS"
    assert planned.autocast_dtype is None and planned.scaler is None
    events = tmp_path / "events.jsonl"
    config = make_config(assets, tmp_path, max_train_steps=1, mixed_precision="bf16")
    trainer = Trainer(
        config,
        events=EventLog(events, console=None),
        precision=dataclasses.replace(planned, device=torch.device("cpu")),
    )
    result = trainer.run()
    assert result.step == 1 and trainer.s.model.unet.dtype == torch.float32
    warnings = [e["message"] for e in read_events(events) if e["kind"] == "warning"]
    assert any("macOS 14" in w for w in warnings)
    start = next(e for e in read_events(events) if e["kind"] == "start")
    assert start["device_kind"] == "MPS"
