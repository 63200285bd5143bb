"""Proposal files and Fast R-CNN on fixed proposals (FPN paper Table 2): a file round-trips by
image id; a file for other images is refused naming it; the augmentation flips proposals with
the image; a Fast R-CNN model detects exactly at the file's proposals when its box regression is
zero; the trainer trains and evaluates ``model.arch=fast_rcnn`` on files and refuses bad setups."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fpndet.config import load_config
from fpndet.data.detect import open_dataset
from fpndet.data.loaders import collate_detection
from fpndet.data.transforms import build_train_transforms
from fpndet.engine.inference import run_inference
from fpndet.engine.proposals import ProposalFile, WithProposals, save_proposals
from fpndet.engine.trainer import Trainer
from fpndet.errors import InputError
from fpndet.modeling.build import build_model
from fpndet.modeling.config import named_config

SHAPES = dict(image_size=(96, 96))


def shapes(split: str, count: int):
    return open_dataset("shapes", split=split, num_images=count, **SHAPES)


def jittered_proposals(dataset, *, per_image: int = 20, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per image: its ground-truth boxes shifted by a few pixels plus random boxes, all inside
    the image, with made-up decreasing scores."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(len(dataset)):
        record = dataset.annotation(index)
        gt = torch.as_tensor(record.boxes).reshape(-1, 4)
        shifted = gt + torch.randint(-3, 4, gt.shape, generator=generator)
        corners = torch.rand(per_image - len(gt), 2, generator=generator) * torch.tensor([record.width, record.height]) * 0.7
        sizes = 8 + torch.rand(per_image - len(gt), 2, generator=generator) * 24
        random_boxes = torch.cat([corners, corners + sizes], dim=1)
        boxes = torch.cat([shifted, random_boxes]).float()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, record.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, record.height)
        out.append({"boxes": boxes, "scores": torch.linspace(1, 0.1, len(boxes))})
    return out


def test_proposal_file_round_trips_by_image_id(tmp_path):
    dataset = shapes("val", 5)
    proposals = jittered_proposals(dataset)
    path = save_proposals(tmp_path / "p.safetensors", dataset, proposals, source="rpn", dataset_spec="shapes", split="val")
    loaded = ProposalFile(path)
    loaded.check_covers(dataset)
    assert len(loaded) == 5 and loaded.meta["split"] == "val"
    for index, expected in enumerate(proposals):
        image_id = dataset.annotation(index).image_id
        assert torch.equal(loaded.get(image_id), expected["boxes"])
        assert torch.equal(loaded.scores[image_id], expected["scores"])


def test_a_proposals_file_for_other_images_is_refused_naming_it(tmp_path):
    val, train = shapes("val", 5), shapes("train", 5)
    path = save_proposals(tmp_path / "val.safetensors", val, jittered_proposals(val), dataset_spec="shapes", split="val")
    with pytest.raises(InputError, match=r"val\.safetensors: does not match the dataset: 5 of 5 images differ") as err:
        ProposalFile(path).check_covers(train)
    assert "it holds proposals of 5 images of shapes val" in str(err.value)
    short = save_proposals(tmp_path / "short.safetensors", val, jittered_proposals(val)[:3])
    with pytest.raises(InputError, match=r"2 of 5 images differ.*has no proposals"):
        ProposalFile(short).check_covers(val)
    ProposalFile(short).check_covers(val, max_images=3)  # enough for an evaluation of 3 images
    bigger = open_dataset("shapes", split="val", num_images=5, image_size=(96, 128))
    with pytest.raises(InputError, match=r"is 128x96 but the proposals were made for 96x96"):
        ProposalFile(path).check_covers(bigger)
    for name, content in (("missing.safetensors", None), ("junk.safetensors", b"not a safetensors file")):
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=name):
            ProposalFile(tmp_path / name)


def test_the_training_flip_moves_proposals_with_the_image(tmp_path):
    dataset = shapes("train", 2)
    proposals = jittered_proposals(dataset)
    path = save_proposals(tmp_path / "p.safetensors", dataset, proposals)
    flipped = WithProposals(dataset, ProposalFile(path))
    dataset.transforms = None
    image, target = flipped[0]
    flip_image, flip_target = build_train_transforms(hflip_prob=1.0)(image, target)
    width = image.shape[-1]
    original = proposals[0]["boxes"]
    expected = torch.stack([width - original[:, 2], original[:, 1], width - original[:, 0], original[:, 3]], dim=1)
    _, (plain,) = collate_detection([(flip_image, flip_target)])
    assert plain["proposals"].dtype == torch.float32 and type(plain["proposals"]) is torch.Tensor
    torch.testing.assert_close(plain["proposals"], expected)
    torch.testing.assert_close(plain["boxes"][:, [0, 2]], width - torch.as_tensor(target["boxes"])[:, [2, 0]])


def test_fast_rcnn_with_zero_box_regression_detects_at_the_files_proposals(tmp_path):
    """Proposals reach the RoI heads by image id, in original pixels, through ``run_inference``:
    with zero deltas and one class forced on, the detections are exactly the file's boxes."""
    dataset = shapes("val", 3)
    proposals = jittered_proposals(dataset, per_image=6)
    path = save_proposals(tmp_path / "p.safetensors", dataset, proposals)
    torch.manual_seed(0)
    config = named_config("faster_rcnn_r18_fpn_cpu", arch="fast_rcnn", num_classes=dataset.num_classes,
                          min_size=[64], max_size=64, fpn_channels=16, backbone_weights=None,
                          roi_heads={"fc_dim": 16}, nms_thresh=1.0)
    model = build_model(config).eval()
    predictor = model.roi_heads.predictor
    with torch.no_grad():
        for layer in (predictor.cls_score, predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        predictor.cls_score.bias[2] = 20.0  # logit 2 = label 1 wins everywhere
    detections, _ = run_inference(model, dataset, batch_size=2, proposals=ProposalFile(path))
    for found, given in zip(detections, proposals):
        assert (found["labels"] == 1).all()
        order = torch.argsort(found["boxes"][:, 0] * 1e4 + found["boxes"][:, 1])
        expected = given["boxes"][torch.argsort(given["boxes"][:, 0] * 1e4 + given["boxes"][:, 1])]
        torch.testing.assert_close(found["boxes"][order], expected, atol=1e-3, rtol=0)


def tiny_fast_rcnn(out: Path, *overrides: str):
    return load_config(None, [
        "data.train=shapes", "data.shapes_train_images=8", "data.shapes_val_images=4", "data.shapes_image_size=96",
        "data.num_workers=0", "model.preset=faster_rcnn_r18_fpn_cpu", "model.arch=fast_rcnn",
        "model.backbone_weights=null", "model.fpn_channels=16", "model.roi_heads.fc_dim=16",
        "model.roi_heads.batch_size_per_image=32", "model.min_size=[64]", "model.max_size=64",
        "train.batch_size=4", f"train.output_dir={out}", "train.epochs=1", "train.warmup_iters=1",
        "train.device=cpu", "train.log_every=1", *overrides,
    ])


@pytest.fixture
def shapes_proposal_files(tmp_path) -> tuple[Path, Path]:
    cfg = tiny_fast_rcnn(tmp_path / "unused")
    files = []
    for split, count in (("train", cfg.data.shapes_train_images), ("val", cfg.data.shapes_val_images)):
        dataset = open_dataset("shapes", split=split, num_images=count, image_size=(96, 96))
        files.append(save_proposals(tmp_path / f"{split}.safetensors", dataset, jittered_proposals(dataset)))
    return files[0], files[1]


def test_trainer_trains_and_evaluates_fast_rcnn_on_proposal_files(tmp_path, shapes_proposal_files, monkeypatch):
    train_file, val_file = shapes_proposal_files
    seen = []
    original = WithProposals.__getitem__

    def recording(self, index):
        sample = original(self, index)
        seen.append(sample[1]["image_id"])
        return sample

    monkeypatch.setattr(WithProposals, "__getitem__", recording)
    cfg = tiny_fast_rcnn(tmp_path / "run", f"data.train_proposals={train_file}", f"data.val_proposals={val_file}")
    trainer = Trainer(cfg)
    assert trainer.model.rpn is None
    report = trainer.fit()
    assert sorted(seen) == sorted(trainer.train_set.image_ids)  # one epoch, every image with its proposals
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert losses and set(losses[0]) >= {"loss_cls", "loss_box"} and "loss_objectness" not in losses[0]
    assert 0 <= report["metrics"]["AP"] <= 1


def test_trainer_refuses_fast_rcnn_without_files_and_files_for_another_arch(tmp_path, shapes_proposal_files):
    train_file, val_file = shapes_proposal_files
    with pytest.raises(InputError, match="set data.train_proposals and data.val_proposals"):
        Trainer(tiny_fast_rcnn(tmp_path / "a"))
    with pytest.raises(InputError, match="read by model.arch=fast_rcnn only"):
        Trainer(tiny_fast_rcnn(tmp_path / "b", "model.arch=faster_rcnn", f"data.train_proposals={train_file}"))
    with pytest.raises(InputError, match=r"train\.safetensors: does not match the dataset"):
        Trainer(tiny_fast_rcnn(tmp_path / "c", f"data.train_proposals={train_file}", f"data.val_proposals={train_file}"))
