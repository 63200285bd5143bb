"""Proposal files: the region proposals of a trained RPN, written once and read by a Fast R-CNN
trained and evaluated on them (FPN paper §5.2.1 and Table 2: Fast R-CNN on a fixed set of
proposals, features not shared with the RPN).

A proposals file is one safetensors file:

- tensors ``boxes`` float32 ``[M, 4]`` (xyxy pixels of the original image, every image's
  proposals one after the other, best first), ``scores`` float32 ``[M]`` (objectness
  probabilities), ``image_ids`` int64 ``[I]``, ``counts`` int64 ``[I]`` (proposals per image, in
  the order of ``image_ids``) and ``sizes`` int64 ``[I, 2]`` (height, width of each image);
- metadata ``fpndet_proposals``: JSON ``{"file_names": [...], "source": ..., "dataset": ...,
  "split": ...}`` (each image's file name with its folder, ``images/0001.jpg``: the part of the
  path that stays the same when the data moves to another machine).

An image is found by its ``image_id``; its file name and size must match the dataset's too, so a
file written for another dataset or split is refused with the images that differ named.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import safetensors
import safetensors.torch
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import InputError
from .checkpoints import atomic_write_bytes

METADATA_KEY = "fpndet_proposals"
TENSOR_NAMES = ("boxes", "scores", "image_ids", "counts", "sizes")


def save_proposals(path: str | os.PathLike, dataset, proposals: Sequence[dict[str, torch.Tensor]], *,
                   source: str = "", dataset_spec: str = "", split: str = "") -> Path:
    """Write the proposals of the first ``len(proposals)`` images of ``dataset`` (atomically).

    Args:
        path: the ``.safetensors`` file to write.
        dataset: a :class:`~fpndet.data.dataset.DetectionDataset` (its ``annotation(i)`` gives
            each image's id, file name and size).
        proposals: per image, in dataset order, ``{"boxes" float [N_i, 4] xyxy pixels of the
            original image, "scores" float [N_i]}`` (what an RPN model returns in eval mode).
        source, dataset_spec, split: recorded in the metadata (the RPN's weights, the data).

    Returns:
        ``Path(path)``.
    """
    records = [dataset.annotation(i) for i in range(len(proposals))]
    tensors = {
        "boxes": torch.cat([p["boxes"].detach().float().cpu().reshape(-1, 4) for p in proposals])
        if proposals else torch.zeros(0, 4),
        "scores": torch.cat([p["scores"].detach().float().cpu().reshape(-1) for p in proposals])
        if proposals else torch.zeros(0),
        "image_ids": torch.tensor([r.image_id for r in records], dtype=torch.int64),
        "counts": torch.tensor([len(p["boxes"]) for p in proposals], dtype=torch.int64),
        "sizes": torch.tensor([[r.height, r.width] for r in records], dtype=torch.int64).reshape(-1, 2),
    }
    meta = {"file_names": [short_name(r.file_name) for r in records], "source": str(source),
            "dataset": str(dataset_spec), "split": str(split)}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata={METADATA_KEY: json.dumps(meta)})
    atomic_write_bytes(path, data)
    return Path(path)


def short_name(file_name: str) -> str:
    """The file name with its folder (``/data/coco/val2017/1.jpg`` -> ``val2017/1.jpg``)."""
    parts = Path(file_name).parts
    return "/".join(parts[-2:])


class ProposalFile:
    """The proposals of a file written by :func:`save_proposals`, looked up by image id.

    Args:
        path: the ``.safetensors`` proposals file.

    Raises:
        InputError(path, ...): missing, truncated or not a proposals file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "no such proposals file (write one with `fpndet proposals`)")
        try:
            with safetensors.safe_open(os.fspath(self.path), framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises several types for truncated or foreign files
            raise InputError(self.path, f"not a readable safetensors file: {error}") from None
        missing = [name for name in TENSOR_NAMES if name not in tensors]
        if missing or METADATA_KEY not in header:
            raise InputError(self.path, f"not a fpndet proposals file (lacks {missing or [METADATA_KEY]})")
        self.meta = json.loads(header[METADATA_KEY])
        counts = tensors["counts"].tolist()
        if sum(counts) != len(tensors["boxes"]) or len(counts) != len(tensors["image_ids"]):
            raise InputError(self.path, "proposal counts do not add up to the boxes it holds (corrupt file)")
        ids = tensors["image_ids"].tolist()
        self.boxes = dict(zip(ids, tensors["boxes"].split(counts)))
        self.scores = dict(zip(ids, tensors["scores"].split(counts)))
        self.sizes = dict(zip(ids, map(tuple, tensors["sizes"].tolist())))
        self.file_names = dict(zip(ids, self.meta.get("file_names", [""] * len(ids))))

    def __len__(self) -> int:
        return len(self.boxes)

    def check_covers(self, dataset, *, max_images: Optional[int] = None) -> None:
        """Raise unless every image of ``dataset`` (its first ``max_images``) has proposals here,
        written for the same file name and size.

        Raises:
            InputError(path, ...): naming up to three images that are missing or differ, and the
            dataset the file was written for.
        """
        count = len(dataset) if max_images is None else min(max_images, len(dataset))
        problems = []
        for index in range(count):
            record = dataset.annotation(index)
            name = short_name(record.file_name)
            if record.image_id not in self.boxes:
                problems.append(f"{name} (image id {record.image_id}) has no proposals")
            elif self.file_names[record.image_id] != name:
                problems.append(f"image id {record.image_id} is {name} in the dataset but "
                                f"{self.file_names[record.image_id]} in the proposals file")
            elif self.sizes[record.image_id] != (record.height, record.width):
                height, width = self.sizes[record.image_id]
                problems.append(f"{name} is {record.width}x{record.height} but the proposals were made "
                                f"for {width}x{height}")
        if problems:
            written = " ".join(filter(None, [self.meta.get("dataset"), self.meta.get("split")])) or "another dataset"
            raise InputError(self.path, f"does not match the dataset: {len(problems)} of {count} images differ "
                             f"({'; '.join(problems[:3])}); it holds proposals of {len(self)} images of {written}")

    def get(self, image_id: int) -> torch.Tensor:
        """Proposals float32 ``[N, 4]`` xyxy original-image pixels of image ``image_id``."""
        return self.boxes[int(image_id)]


class WithProposals(Dataset):
    """Adds ``target["proposals"]`` (:class:`tv_tensors.BoundingBoxes` ``[N, 4]`` xyxy pixels,
    canvas = the image) to each sample of ``dataset``, so the training transforms move the
    proposals with the image (a horizontal flip flips them too).

    Args:
        dataset: yields ``(image [3, H, W], target)`` with ``target["image_id"]``.
        proposals: a :class:`ProposalFile` covering the dataset.
    """

    def __init__(self, dataset: Dataset, proposals: ProposalFile):
        self.dataset, self.proposals = dataset, proposals

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        target = dict(target)
        target["proposals"] = tv_tensors.BoundingBoxes(
            self.proposals.get(target["image_id"]).clone(), format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=tuple(image.shape[-2:]),
        )
        return image, target
