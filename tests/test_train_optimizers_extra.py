"""kohya's optimizers beyond the core six and lr_scheduler_type: class paths, schedule-free modes, bitsandbytes on
the CPU, D-Adaptation's learning-rate advice, custom scheduler classes."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from kohya_backend.config.optimizers import is_schedule_free, resolve_optimizer, resolve_scheduler
from kohya_backend.errors import ConfigError, OptimizerUnavailableError
from kohya_backend.train import optimizers_extra
from kohya_backend.train.optim import canonical_optimizer_name, create_optimizer
from kohya_backend.train.optimizers_extra import (
    ConstantForScheduleFree,
    create_class_scheduler,
    set_optimizer_mode,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int = 1) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [
        ("pytorch_optimizer.CAME", "pytorch_optimizer.optimizer.came.CAME"),
        ("came_pytorch.CAME", "came_pytorch.CAME.CAME"),
        ("torch.optim.RAdam", "torch.optim.radam.RAdam"),
        ("RAdam", "torch.optim.radam.RAdam"),
        ("pytorch_optimizer.Prodigy", "pytorch_optimizer.optimizer.prodigy.Prodigy"),
        ("dadaptation.DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
    ],
)
def test_class_paths_build_that_class_and_train(name: str, cls_name: str) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = create_optimizer(name, [{"params": list(model.parameters())}], lr=1e-3, optimizer_args={})
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls_name
    assert canonical_optimizer_name(name) == name
    for seed in range(3):
        _step(model, optimizer, seed)
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


def test_class_path_arguments_are_passed_and_checked() -> None:
    model = _model()
    groups = [{"params": list(model.parameters())}]
    optimizer = create_optimizer("came_pytorch.CAME", groups, lr=1e-3, optimizer_args={"weight_decay": 0.05})
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="does not take betaz"):
        create_optimizer("came_pytorch.CAME", groups, lr=1e-3, optimizer_args={"betaz": 1})


def test_refused_classes_name_the_allowed_packages() -> None:
    assert resolve_optimizer("subprocess.Popen")[0] is None
    with pytest.raises(ConfigError, match="imported only from") as info:
        create_optimizer(
            "subprocess.Popen", [{"params": list(_model().parameters())}], lr=1, optimizer_args={}
        )
    assert info.value.issues[0].key == "optimizer_type"
    with pytest.raises(ConfigError, match="is not a Optimizer class"):
        create_optimizer(
            "torch.optim.Optimizer2", [{"params": list(_model().parameters())}], lr=1, optimizer_args={}
        )
    assert resolve_scheduler("os.system")[0] is None


def test_sgd_nesterov_8bit_gets_kohyas_default_momentum() -> None:
    optimizer = create_optimizer(
        "SGDNesterov8bit", [{"params": list(_model().parameters())}], lr=0.1, optimizer_args={}
    )
    assert type(optimizer).__name__ == "SGD8bit"
    assert optimizer.param_groups[0]["betas"][0] == 0.9  # bitsandbytes keeps the momentum as betas[0]


def test_bitsandbytes_optimizers_that_fail_on_the_cpu_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimizers_extra, "bnb_cpu_problem", lambda name: f"{name} needs CUDA kernels")
    with pytest.raises(OptimizerUnavailableError, match="PagedAdamW8bit cannot run on CPU") as info:
        create_optimizer(
            "PagedAdamW8bit", [{"params": list(_model().parameters())}], lr=1e-3, optimizer_args={}
        )
    assert "CUDA" in str(info.value) and "AdamW" in (info.value.hint or "")


def test_d_adaptation_warns_about_a_small_learning_rate(caplog: pytest.LogCaptureFixture) -> None:
    groups = [{"params": list(_model().parameters())}]
    with caplog.at_level(logging.WARNING, logger=optimizers_extra.__name__):
        create_optimizer("DAdaptAdam", groups, lr=1e-4, optimizer_args={})
    assert "around 1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=optimizers_extra.__name__):
        create_optimizer("DAdaptAdam", groups, lr=1.0, optimizer_args={})
    assert caplog.text == ""


def test_schedule_free_trains_in_train_mode_and_saves_its_averaged_weights() -> None:
    assert is_schedule_free("AdamWScheduleFree") and is_schedule_free("prodigyplus.ProdigyPlusScheduleFree")
    assert not is_schedule_free("AdamW")
    model = _model()
    optimizer = create_optimizer(
        "AdamWScheduleFree", [{"params": list(model.parameters())}], lr=1e-2, optimizer_args={}
    )
    assert optimizer.param_groups[0]["train_mode"] is True  # built in train mode, as kohya does
    scheduler = ConstantForScheduleFree(optimizer)
    for seed in range(3):
        _step(model, optimizer, seed)
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-2]
    trained = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(optimizer, "AdamWScheduleFree", train=False)
    averaged = [p.detach().clone() for p in model.parameters()]
    assert optimizer.param_groups[0]["train_mode"] is False
    assert any(not torch.equal(a, b) for a, b in zip(trained, averaged))
    set_optimizer_mode(optimizer, "AdamWScheduleFree", train=True)
    for a, b in zip(trained, model.parameters()):
        torch.testing.assert_close(a, b.detach())
    # other optimizers are left alone
    plain = create_optimizer("AdamW", [{"params": list(_model().parameters())}], lr=1e-3, optimizer_args={})
    set_optimizer_mode(plain, "AdamW", train=False)


def test_scheduler_classes_follow_their_formula() -> None:
    optimizer = torch.optim.SGD(_model().parameters(), lr=1.0)
    scheduler = create_class_scheduler("CosineAnnealingLR", optimizer, {"T_max": 10}, warmup_steps=0)
    lrs = []
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([(1 + math.cos(math.pi * t / 10)) / 2 for t in range(1, 6)])
    path = create_class_scheduler(
        "torch.optim.lr_scheduler.StepLR", optimizer, {"step_size": 2}, warmup_steps=0
    )
    assert type(path).__name__ == "StepLR"


def test_scheduler_class_errors_name_the_key() -> None:
    optimizer = torch.optim.SGD(_model().parameters(), lr=1.0)
    with pytest.raises(ConfigError) as info:
        create_class_scheduler("CosineAnnealingLR", optimizer, {"T_max": 10}, warmup_steps=5)
    assert info.value.issues[0].key == "lr_warmup_steps"
    with pytest.raises(ConfigError) as info:
        create_class_scheduler("CosineAnnealingLR", optimizer, {"t_max": 10}, warmup_steps=0)
    assert info.value.issues[0].key == "lr_scheduler_args"
    with pytest.raises(ConfigError) as info:
        create_class_scheduler("NoSuchLR", optimizer, {}, warmup_steps=0)
    assert info.value.issues[0].key == "lr_scheduler_type"
