"""Training options of issue 10: batches grouped by aspect ratio, weight EMA (exact resume, EMA
weights evaluated and saved), early stopping (``train.patience``) and the validation loss logged
at every evaluation."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fpndet.engine import checkpoints as ckpt
from fpndet.engine.inference import run_inference
from fpndet.engine.sampling import ResumableSampler, aspect_ratio_groups
from fpndet.engine.trainer import Trainer, stale_evaluations_reason
from tests.engine.test_trainer import TOTAL_STEPS, tiny_config, train_with_crash


# ----------------------------------------------------------------------------- aspect-ratio groups
def batches(sampler: ResumableSampler, epoch: int, start_batch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start_batch)
    order = list(sampler)
    size = sampler.batch_size
    return [order[i : i + size] for i in range(0, len(order), size)]


GROUPS = [0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1]  # 23 items: 14 landscape, 9 portrait


def test_grouped_batches_hold_one_aspect_ratio_except_the_leftovers():
    sampler = ResumableSampler(num_items=len(GROUPS), batch_size=4, seed=5, groups=GROUPS)
    for epoch in range(4):
        found = batches(sampler, epoch)
        assert len(found) == 5 == sampler.batches_per_epoch()  # 23 // 4: the epoch length is unchanged
        items = [i for batch in found for i in batch]
        assert len(set(items)) == 20  # each item at most once
        mixed = [batch for batch in found if len({GROUPS[i] for i in batch}) > 1]
        assert len(mixed) <= 1  # two groups: at most one batch of leftovers


def test_without_groups_batches_mix_aspect_ratios():
    plain = ResumableSampler(num_items=len(GROUPS), batch_size=4, seed=5)
    mixed = [sum(len({GROUPS[i] for i in batch}) > 1 for batch in batches(plain, epoch)) for epoch in range(4)]
    assert sum(mixed) >= 8  # the option changes what it says: ungrouped batches are mostly mixed


def test_grouped_order_is_deterministic_and_resumable():
    def make():
        return ResumableSampler(num_items=len(GROUPS), batch_size=4, seed=5, groups=GROUPS)

    full = batches(make(), 2)
    assert batches(make(), 2) == full
    assert batches(make(), 2, start_batch=3) == full[3:]
    assert batches(make(), 3) != full


def test_grouped_ranks_share_the_epoch_without_overlap():
    groups = GROUPS[:22]  # an even count: no item wraps around to fill the second rank
    ranks = [ResumableSampler(num_items=22, batch_size=3, seed=1, rank=r, world_size=2, groups=groups)
             for r in range(2)]
    shares = [set(i for batch in batches(rank, 0) for i in batch) for rank in ranks]
    assert not shares[0] & shares[1]


def test_one_group_keeps_the_plain_order():
    grouped = ResumableSampler(num_items=12, batch_size=4, seed=2, groups=[0] * 12)
    assert batches(grouped, 1) == batches(ResumableSampler(num_items=12, batch_size=4, seed=2), 1)


def test_groups_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="3 entries for 4 items"):
        ResumableSampler(num_items=4, batch_size=2, groups=[0, 1, 0])


def test_aspect_ratio_groups_read_sizes_from_annotations():
    sizes = [(100, 200), (200, 100), (150, 150)]  # (height, width)

    class Sized:
        def __len__(self):
            return len(sizes)

        def annotation(self, index):
            return SimpleNamespace(height=sizes[index][0], width=sizes[index][1])

    assert aspect_ratio_groups(Sized()) == [0, 1, 0]
    with pytest.raises(TypeError, match="annotation"):
        aspect_ratio_groups([1, 2])


def test_data_group_aspect_ratio_switches_grouping_in_the_training_loader(raccoon_dir):
    from fpndet.config import load_config
    from fpndet.data.detect import open_dataset
    from fpndet.engine.distributed import DistInfo
    from fpndet.engine.trainer import make_train_loader

    dataset = open_dataset(str(raccoon_dir), split="train")
    orientation = aspect_ratio_groups(dataset)

    def mixed_batches(grouped: bool) -> int:
        cfg = load_config("raccoon", [f"data.train={raccoon_dir}", f"data.group_aspect_ratio={grouped}",
                                      "train.batch_size=8"])
        _, sampler, _ = make_train_loader(dataset, cfg, DistInfo())
        found = batches(sampler, 0)
        assert len(found) == 20  # 160 images / 8: the epoch length does not depend on the option
        return sum(len({orientation[i] for i in batch}) > 1 for batch in found)

    assert mixed_batches(True) <= 1  # 25 portrait images: at most one batch of leftovers is mixed
    assert mixed_batches(False) >= 10  # ungrouped, most batches of 8 hold a portrait image


def test_raccoon_groups_have_both_orientations(raccoon_dir):
    from fpndet.data.detect import open_dataset

    groups = aspect_ratio_groups(open_dataset(str(raccoon_dir), split="train"))
    assert len(groups) == 160 and 0 < sum(groups) < 160


# ----------------------------------------------------------------------------- early stopping
def test_stale_evaluations_reason_counts_evaluations_since_the_best():
    history = [{"step": 10 * (i + 1), "AP": ap} for i, ap in enumerate([0.1, 0.3, 0.2, 0.3, 0.25])]
    assert stale_evaluations_reason(history[:2], 1) is None
    assert stale_evaluations_reason(history, 4) is None
    reason = stale_evaluations_reason(history, 3)  # a tie (0.3 again) is not an improvement
    assert reason.startswith("AP has not improved for 3 evaluations") and "at step 20" in reason
    assert stale_evaluations_reason([{"step": 1, "AR1000": 0.5}, {"step": 2, "AR1000": 0.4}], 1).startswith("AR1000")


def scripted_evaluations(monkeypatch, values: list[float]) -> list[int]:
    """Trainer.evaluate returns the given APs in turn; returns the steps at which it ran."""
    steps = []

    def evaluate(self, tag="eval"):
        steps.append(self.progress.step)
        ap = values[len(steps) - 1]
        return {"metrics": {"AP": ap, "AP50": ap}, "val_losses": {"val_loss": 1.0}}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return steps


def test_patience_stops_at_the_right_evaluation_and_resume_does_not_continue(tmp_path, monkeypatch):
    # 16 images / batch 4: 4 steps per epoch, evaluated every epoch, 6 epochs planned
    cfg = tiny_config(tmp_path, "train.max_iters=24", "train.eval_every_epochs=1", "train.patience=2")
    steps = scripted_evaluations(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.5, 0.6])
    trainer = Trainer(cfg)
    trainer.fit()
    assert steps == [4, 8, 12, 16]  # best at the 2nd evaluation, 2 without gain: stop after the 4th
    assert trainer.progress.step == 16
    assert "not improved for 2 evaluations" in trainer.progress.stop_reason
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "stopped" in r] == [16]
    assert ckpt.load_training_state(tmp_path / "last.pth")["extra"]["stop_reason"] == trainer.progress.stop_reason

    resumed = Trainer(cfg, resume=True)
    resumed.fit()
    assert resumed.progress.step == 16 and steps == [4, 8, 12, 16]  # nothing more trained or evaluated


def test_without_patience_the_run_goes_to_the_end(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_iters=24", "train.eval_every_epochs=1")
    steps = scripted_evaluations(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.2, 0.2])
    trainer = Trainer(cfg)
    trainer.fit()
    assert steps == [4, 8, 12, 16, 20, 24] and trainer.progress.stop_reason is None


# ----------------------------------------------------------------------------- validation loss
def test_validation_loss_is_logged_with_each_evaluation_and_equals_the_model_losses(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_iters=4", "train.eval_every_epochs=1", "eval.max_images=4")
    trainer = Trainer(cfg)
    trainer.fit()
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "AP" in r]
    assert len(evals) == 1
    logged = evals[0]
    assert {"val_loss", "val_loss_cls", "val_loss_box"} <= logged.keys()
    assert logged["val_loss"] == pytest.approx(logged["val_loss_cls"] + logged["val_loss_box"], rel=1e-6)

    # the same number from the model's own losses on the 4 images (one evaluation batch)
    model = trainer.model.eval()
    trainer.val_set.transforms = None
    samples = [trainer.val_set[index] for index in range(4)]
    with torch.no_grad():
        losses = model([image.float() / 255 for image, _ in samples], [target for _, target in samples]).losses
    assert logged["val_loss"] == pytest.approx(float(sum(losses.values())), rel=1e-5)
    assert logged["val_loss_cls"] == pytest.approx(float(losses["loss_cls"]), rel=1e-5)


def test_validation_loss_can_be_switched_off(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_iters=4", "train.eval_every_epochs=1", "eval.loss=false")
    Trainer(cfg).fit()
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("AP" in r for r in evals) and not any("val_loss" in r for r in evals)


def test_run_inference_losses_of_a_faster_rcnn_are_finite(tmp_path):
    cfg = tiny_config(tmp_path, "model.arch=faster_rcnn", "model.min_level=2", "model.max_level=6",
                      "model.anchor_sizes=[16,32,64,128,256]")
    trainer = Trainer(cfg)
    detections, _, losses = run_inference(trainer.model, trainer.val_set, batch_size=2, max_images=3, with_losses=True)
    assert len(detections) == 3
    assert {"loss", "loss_objectness", "loss_rpn_box", "loss_cls", "loss_box"} <= losses.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and losses["loss"] > 0


# ----------------------------------------------------------------------------- weight EMA
@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Trainer:
    out = tmp_path_factory.mktemp("ema")
    trainer = Trainer(tiny_config(out, "train.ema=true", "train.ema_decay=0.9"))
    trainer.fit()
    return trainer


def test_ema_weights_are_saved_in_place_of_the_raw_weights(ema_run):
    raw, ema = ema_run.model.state_dict(), ema_run.ema.module.state_dict()
    name = "head.cls_tower.0.0.weight" if "head.cls_tower.0.0.weight" in raw else next(
        k for k, v in raw.items() if v.is_floating_point() and v.dim() == 4)
    assert not torch.equal(raw[name], ema[name])  # the average lags the raw weights
    saved, _ = ckpt.load_model_weights(ema_run.out / "last.safetensors")
    for key, value in ema.items():
        assert torch.equal(saved[key], value.cpu()), key
    state = ckpt.load_training_state(ema_run.out / "last.pth")
    for key, value in raw.items():
        assert torch.equal(state["model_state"][key], value), key  # the raw weights resume training


def test_ema_decay_follows_the_warm_up_and_the_cap(ema_run):
    assert ema_run.ema.get_decay(1) == 0.0  # the first update copies the weights
    assert ema_run.ema.get_decay(5) == pytest.approx(1 - 5 ** -0.75)  # 0.67: warming up
    assert ema_run.ema.get_decay(10_000) == pytest.approx(0.9)  # train.ema_decay caps it


def test_ema_warmup_power_sets_the_warm_up(tmp_path):
    from fpndet.engine.trainer import build_ema

    cfg = tiny_config(tmp_path, "train.ema_warmup_power=0.5", "train.ema_decay=0.999")
    ema = build_ema(torch.nn.Linear(2, 2), cfg)
    assert ema.get_decay(5) == pytest.approx(1 - 5 ** -0.5)  # 0.553 (0.75 would give 0.701)
    assert ema.get_decay(10 ** 8) == pytest.approx(0.999)


def test_patience_below_one_is_refused(tmp_path):
    from fpndet.errors import InputError

    with pytest.raises(InputError, match="train.patience=0"):
        Trainer(tiny_config(tmp_path, "train.patience=0"))


def test_ema_resume_is_exact(ema_run, tmp_path):
    cfg = tiny_config(tmp_path, "train.ema=true", "train.ema_decay=0.9", "train.checkpoint_every_iters=3")
    resumed = train_with_crash(cfg, crash_after_steps=3)
    assert resumed.progress.step == TOTAL_STEPS
    reference = ema_run.ema.module.state_dict()
    for name, tensor in resumed.ema.module.state_dict().items():
        assert torch.equal(tensor, reference[name]), f"EMA {name} differs after resume"


def test_resume_with_ema_from_a_run_without_it_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_iters=4")
    Trainer(cfg).fit()
    from fpndet.errors import InputError

    with pytest.raises(InputError, match="without train.ema"):
        Trainer(tiny_config(tmp_path, "train.max_iters=8", "train.ema=true"), resume=True)


def test_ema_off_saves_the_raw_weights(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_iters=2"))
    trainer.fit()
    assert trainer.ema is None
    saved, _ = ckpt.load_model_weights(tmp_path / "last.safetensors")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_best_weights_are_the_evaluated_ema(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_iters=4", "train.eval_every_epochs=1", "train.ema=true", "eval.max_images=2")
    evaluated = []
    original = run_inference

    def recording(model, *args, **kwargs):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr("fpndet.engine.trainer.run_inference", recording)
    trainer = Trainer(cfg)
    trainer.fit()
    assert len(evaluated) == 1
    best, _ = ckpt.load_model_weights(Path(tmp_path) / "best.safetensors")
    for key, value in trainer.ema.module.state_dict().items():
        assert torch.equal(evaluated[0][key], value) and torch.equal(best[key], value), key


def test_trainer_evaluation_diagnostics_follow_the_config(tmp_path):
    on = tiny_config(tmp_path / "on", "train.max_iters=4", "train.eval_every_epochs=1", "eval.diagnostics_thresh=0.02")
    Trainer(on).fit()
    assert (tmp_path / "on" / "eval" / "confusion_matrix.csv").is_file()
    written = json.loads((tmp_path / "on" / "eval" / "diagnostics.json").read_text())
    assert written["score_thresh"] == pytest.approx(0.02)
    off = tiny_config(tmp_path / "off", "train.max_iters=4", "train.eval_every_epochs=1", "eval.diagnostics=false")
    Trainer(off).fit()
    assert (tmp_path / "off" / "eval" / "metrics.json").is_file()
    assert not (tmp_path / "off" / "eval" / "confusion_matrix.csv").exists()
