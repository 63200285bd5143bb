"""Trainer: a run interrupted by a crash and resumed from ``last.pth`` ends bit-identical to an
uninterrupted one (mid-epoch and epoch-boundary checkpoints, with and without loader workers);
a NaN/inf loss stops training with TrainingDiverged and leaves the last checkpoint intact."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fpndet.config import load_config
from fpndet.engine import checkpoints as ckpt
from fpndet.engine.trainer import Trainer
from fpndet.errors import TrainingDiverged

TOTAL_STEPS = 6  # 16 images / batch 4 = 4 steps per epoch: the run ends half-way through epoch 1


def tiny_config(out_dir: Path, *overrides: str):
    """A CPU-sized experiment: 16 synthetic 128 px training images, ResNet-18 (random init),
    32-channel FPN/heads, multi-scale (the preprocessor draws the short side from Python's
    ``random``; the augmentation flips under torch's RNG), 6 SGD steps, cosine."""
    return load_config(None, [
        "data.train=shapes", "data.shapes_train_images=16", "data.shapes_val_images=8",
        "data.shapes_image_size=128", "data.num_workers=0",
        "model.backbone=resnet18", "model.fpn_channels=32", "model.retinanet.head_channels=32", "model.retinanet.head_depth=1",
        "model.min_size=[96,128]", "model.max_size=128", "model.anchor_sizes=[16,32,64,128,256]",
        "train.batch_size=4", f"train.output_dir={out_dir}", "train.log_every=1", "train.warmup_iters=2",
        "train.epochs=null", f"train.max_iters={TOTAL_STEPS}", "train.device=cpu",
        "train.eval_every_epochs=100", "eval.max_images=2", *overrides,
    ])


class SimulatedCrash(RuntimeError):
    pass


def train_with_crash(cfg, *, crash_after_steps: int) -> Trainer:
    """Train until ``crash_after_steps`` steps are done, crash, then resume in a new Trainer."""
    original_step = Trainer.train_step

    def crashing_step(self, images, targets):
        if self.progress.step == crash_after_steps:
            raise SimulatedCrash(f"simulated crash after {crash_after_steps} steps")
        return original_step(self, images, targets)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", crashing_step)
        with pytest.raises(SimulatedCrash):
            Trainer(cfg).fit()
    resumed = Trainer(cfg, resume=True)
    resumed.fit()
    return resumed


def train_records(out_dir: Path) -> dict[int, dict]:
    """The per-step training records of metrics.jsonl by step (a resumed run's last record of a
    step wins)."""
    records = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Trainer:
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = Trainer(tiny_config(out))
    trainer.fit()
    return trainer


def test_uninterrupted_run_trains_with_the_configured_schedule(uninterrupted):
    assert uninterrupted.steps_per_epoch == 4 and uninterrupted.total_steps == TOTAL_STEPS
    assert uninterrupted.lr == pytest.approx(0.01 * 4 / 16)  # linear scaling: 0.01 per 16 images
    records = train_records(uninterrupted.out)
    assert sorted(records) == list(range(1, TOTAL_STEPS + 1))
    # logged lr = the lr each step used: warm-up 0.001 -> 1 over 2 steps, then cosine to 0 at step 6
    peak = uninterrupted.lr
    expected = [0.001 * peak, 0.5005 * peak, peak, 0.5 * (1 + 0.5 ** 0.5) * peak, 0.5 * peak,
                0.5 * (1 - 0.5 ** 0.5) * peak]
    assert [records[s]["lr"] for s in range(1, 7)] == pytest.approx(expected, rel=1e-9)
    assert uninterrupted.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    state = ckpt.load_training_state(uninterrupted.out / "last.pth")
    assert state["step"] == TOTAL_STEPS
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(state["model_state"][name], tensor), name


@pytest.mark.parametrize(
    ("num_workers", "checkpoint_every", "crash_after", "resumed_from"),
    [
        (0, 2, 3, 2),  # checkpoint mid-epoch 0 (step 2), crash after step 3: step 3 is redone
        (0, 0, 5, 4),  # checkpoint at the end of epoch 0 (step 4), crash mid-epoch 1
        (2, 3, 3, 3),  # loader workers; crash right after the mid-epoch checkpoint
        (2, 0, 5, 4),
    ],
    ids=["mid-epoch", "epoch-boundary", "mid-epoch-2-workers", "epoch-boundary-2-workers"],
)
def test_resumed_run_ends_bit_identical_to_uninterrupted_run(
    uninterrupted, tmp_path, num_workers, checkpoint_every, crash_after, resumed_from, monkeypatch
):
    cfg = tiny_config(tmp_path, f"data.num_workers={num_workers}", f"train.checkpoint_every_iters={checkpoint_every}")
    seen_resume_steps = []
    original_resume = Trainer._resume

    def recording_resume(self):
        original_resume(self)
        seen_resume_steps.append(self.progress.step)

    monkeypatch.setattr(Trainer, "_resume", recording_resume)
    resumed = train_with_crash(cfg, crash_after_steps=crash_after)
    assert seen_resume_steps == [resumed_from]
    assert resumed.progress.step == TOTAL_STEPS

    reference_state = uninterrupted.model.state_dict()
    resumed_state = resumed.model.state_dict()
    assert reference_state.keys() == resumed_state.keys()
    for name, tensor in reference_state.items():
        assert torch.equal(resumed_state[name], tensor), f"{name} differs after resume"

    reference_opt, resumed_opt = uninterrupted.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert reference_opt["state"].keys() == resumed_opt["state"].keys() and len(reference_opt["state"]) > 10
    for index, param_state in reference_opt["state"].items():
        assert torch.equal(resumed_opt["state"][index]["momentum_buffer"], param_state["momentum_buffer"]), index
    assert resumed.scheduler.last_epoch == uninterrupted.scheduler.last_epoch == TOTAL_STEPS

    # the redone and the new steps logged the same losses and learning rates
    reference, logged = train_records(uninterrupted.out), train_records(tmp_path)
    for step in range(1, TOTAL_STEPS + 1):
        for key in ("loss", "loss_cls", "loss_box", "lr"):
            assert logged[step][key] == reference[step][key], (step, key)


def test_resume_without_checkpoint_names_the_missing_file(tmp_path):
    from fpndet.errors import InputError

    with pytest.raises(InputError, match="last.pth: no checkpoint to resume from"):
        Trainer(tiny_config(tmp_path), resume=True)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_training_and_keeps_last_checkpoint(tmp_path, bad_value):
    out = tmp_path / "run"
    cfg = tiny_config(out, "train.checkpoint_every_iters=2")
    trainer = Trainer(cfg)
    original_forward = trainer.model.criterion.forward
    calls = []

    def poisoned_forward(*args, **kwargs):
        losses = original_forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third training step
            shutil.copyfile(out / "last.pth", tmp_path / "before.pth")
            losses["loss_box"] = losses["loss_box"] * bad_value
        return losses

    trainer.model.criterion.forward = poisoned_forward
    with pytest.raises(TrainingDiverged) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "not finite at step 3 " in message
    assert "loss_box=" + ("nan" if bad_value != bad_value else "inf") in message
    assert str(out / "last.pth") in message
    assert len(calls) == 3

    assert (out / "last.pth").read_bytes() == (tmp_path / "before.pth").read_bytes()
    state = ckpt.load_training_state(out / "last.pth")
    assert state["step"] == 2
    # the diverged step changed nothing: the model is still the checkpointed one
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(state["model_state"][name], tensor), name
    assert sorted(train_records(out)) == [1, 2]
    resumed = Trainer(cfg, resume=True)
    assert resumed.progress.step == 2


def test_divergence_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run"))
    original_forward = trainer.model.criterion.forward
    trainer.model.criterion.forward = lambda *a, **k: {
        key: value * float("nan") for key, value in original_forward(*a, **k).items()
    }
    with pytest.raises(TrainingDiverged, match=r"at step 1 .*no checkpoint was written yet"):
        trainer.fit()


def test_multi_scale_training_feeds_the_network_several_sizes(tmp_path):
    """model.min_size with several values: the network sees images of each size during training
    (draws happen where the model resizes, so nothing resizes them back)."""
    cfg = tiny_config(tmp_path / "run", "model.min_size=[64,96,128]", "train.max_iters=8")
    trainer = Trainer(cfg)
    seen = []
    trainer.model.preprocessor.register_forward_hook(lambda module, args, batch: seen.append(
        (module.training, [h for h, _ in batch.image_sizes], tuple(batch.tensor.shape[-2:]))))
    trainer.fit()
    training = [(heights, padded) for is_training, heights, padded in seen if is_training]
    assert len(training) == 8
    assert {h for heights, _ in training for h in heights} == {64, 96, 128}  # the shapes images are 128 px squares
    assert len({padded for _, padded in training}) >= 2  # and the network's input size changes


def test_removed_scale_range_option_is_refused_with_its_replacement():
    from fpndet.errors import InputError

    with pytest.raises(InputError, match=r"model.min_size=\[640,672"):
        load_config(None, ["data.scale_range=[640,800]"])


def test_a_metrics_line_cut_by_a_kill_is_dropped_when_the_log_reopens(tmp_path):
    from fpndet.engine.trainer import MetricLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    logger = MetricLogger(tmp_path, enabled=True)
    logger.log({"step": 2, "loss": 1.5})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
