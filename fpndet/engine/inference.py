"""Running a detector over a dataset, and evaluating what it finds."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data.checks import KeptImages
from ..data.loaders import collate_detection
from ..data.transforms import build_eval_transforms
from ..errors import InputError, InputWarning
from .diagnostics import DEFAULT_SCORE_THRESH as DEFAULT_DIAGNOSTICS_THRESH
from .diagnostics import remove_diagnostics, write_diagnostics
from .evaluation import (
    CocoEvaluator,
    detections_to_coco_results,
    format_per_class_table,
    match_model_classes,
    proposal_recall,
    proposals_to_coco_results,
    remap_detection_labels,
    save_results_json,
    voc_map50,
)


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for "bf16"/"fp16" on CUDA; a no-op otherwise."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def run_inference(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 8,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
    amp: str = "none",
    max_images: Optional[int] = None,
    progress: bool = False,
    score_thresh: Optional[float] = None,
    proposals=None,
    skip_unreadable: bool = False,
    with_losses: bool = False,
):
    """Detections (on the CPU, in original-image pixels) and ground truths for every image, in
    dataset order. The dataset's own transforms are replaced by the evaluation transforms.

    Returns ``(detections, ground_truths)``; with ``with_losses`` a third item, the validation
    losses ``{"loss", "loss_cls", ...}`` (floats, the mean over images of each loss the model
    returns in training, with the same targets) computed in the same forward pass as the
    detections (the models return :class:`~fpndet.modeling.retinanet.LossesAndDetections` in
    eval mode when given targets).

    ``score_thresh``: the post-processor's score threshold for this run only (the model's own
    is restored afterwards); None keeps the model's. Detections keep the model's labels.
    ``proposals``: a :class:`~fpndet.engine.proposals.ProposalFile` covering the dataset, for a
    Fast R-CNN model (``model.arch=fast_rcnn``) that runs on fixed proposals.
    ``skip_unreadable``: an image that fails to decode gets None as its detections and ground
    truth (with a warning naming it) instead of raising :class:`InputError`.
    """
    from .model_io import apply_inference_overrides, model_device

    device = device or model_device(model)
    previous = dataset.transforms
    restore = apply_inference_overrides(model, score_thresh=score_thresh)
    dataset.transforms = build_eval_transforms()
    subset = dataset if max_images is None else Subset(dataset, range(min(max_images, len(dataset))))
    if skip_unreadable:
        subset = _ReadableOrNone(subset)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_readable)
    was_training = model.training
    model.eval()
    detections, ground_truths = [], []
    loss_sums: dict[str, float] = {}
    try:
        iterator = loader
        if progress:
            from tqdm import tqdm

            iterator = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)
        for images, targets, unreadable in iterator:
            outputs = []
            if images:
                given = {} if proposals is None else {"proposals": [proposals.get(t["image_id"]) for t in targets]}
                if with_losses:
                    given["targets"] = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                                        for t in targets]
                with autocast_context(device, amp):
                    outputs = model([img.to(device, non_blocking=True) for img in images], **given)
                if with_losses:
                    _add_losses(loss_sums, outputs.losses, len(images))
                    outputs = outputs.detections
            found = iter({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs)
            truths = iter(targets)
            for position in range(len(images) + len(unreadable)):
                if position in unreadable:
                    warnings.warn(InputWarning(None, f"{unreadable[position]}; left out of this evaluation",
                                               kind="unreadable images left out of evaluations"))
                    detections.append(None)
                    ground_truths.append(None)
                else:
                    detections.append(next(found))
                    ground_truths.append(next(truths))
    finally:
        dataset.transforms = previous
        apply_inference_overrides(model, **restore)
        model.train(was_training)
    if not with_losses:
        return detections, ground_truths
    count = sum(found is not None for found in detections)
    return detections, ground_truths, {k: v / max(count, 1) for k, v in loss_sums.items()}


def _add_losses(sums: dict[str, float], losses: dict[str, torch.Tensor], num_images: int) -> None:
    """Accumulate a batch's mean losses (and their total, ``loss``) weighted by its image count."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    values["loss"] = sum(values.values())
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value * num_images


class _ReadableOrNone(torch.utils.data.Dataset):
    """``dataset[i]``, or ``(None, "file: problem")`` for an image that fails to decode."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except InputError as error:
            return None, str(error)


def _collate_readable(batch):
    """``(images, targets, {position in batch: problem})`` of the readable samples of a batch."""
    unreadable = {k: sample[1] for k, sample in enumerate(batch) if sample[0] is None}
    readable = [sample for sample in batch if sample[0] is not None]
    images, targets = collate_detection(readable) if readable else ([], [])
    return images, targets, unreadable


def drop_unreadable(dataset, detections: list, ground_truths: list):
    """``(dataset, detections, ground_truths)`` without the images :func:`run_inference` left out
    (None entries): the dataset as :class:`~fpndet.data.checks.KeptImages` of the others."""
    kept = [i for i, found in enumerate(detections) if found is not None]
    if len(kept) == len(detections):
        return dataset, detections, ground_truths
    return KeptImages(dataset, kept), [detections[i] for i in kept], [ground_truths[i] for i in kept]


def evaluated_ground_truth(dataset, num_images: int) -> dict:
    """The dataset's COCO ground truth (:meth:`to_coco`) restricted to its first ``num_images``."""
    coco_gt = dataset.to_coco()
    if num_images < len(dataset):
        keep = set(dataset.image_ids[:num_images])
        coco_gt = {
            **coco_gt,
            "images": [im for im in coco_gt["images"] if im["id"] in keep],
            "annotations": [a for a in coco_gt["annotations"] if a["image_id"] in keep],
        }
    return coco_gt


def evaluate_proposals(dataset, proposals, *, out_dir: Optional[Path] = None) -> dict:
    """Class-agnostic proposal recall of an RPN (FPN paper Table 1) with pycocotools.

    Args:
        dataset: the evaluated dataset (its :meth:`to_coco` is the ground truth).
        proposals: per image ``{"boxes" [N, 4] xyxy pixels of the input image, "scores" [N]}``.
        out_dir: if given, receives ``metrics.json``.

    Returns:
        ``{"metrics": {"AR100", "AR1000", "ARs1000", "ARm1000", "ARl1000"}}``
        (:func:`~fpndet.engine.evaluation.proposal_recall`).
    """
    image_ids = dataset.image_ids[: len(proposals)]
    coco_gt = evaluated_ground_truth(dataset, len(proposals))
    category = coco_gt["categories"][0]["id"]
    metrics = proposal_recall(coco_gt, proposals_to_coco_results(proposals, image_ids, category))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_results_json(out_dir / "metrics.json", {"metrics": metrics})
    return {"metrics": metrics}


def evaluate_detections(dataset, detections, ground_truths, *, out_dir: Optional[Path] = None,
                        model_class_names=None, model_source=None, diagnostics: bool = True,
                        diagnostics_thresh: Optional[float] = None) -> dict:
    """COCO metrics (pycocotools) for ``detections``; VOC mAP@0.5 too for VOC datasets.

    Args:
        dataset: the evaluated dataset; its :meth:`to_coco` is the ground truth (for COCO files
            the file's own annotations), restricted to the first ``len(detections)`` images.
        detections: per image ``{"boxes" xyxy pixels, "scores", "labels"}`` with the model's labels.
        ground_truths: per image targets (``boxes``, ``labels``, ``iscrowd`` = VOC difficult),
            for the VOC metric.
        model_class_names: name of each model label; None: the labels are the dataset's own
            (the trainer's model). Mapped by :func:`~fpndet.engine.evaluation.match_model_classes`:
            detections of classes the dataset lacks are dropped.
        model_source: the model's file, named in errors.
        out_dir: if given, receives ``detections.json`` (COCO results format, the dataset's
            category ids), ``metrics.json``, ``per_class_ap.txt`` and ``pr_curve.png``, and with
            ``diagnostics`` the files of :func:`~fpndet.engine.diagnostics.write_diagnostics`
            (confusion matrix, per-class PR curves, per-class AP by size, worst false positives
            and misses, ``diagnostics.json``).
        diagnostics: write the diagnostics (with ``out_dir``); False removes earlier ones there.
        diagnostics_thresh: score threshold of the confusion matrix and the pictures; None:
            :data:`~fpndet.engine.diagnostics.DEFAULT_SCORE_THRESH` (0.3, ``fpndet predict``'s
            threshold). The COCO metrics use every detection.

    Returns:
        ``{"metrics": {...}, "per_class_ap": {...}, ...}`` (see :meth:`CocoEvaluator.evaluate`),
        with ``"diagnostics"`` (:func:`~fpndet.engine.diagnostics.write_diagnostics`) when written.
        For VOC datasets ``metrics["VOC_mAP50"]`` is the devkit mAP: all-point interpolated AP at
        IoU >= 0.5 (VOC2010+ devkit rule, :func:`~fpndet.engine.evaluation.voc_map50`), not the
        11-point AP of VOC2007.

    Raises:
        InputError(model_source, ...): the model's classes do not cover the dataset's.
    """
    mapping = match_model_classes(model_class_names, dataset.class_names, source=model_source)
    detections = remap_detection_labels(detections, mapping)
    image_ids = dataset.image_ids[: len(detections)]
    results = detections_to_coco_results(detections, image_ids, dataset.label_to_category_id)
    coco_gt = evaluated_ground_truth(dataset, len(detections))
    report = CocoEvaluator(coco_gt, class_names=dataset.class_names).evaluate(results)
    if dataset.devkit_metric:  # VOC: the devkit metric too
        voc = voc_map50(detections, ground_truths, dataset.num_classes, use_07_metric=False)
        report["metrics"]["VOC_mAP50"] = voc["mAP50"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_results_json(out_dir / "detections.json", results)
        save_results_json(out_dir / "metrics.json", {"metrics": report["metrics"], "per_class_ap": report["per_class_ap"],
                                                     "per_class_ap50": report["per_class_ap50"]})
        (out_dir / "per_class_ap.txt").write_text(
            format_per_class_table(report["per_class_ap"], report["per_class_ap50"]) + "\n"
        )
        from .plots import plot_precision_recall

        if report.get("precision") is not None:
            plot_precision_recall(report["precision"], dataset.class_names, out_dir / "pr_curve.png")
        if diagnostics:
            report["diagnostics"] = write_diagnostics(dataset, detections, ground_truths, out_dir,
                                                      precision=report.get("precision"), coco_gt=coco_gt,
                                                      score_thresh=DEFAULT_DIAGNOSTICS_THRESH if diagnostics_thresh is None
                                                      else diagnostics_thresh)
        else:
            remove_diagnostics(out_dir)
    return report
