"""Learning-rate schedule and optimiser (Focal Loss paper §4 "Optimization"): linear warm-up,
cosine to zero, ×0.1 steps at milestones, the linear scaling rule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fpndet.engine.schedule import build_optimizer, build_scheduler, lr_factor, milestones_from, scaled_lr


def test_scaled_lr_is_0_01_per_16_images():
    assert scaled_lr(0.01, 16, 16) == pytest.approx(0.01)
    assert scaled_lr(0.01, 16, 8) == pytest.approx(0.005)
    assert scaled_lr(0.01, 16, 4) == pytest.approx(0.0025)
    assert scaled_lr(0.02, 8, 64) == pytest.approx(0.16)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_warmup_is_linear_from_warmup_factor(schedule):
    kwargs = dict(total_steps=1000, warmup_steps=100, warmup_factor=0.001, schedule=schedule, milestones=[600, 800])
    assert lr_factor(0, **kwargs) == pytest.approx(0.001)
    assert lr_factor(50, **kwargs) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(25, **kwargs) == pytest.approx(0.001 + 0.999 * 0.25)
    assert lr_factor(100, **kwargs) == pytest.approx(1.0)
    # strictly increasing and linear: equal increments
    values = [lr_factor(s, **kwargs) for s in range(101)]
    increments = [b - a for a, b in zip(values, values[1:])]
    assert min(increments) == pytest.approx(max(increments)) == pytest.approx(0.999 / 100)


def test_cosine_decays_from_peak_to_zero():
    kwargs = dict(total_steps=1000, warmup_steps=100, warmup_factor=0.001, schedule="cosine")
    assert lr_factor(100, **kwargs) == pytest.approx(1.0)
    assert lr_factor(550, **kwargs) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(325, **kwargs) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1000, **kwargs) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(1500, **kwargs) == pytest.approx(0.0, abs=1e-15)  # stays at 0 past the end
    after_warmup = [lr_factor(s, **kwargs) for s in range(100, 1001)]
    assert all(b < a for a, b in zip(after_warmup, after_warmup[1:]))


def test_step_schedule_drops_tenfold_at_each_milestone():
    kwargs = dict(total_steps=900, warmup_steps=10, warmup_factor=0.001, schedule="step", milestones=[600, 800])
    assert lr_factor(599, **kwargs) == pytest.approx(1.0)
    assert lr_factor(600, **kwargs) == pytest.approx(0.1)
    assert lr_factor(799, **kwargs) == pytest.approx(0.1)
    assert lr_factor(800, **kwargs) == pytest.approx(0.01)
    assert lr_factor(899, **kwargs) == pytest.approx(0.01)
    assert lr_factor(600, **{**kwargs, "gamma": 0.5}) == pytest.approx(0.5)


def test_milestones_are_fractions_or_iterations():
    assert milestones_from([2 / 3, 8 / 9], 90_000) == [60_000, 80_000]  # the paper's 1x schedule
    assert milestones_from([60_000, 80_000], 90_000) == [60_000, 80_000]
    assert milestones_from([0.5, 700], 1000) == [500, 700]
    assert milestones_from([], 1000) == []


def test_unknown_schedule_and_optimizer_raise():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor(0, total_steps=10, warmup_steps=0, warmup_factor=1.0, schedule="linear")
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(nn.Linear(2, 2), name="adam", lr=0.1, momentum=0.9, weight_decay=0.0)


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    return model


def test_sgd_optimizer_settings():
    model = _model()
    sgd = build_optimizer(model, name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD)
    (group,) = sgd.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 1e-4)
    assert len(group["params"]) == 5 and all(p.requires_grad for p in group["params"])


def test_adamw_exempts_norm_and_bias_parameters_from_weight_decay():
    model = _model()
    adamw = build_optimizer(model, name="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_scheduler_drives_the_optimizer_lr(schedule):
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(model, name="sgd", lr=0.02, momentum=0.9, weight_decay=0.0)
    kwargs = dict(total_steps=20, warmup_steps=4, warmup_factor=0.1, schedule=schedule,
                  milestones=milestones_from([0.5, 0.75], 20), gamma=0.1)
    scheduler = build_scheduler(optimizer, **kwargs)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.02 * lr_factor(s, **kwargs) for s in range(20)], rel=1e-12)
    assert seen[0] == pytest.approx(0.002)
    if schedule == "cosine":
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    else:
        assert seen[9] == pytest.approx(0.02) and seen[10] == pytest.approx(0.002)
        assert seen[15] == pytest.approx(0.0002)

    # a scheduler rebuilt and loaded from state continues where the first one stopped
    fresh_optimizer = build_optimizer(nn.Linear(2, 1), name="sgd", lr=0.02, momentum=0.9, weight_decay=0.0)
    fresh = build_scheduler(fresh_optimizer, **kwargs)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.last_epoch == 20
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
