"""Every training option does what it says: ``train.init_weights`` (and ``fpndet train
--weights``, which sets it) starts the model from the file's tensors; ``train.clip_grad_norm``
bounds a step's parameter change (the update is the unclipped one scaled by clip / ||g||);
``data.color_jitter`` changes the pixels of training images and nothing else.

Runs are CPU-sized: 16 synthetic 128 px shapes images, ResNet-18 (random init), 32-channel
FPN and heads, batches of 4.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fpndet.config import load_config
from fpndet.engine import checkpoints as ckpt
from fpndet.engine.distributed import DistInfo
from fpndet.engine.trainer import Trainer, make_train_loader, open_datasets

TINY = [
    "data.train=shapes", "data.shapes_train_images=16", "data.shapes_val_images=8",
    "data.shapes_image_size=128", "data.num_workers=0",
    "model.backbone=resnet18", "model.backbone_weights=null", "model.fpn_channels=32",
    "model.retinanet.head_channels=32", "model.retinanet.head_depth=1",
    "model.min_size=[128]", "model.max_size=128", "model.anchor_sizes=[16,32,64,128,256]",
    "train.batch_size=4", "train.log_every=1", "train.warmup_iters=0",
    "train.epochs=null", "train.max_iters=2", "train.eval_every_epochs=100", "eval.max_images=2",
]


def tiny_config(out_dir: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.output_dir={out_dir}", "train.device=cpu", *overrides])


# ----------------------------------------------------------------------------- init weights
def write_weights(tmp_path: Path, form: str) -> tuple[str, dict[str, torch.Tensor]]:
    """A weights file for the tiny model whose every float tensor differs from a fresh model's.
    Returns the path to give (a file, or a run folder) and the tensors it holds."""
    trainer = Trainer(tiny_config(tmp_path / "source"))
    g = torch.Generator().manual_seed(123)
    state = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in trainer.model.state_dict().items()}
    if form == "pth":
        path = tmp_path / "weights.pth"
        torch.save(state, path)
        return str(path), state
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / ("best.safetensors" if form == "run folder" else "weights.safetensors")
    ckpt.save_model_weights(path, state, config=trainer.model_cfg.to_dict(), metadata={"step": 1})
    return str(folder if form == "run folder" else path), state


def assert_model_holds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("form", ["safetensors", "pth", "run folder"])
def test_init_weights_starts_the_model_from_the_file(tmp_path, form):
    path, state = write_weights(tmp_path, form)
    fresh = Trainer(tiny_config(tmp_path / "fresh")).model.state_dict()
    changed = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(fresh[k], v)]
    assert len(changed) == sum(v.is_floating_point() for v in state.values())  # the option has work to do
    trainer = Trainer(tiny_config(tmp_path / "init", f"train.init_weights={path}"))
    assert_model_holds(trainer.model, state)


def test_fpndet_train_weights_flag_loads_the_file(tmp_path, monkeypatch):
    """``fpndet train --weights FILE`` builds the model from FILE's tensors (the training itself
    is replaced by building the Trainer, which is where the weights are loaded)."""
    from fpndet import cli

    path, state = write_weights(tmp_path, "safetensors")
    config = tmp_path / "tiny.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(TINY)))
    built = {}

    def build_only(cfg, *, resume=False):
        built["cfg"] = cfg
        built["trainer"] = Trainer(cfg, resume=resume)
        return {}

    monkeypatch.setattr("fpndet.engine.trainer.train", build_only)
    status = cli.main(["train", "--config", str(config), "--weights", path, "--output", str(tmp_path / "out"),
                       "--device", "cpu"])
    assert status == 0
    assert built["cfg"].train.init_weights == path
    assert_model_holds(built["trainer"].model, state)


# ----------------------------------------------------------------------------- gradient clipping
def one_step(out_dir: Path, *overrides: str) -> dict:
    """One SGD step (no weight decay, no warm-up) from the seeded initial weights on the first
    batch; returns the batch, the lr used, the parameter change and the gradient norm after the
    step's clipping (float64: a float32 sum over the 11 M entries is off by ~1e-4)."""
    trainer = Trainer(tiny_config(out_dir, "train.weight_decay=0", "train.base_lr=0.04", *overrides))
    images, targets = next(iter(trainer.loader))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.model.train()
    trainer.train_step(list(images), copy.deepcopy(targets))
    delta = torch.cat([(p.detach() - b).double().flatten() for p, b in zip(params, before)])
    grad = torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])
    return {"images": images, "lr": lr, "delta": delta, "grad_norm": float(grad.norm())}


@pytest.fixture(scope="module")
def free_step(tmp_path_factory) -> dict:
    return one_step(tmp_path_factory.mktemp("free"))


def test_clip_grad_norm_scales_the_update_down_to_the_bound(tmp_path, free_step):
    free = free_step
    norm = free["grad_norm"]
    assert free["lr"] == pytest.approx(0.01)  # 0.04 per 16 images, batch 4
    # plain SGD's first step (momentum buffer = gradient): the change is lr * gradient
    assert float(free["delta"].norm()) == pytest.approx(free["lr"] * norm, rel=1e-4)

    clip = round(norm / 4, 6)
    clipped = one_step(tmp_path, f"train.clip_grad_norm={clip}")
    assert all(torch.equal(a, b) for a, b in zip(clipped["images"], free["images"]))  # the same batch
    assert clipped["grad_norm"] == pytest.approx(clip, rel=1e-5)  # the gradient is rescaled in place
    step = float(clipped["delta"].norm())
    assert step == pytest.approx(clipped["lr"] * clip, rel=1e-4)  # ||change|| = lr * clip ...
    assert step == pytest.approx(float(free["delta"].norm()) / 4, rel=1e-4)  # ... a quarter of the free one
    # the same direction: the clipped update is the free one times clip / ||g||
    scale = clip / (norm + 1e-6)
    tolerance = 1e-3 * float(clipped["delta"].abs().max())
    torch.testing.assert_close(clipped["delta"], free["delta"] * scale, rtol=0, atol=tolerance)


def test_clip_grad_norm_above_the_gradient_norm_changes_nothing(tmp_path, free_step):
    loose = one_step(tmp_path, f"train.clip_grad_norm={free_step['grad_norm'] * 10:.6f}")
    torch.testing.assert_close(loose["delta"], free_step["delta"], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- colour jitter
def augmented_samples(jitter: bool) -> tuple[list, list]:
    """The 16 training samples as the training loader gives them (flips off), and the raw ones."""
    cfg = load_config(None, [*TINY, "data.hflip_prob=0", f"data.color_jitter={str(jitter).lower()}"])
    train_set, _ = open_datasets(cfg)
    _, _, augmented = make_train_loader(train_set, cfg, DistInfo())
    return [augmented[i] for i in range(len(augmented))], [train_set[i] for i in range(len(train_set))]


def test_color_jitter_changes_the_pixels_and_not_the_boxes():
    jittered, raw = augmented_samples(True)
    plain, _ = augmented_samples(False)
    assert len(jittered) == len(plain) == 16
    changed = 0
    for (image, target), (plain_image, plain_target), (raw_image, raw_target) in zip(jittered, plain, raw):
        # without jitter (and without flips) the pixels are the raw image's, scaled to [0, 1]
        torch.testing.assert_close(plain_image, raw_image.float() / 255, rtol=0, atol=1e-6)
        assert image.shape == plain_image.shape and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        for key in ("boxes", "labels", "iscrowd"):
            assert torch.equal(torch.as_tensor(target[key]), torch.as_tensor(raw_target[key])), key
            assert torch.equal(torch.as_tensor(target[key]), torch.as_tensor(plain_target[key])), key
        changed += bool((image - plain_image).abs().max() > 1.5 / 255)
    assert changed >= 12  # each photometric distortion is applied with p = 0.5: most images change
    mean_change = sum(float((a[0] - b[0]).abs().mean()) for a, b in zip(jittered, plain)) / 16
    assert mean_change > 0.02  # by several grey levels on average, not rounding noise


def test_color_jitter_reaches_the_trainers_loader(tmp_path):
    jittered = Trainer(tiny_config(tmp_path / "on", "data.color_jitter=true", "data.hflip_prob=0"))
    plain = Trainer(tiny_config(tmp_path / "off", "data.color_jitter=false", "data.hflip_prob=0"))
    (images_on, targets_on), (images_off, targets_off) = next(iter(jittered.loader)), next(iter(plain.loader))
    assert any(not torch.equal(a, b) for a, b in zip(images_on, images_off))
    for a, b in zip(targets_on, targets_off):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
