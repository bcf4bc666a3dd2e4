"""Optimizers by kohya's names make real steps; kohya's argument strings and LR schedules behave as kohya's."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError, OptimizerUnavailableError, TrainingError
from kohya_backend.train.optim import (
    LR_SCHEDULER_NAMES,
    OPTIMIZER_NAMES,
    build_optimizer,
    create_lr_scheduler,
    create_optimizer,
    current_lrs,
    steps_per_optimizer_step,
)
from kohya_backend.train.plan import format_with_plan

# Prodigy and relative-step Adafactor set their own step size; kohya's users give Prodigy lr 1.0
LEARNING_RATES = {
    "SGDNesterov": 0.1,
    **{n: 1.0 for n in OPTIMIZER_NAMES if n.startswith(("DAdapt", "Prodigy"))},
}
# RAdam's rectification makes no update in its first steps (schedule-free RAdam included)
STEPS = {"RAdamScheduleFree": 6}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64x128 = 8192 weights: above bitsandbytes' 4096 minimum, so AdamW8bit keeps 8-bit state
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))


def _groups(model: torch.nn.Module, lr_a: float | None = None, lr_b: float | None = None) -> list[dict]:
    first = {"params": list(model[0].parameters())}
    second = {"params": list(model[1].parameters())}
    if lr_a is not None:
        first["lr"] = lr_a
    if lr_b is not None:
        second["lr"] = lr_b
    return [first, second]


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object = None) -> None:
    """kohya's order: optimizer step, scheduler step, then zero_grad."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()  # type: ignore[attr-defined]
    optimizer.zero_grad()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_changes_parameters(name: str) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = create_optimizer(name, _groups(model), lr=LEARNING_RATES.get(name, 1e-3), optimizer_args={})
    scheduler = create_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=10)
    for _ in range(STEPS.get(name, 2)):
        _train_step(model, optimizer, scheduler)
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
    assert all(changed), f"{name} left some parameters unchanged"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lrs = current_lrs(optimizer, scheduler)
    assert lrs and all(v > 0 for v in lrs)


def test_adamw8bit_really_keeps_8bit_state_here() -> None:
    model = _model()
    optimizer = create_optimizer("adamw8bit", _groups(model), lr=1e-3, optimizer_args={"weight_decay": 0.0})
    assert type(optimizer).__name__ == "AdamW8bit"
    _train_step(model, optimizer)
    state = optimizer.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8


def test_adamw8bit_without_bitsandbytes_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "bitsandbytes", None
    )  # what an environment without the package looks like
    with pytest.raises(OptimizerUnavailableError, match="bitsandbytes") as info:
        create_optimizer("AdamW8bit", _groups(_model()), lr=1e-3, optimizer_args={})
    assert 'optimizer_type = "AdamW"' in str(info.value)


def test_optimizer_names_are_case_insensitive_and_unknown_ones_get_a_suggestion() -> None:
    assert type(create_optimizer("adamw", _groups(_model()), lr=1e-3, optimizer_args={})) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="did you mean AdamW") as info:
        create_optimizer("AdamX", _groups(_model()), lr=1e-3, optimizer_args={})
    assert info.value.issues[0].key == "optimizer_type"


def test_unknown_optimizer_argument_lists_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match="does not take wieght_decay") as info:
        create_optimizer("AdamW", _groups(_model()), lr=1e-3, optimizer_args={"wieght_decay": 0.1})
    assert "weight_decay" in str(info.value)
    with pytest.raises(ConfigError, match="lr cannot be set in optimizer_args"):
        create_optimizer("AdamW", _groups(_model()), lr=1e-3, optimizer_args={"lr": 0.1})
    with pytest.raises(ConfigError, match="rejected its settings"):
        create_optimizer("AdamW", _groups(_model()), lr=-1.0, optimizer_args={})


def test_no_trainable_parameters_is_an_error() -> None:
    with pytest.raises(TrainingError, match="no trainable parameters"):
        create_optimizer("AdamW", [{"params": []}], lr=1e-3, optimizer_args={})


def test_group_learning_rates_and_args_are_used_and_input_groups_untouched() -> None:
    model = _model()
    groups = _groups(model, lr_a=1e-4)
    optimizer = create_optimizer("AdamW", groups, lr=1e-3, optimizer_args={"weight_decay": 0.05})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-3]
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert "weight_decay" not in groups[0]


def test_sgd_nesterov_defaults_to_momentum_09() -> None:
    optimizer = create_optimizer("SGDNesterov", _groups(_model()), lr=0.1, optimizer_args={})
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["nesterov"] is True
    assert optimizer.param_groups[0]["momentum"] == 0.9
    custom = create_optimizer("SGDNesterov", _groups(_model()), lr=0.1, optimizer_args={"momentum": 0.5})
    assert custom.param_groups[0]["momentum"] == 0.5


def test_prodigy_reports_d_times_lr_and_trains_with_different_group_rates_as_kohya() -> None:
    model = _model()
    optimizer = create_optimizer("Prodigy", _groups(model), lr=1.0, optimizer_args={"d_coef": 2})
    scheduler = create_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=10)
    _train_step(model, optimizer, scheduler)
    d = optimizer.param_groups[0]["d"]
    assert current_lrs(optimizer, scheduler) == [pytest.approx(d * 1.0)] * 2
    mixed = create_optimizer("Prodigy", _groups(_model(), lr_a=1.0, lr_b=0.5), lr=1.0, optimizer_args={})
    assert [g["lr"] for g in mixed.param_groups] == [1.0, 0.5]


def test_adafactor_relative_step_uses_its_own_schedule() -> None:
    model = _model()
    optimizer = create_optimizer(
        "Adafactor", _groups(model, lr_a=1e-4, lr_b=1e-5), lr=1e-3, optimizer_args={}
    )
    assert optimizer.defaults["relative_step"] is True
    # kohya replaces any scheduler by Adafactor's own when relative_step is on
    scheduler = create_lr_scheduler("cosine", optimizer, warmup_steps=0, total_steps=10)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert current_lrs(optimizer, scheduler) == [pytest.approx(1e-3)] * 2
    _train_step(model, optimizer, scheduler)
    # Adafactor's relative step at step 1 with warmup_init off: min(1e-2, 1/sqrt(1)) scaled by the weights' RMS
    lrs = current_lrs(optimizer, scheduler)
    assert lrs and all(0 < v <= 1e-2 for v in lrs)
    assert lrs[0] != pytest.approx(1e-3)


def test_adafactor_with_fixed_lr_rejects_adafactor_schedule() -> None:
    model = _model()
    optimizer = create_optimizer(
        "Adafactor",
        _groups(model),
        lr=1e-3,
        optimizer_args={"relative_step": False, "scale_parameter": False},
    )
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]
    with pytest.raises(ConfigError, match="relative_step=True"):
        create_lr_scheduler("adafactor", optimizer, warmup_steps=0, total_steps=10)
    scheduler = create_lr_scheduler("constant_with_warmup", optimizer, warmup_steps=2, total_steps=10)
    assert current_lrs(optimizer, scheduler) == [0.0, 0.0]


def _lr_after(name: str, steps: int, **kwargs: object) -> float:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = create_lr_scheduler(name, optimizer, **kwargs)  # type: ignore[arg-type]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def test_schedules_follow_their_formulas() -> None:
    common = {"warmup_steps": 10, "total_steps": 110}
    assert _lr_after("constant", 50, warmup_steps=0, total_steps=110) == 1.0
    assert _lr_after("constant_with_warmup", 5, **common) == pytest.approx(0.5)
    assert _lr_after("constant_with_warmup", 60, **common) == pytest.approx(1.0)
    assert _lr_after("linear", 60, **common) == pytest.approx(0.5)
    assert _lr_after("cosine", 60, **common) == pytest.approx(0.5)
    # two restarts over 100 post-warmup steps: step 35 is a quarter into the second cycle
    assert _lr_after("cosine_with_restarts", 35, num_cycles=2, **common) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert _lr_after("cosine_with_restarts", 61, num_cycles=2, **common) == pytest.approx(1.0, abs=2e-3)
    lr_end = 1e-7
    assert _lr_after("polynomial", 60, power=2.0, **common) == pytest.approx((1 - lr_end) * 0.25 + lr_end)
    assert _lr_after("polynomial", 110, power=1.0, scheduler_args={"lr_end": 0.1}, **common) == pytest.approx(
        0.1
    )


def test_schedule_errors_name_the_key() -> None:
    optimizer = torch.optim.SGD(_model().parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="did you mean cosine") as info:
        create_lr_scheduler("cosin", optimizer, warmup_steps=0, total_steps=10)
    assert info.value.issues[0].key == "lr_scheduler"
    with pytest.raises(ConfigError, match="constant has no warmup") as info:
        create_lr_scheduler("constant", optimizer, warmup_steps=5, total_steps=10)
    assert info.value.issues[0].key == "lr_warmup_steps"
    with pytest.raises(ConfigError, match="rejected") as info:
        create_lr_scheduler("linear", optimizer, warmup_steps=0, total_steps=10, scheduler_args={"bogus": 1})
    assert info.value.issues[0].key == "lr_scheduler_args"
    with pytest.raises(ConfigError, match="only works with optimizer_type Adafactor"):
        create_lr_scheduler("adafactor", optimizer, warmup_steps=0, total_steps=10)
    assert set(LR_SCHEDULER_NAMES) >= {"constant", "cosine_with_restarts", "polynomial", "adafactor"}


def _format(config: str) -> dict:
    return format_with_plan(config, "sd_1_5", require_paths=False, cuda_available=False, check_optimizer=True)


def test_format_reports_what_the_optimizer_or_schedule_would_reject() -> None:
    """config format and training agree: settings the optimizer rejects are errors with their line."""
    ok = _format('optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99", "eps=1e-8"]\n')
    assert "betas=0.9,0.99" in ok["toml"]
    cases = {
        'optimizer_args = ["betas=0.9"]': "AdamW rejected its settings",
        "optimizer_args = [\"weight_decay='0.01'\"]": "AdamW rejected its settings",
        'optimizer_args = ["wieght_decay=0.01"]': "does not take wieght_decay",
        'optimizer_type = "SGDNesterov"\noptimizer_args = ["momentum=-1"]': "SGDNesterov rejected",
        'lr_scheduler = "cosine"\nlr_scheduler_args = ["bogus=1"]': "cosine rejected",
    }
    for text, fragment in cases.items():
        with pytest.raises(ConfigError) as info:
            _format(text)
        [issue] = info.value.issues
        assert fragment in issue.message, (text, issue)
        assert issue.line == text.count("\n") + 1 and issue.key in ("optimizer_args", "lr_scheduler_args")
    # the API and the tab import no torch: without check_optimizer the trainer reports it instead
    assert format_with_plan('optimizer_args = ["betas=0.9"]', "sd_1_5", require_paths=False)["toml"]


def test_build_optimizer_passes_parsed_args_and_scheduler_args() -> None:
    config = validate_config(
        {
            "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99", "eps=1e-8"],
            "lr_scheduler": "cosine_with_restarts",
            "lr_scheduler_num_cycles": 2,
            "learning_rate": 1.0,
        },
        "sd_1_5",
        require_paths=False,
    )
    optimizer, scheduler = build_optimizer(config, _groups(_model()), total_steps=8)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01 and group["eps"] == 1e-8
    lrs = _lrs(optimizer, scheduler, 8)
    assert lrs[0] == 1.0 and lrs[4] == 1.0 and lrs[3] < 0.5  # two cosine cycles of 4 steps: restart at step 4
    # lr_scheduler_args reach the schedule: a whole cosine period (num_cycles=1.0) rises again after mid-run
    plain = {"lr_scheduler": "cosine", "learning_rate": 1.0}
    half = validate_config(plain, "sd_1_5", require_paths=False)
    full = validate_config({**plain, "lr_scheduler_args": ["num_cycles=1.0"]}, "sd_1_5", require_paths=False)
    half_lrs = _lrs(*build_optimizer(half, _groups(_model()), total_steps=8), 8)
    full_lrs = _lrs(*build_optimizer(full, _groups(_model()), total_steps=8), 8)
    assert half_lrs[6] < 0.2 and full_lrs[6] == pytest.approx(0.5)


def _lrs(optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])  # type: ignore[attr-defined]
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
    return lrs


@pytest.mark.parametrize(
    ("scheduler", "warmup"), [("cosine", 10), ("linear", 0.2), ("cosine_with_restarts", 4), ("constant", 0)]
)
def test_data_parallel_schedules_advance_as_kohyas_under_accelerate(scheduler: str, warmup: float) -> None:
    """kohya builds the schedule over max_train_steps x N scheduler steps (a fractional warmup a share of those, a
    whole one as given) and accelerate steps it N times per optimizer step; ours reads the optimizer step times N
    and is stepped once, so the saved position is in optimizer steps, whatever the number of processes."""
    values = {"lr_scheduler": scheduler, "learning_rate": 1.0, "lr_warmup_steps": warmup}
    config = validate_config({**values, "lr_scheduler_num_cycles": 2}, "sd_1_5", require_paths=False)
    optimizer, schedule = build_optimizer(config, _groups(_model()), total_steps=50, num_processes=2)
    assert steps_per_optimizer_step(schedule, 2) == 1
    kohya_optimizer, kohya = build_optimizer(config, _groups(_model()), total_steps=100)  # 50 steps x 2
    ours, theirs = [], []
    for _ in range(50):
        ours.append(schedule.get_last_lr()[0])
        theirs.append(kohya.get_last_lr()[0])
        optimizer.step()
        schedule.step()
        kohya_optimizer.step()
        kohya.step()
        kohya.step()
    assert ours == pytest.approx(theirs)
    if isinstance(warmup, int) and warmup:
        assert ours[warmup // 2] == pytest.approx(1.0, abs=0.05)  # a whole warmup ends N times sooner
    # A state saved here resumes with 1 process at the same optimizer step: the position is not doubled.
    assert schedule.state_dict()["last_epoch"] == 50
    class_based = validate_config(
        {"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=4"], "learning_rate": 1.0},
        "sd_1_5",
        require_paths=False,
    )
    step_lr = build_optimizer(class_based, _groups(_model()), total_steps=50, num_processes=4)[1]
    assert steps_per_optimizer_step(step_lr, 4) == 4  # a class of its own: stepped once per process
    assert steps_per_optimizer_step(step_lr, 1) == 1
