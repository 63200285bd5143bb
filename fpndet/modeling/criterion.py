"""RetinaNet training objective (Focal Loss paper §3-4): batched anchor matching, classification
loss over all non-ignored anchors, box loss over foreground anchors, normalised by the number of
foreground anchors.

Everything is computed for the whole batch at once: ground truth is padded to ``[B, G]`` and the
per-image work of torchvision becomes masked tensor operations.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from . import losses as L
from .box_coder import BoxCoder
from .matcher import IGNORE, AnchorMatcher


def pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    """Pad per-image targets to ``[B, G]`` (G = the most boxes in an image, at least 1).

    Returns "boxes" float32 ``[B, G, 4]``, "labels" int64 ``[B, G]``, "valid" bool ``[B, G]``
    (real boxes) and "crowd" bool ``[B, G]`` (ignore regions, from the optional "iscrowd").
    """
    counts = torch.tensor([len(t["boxes"]) for t in targets], device=device)
    most = max(int(counts.max()), 1)

    def padded(key: str, dtype: torch.dtype, empty: Tensor) -> Tensor:
        rows = [t[key].to(device=device, dtype=dtype) if key in t else empty[: len(t["boxes"])] for t in targets]
        rows.append(torch.zeros((most, *empty.shape[1:]), dtype=dtype, device=device))  # sets the width
        return pad_sequence(rows, batch_first=True)[:-1]

    no_crowd = torch.zeros(most, dtype=torch.bool, device=device)
    return {
        "boxes": padded("boxes", torch.float32, torch.zeros((most, 4), device=device)),
        "labels": padded("labels", torch.int64, torch.zeros(most, dtype=torch.int64, device=device)),
        "valid": torch.arange(most, device=device)[None] < counts[:, None],
        "crowd": padded("iscrowd", torch.bool, no_crowd),
    }


def _training_world_size(training: bool) -> int:
    """W when a training forward runs under an initialised ``torch.distributed`` group, else 1."""
    if not (training and torch.is_grad_enabled()):
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class RetinaNetCriterion(nn.Module):
    """Computes ``{"loss_cls", "loss_box"}`` from head outputs.

    Args (keyword-only):
        num_classes: K object classes.
        matcher: an :class:`AnchorMatcher`.
        box_coder: a :class:`BoxCoder`.
        cls_loss: "sigmoid_focal" (paper), "softmax_focal" (K+1 logits, background last), "bce",
            "balanced_bce" or "focal_star" (appendix A).
        focal_alpha, focal_gamma: α, γ (0.25, 2). focal_star_gamma, focal_star_beta: γ*, β*.
        box_loss: "smooth_l1" (β = smooth_l1_beta), "l1" or "giou" (on decoded boxes).
        box_loss_weight: factor on the box loss.
        normalization: "batch" divides batch sums by the batch's foreground count (paper; under
            DDP the global batch's count, see :meth:`normalize`);
            "per_image" divides each image by its own count, then averages (torchvision).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: AnchorMatcher,
        box_coder: BoxCoder,
        cls_loss: str = "sigmoid_focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_star_gamma: float = 2.0,
        focal_star_beta: float = 1.0,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        box_loss_weight: float = 1.0,
        normalization: str = "batch",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.box_coder = box_coder
        self.cls_loss = cls_loss
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_star_gamma, self.focal_star_beta = focal_star_gamma, focal_star_beta
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss_weight = box_loss_weight
        self.normalization = normalization

    def classification_loss(self, logits: Tensor, labels: Tensor, foreground: Tensor) -> Tensor:
        """Per-anchor loss ``[B, A]`` (summed over classes) for logits ``[B, A, K(+1)]``; labels
        ``[B, A]`` are the matched classes (read only where ``foreground``)."""
        if self.cls_loss == "softmax_focal":
            target_class = torch.where(foreground, labels, torch.full_like(labels, self.num_classes))
            return L.softmax_focal_loss(logits, target_class, alpha=self.focal_alpha, gamma=self.focal_gamma)
        if self.cls_loss == "sigmoid_focal":
            return self.sigmoid_focal_per_anchor(logits, labels, foreground)
        one_hot = F.one_hot(labels.clamp(min=0), self.num_classes).to(logits.dtype)
        one_hot = one_hot * foreground[..., None].to(logits.dtype)
        if self.cls_loss == "bce":
            per_class = L.binary_cross_entropy(logits, one_hot)
        elif self.cls_loss == "balanced_bce":
            per_class = L.alpha_balanced_cross_entropy(logits, one_hot, alpha=self.focal_alpha)
        elif self.cls_loss == "focal_star":
            per_class = L.focal_loss_star(
                logits, one_hot, gamma_star=self.focal_star_gamma, beta_star=self.focal_star_beta
            )
        else:
            raise ValueError(f"unknown cls_loss {self.cls_loss!r}")
        return per_class.sum(-1)

    def sigmoid_focal_per_anchor(self, logits: Tensor, labels: Tensor, foreground: Tensor) -> Tensor:
        """Sigmoid focal loss (paper eq. 5) summed over classes, ``[B, A]``, for one-hot targets
        without building them: every logit is first scored as a negative,
        (1-α) σ(x)^γ softplus(x), then each foreground anchor's true-class term is swapped for the
        positive one, α σ(-x)^γ softplus(-x). Equal to :func:`losses.sigmoid_focal_loss` on the
        one-hot targets; float32, finite for logits of ±100."""
        alpha, gamma = self.focal_alpha, self.focal_gamma
        x = logits.float()
        per_anchor = ((1 - alpha) * torch.sigmoid(x).pow(gamma) * F.softplus(x)).sum(-1)
        image, anchor = foreground.nonzero(as_tuple=True)
        x_true = x[image, anchor, labels[image, anchor]]
        positive = alpha * torch.sigmoid(-x_true).pow(gamma) * F.softplus(-x_true)
        as_negative = (1 - alpha) * torch.sigmoid(x_true).pow(gamma) * F.softplus(x_true)
        return per_anchor.index_put((image, anchor), positive - as_negative, accumulate=True)

    def box_regression_loss(self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """Per-anchor loss ``[F]`` for foreground deltas/anchors/matched boxes ``[F, 4]``."""
        if self.box_loss == "giou":
            return L.giou_loss(self.box_coder.decode(deltas, anchors), gt_boxes)
        target = self.box_coder.encode(gt_boxes, anchors)
        if self.box_loss == "l1":
            return L.l1_loss(deltas.float(), target).sum(-1)
        return L.smooth_l1_loss(deltas.float(), target, beta=self.smooth_l1_beta).sum(-1)

    def normalize(self, per_image_sums: Tensor, num_foreground: Tensor) -> Tensor:
        """Scalar loss from per-image loss sums ``[B]`` and foreground counts ``[B]`` (float32).

        "per_image": ``mean(sums / max(counts, 1))``; "batch": ``sum(sums) / max(sum(counts), 1)``.

        Under DistributedDataParallel (``torch.distributed`` initialised with world size W > 1,
        module in training mode, autograd on), "batch" divides by ``max(N, 1) / W`` where N is the
        foreground count of the *global* batch (one all-reduce of the count per step, as DETR
        normalises by ``num_boxes``; detectron2's RetinaNet instead divides by an exponential
        moving average of the all-reduced count, ``loss_normalizer``, momentum 0.9).
        DDP averages the W gradients, so the result is exactly the gradient of the global batch's
        loss ``sum_all / max(N, 1)``; each process's loss value is then W times its share, and the
        mean of the W values is the global-batch loss. "per_image" needs no communication: with
        equal per-process batches the mean of the W per-process means is the global mean.
        """
        if self.normalization == "per_image":
            return (per_image_sums / num_foreground.clamp(min=1)).mean()
        total = num_foreground.sum()
        world_size = _training_world_size(self.training)
        if world_size > 1:
            total = total.detach().clone()
            dist.all_reduce(total)
            return per_image_sums.sum() * world_size / total.clamp(min=1)
        return per_image_sums.sum() / total.clamp(min=1)

    def forward(
        self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Args: cls_logits ``[B, A, K(+1)]``; box_deltas ``[B, A, 4]``; anchors float32 ``[A, 4]``
        xyxy pixels; targets: per image "boxes" ``[N, 4]`` xyxy pixels (resized frame), "labels"
        int64 ``[N]`` in [0, K), optional "iscrowd" ``[N]``. Images without boxes are valid.
        Returns scalar float32 "loss_cls" and "loss_box"."""
        gt = pad_targets(targets, cls_logits.device)
        matched = self.matcher(anchors, gt["boxes"], gt["valid"], gt["crowd"])
        foreground = matched >= 0
        safe = matched.clamp(min=0)
        labels = torch.gather(gt["labels"], 1, safe)
        num_foreground = foreground.sum(1).float()

        cls_per_anchor = self.classification_loss(cls_logits, labels, foreground)
        cls_per_anchor = cls_per_anchor * (matched != IGNORE).to(cls_per_anchor.dtype)
        loss_cls = self.normalize(cls_per_anchor.float().sum(1), num_foreground)

        image_of_fg, anchor_of_fg = foreground.nonzero(as_tuple=True)
        matched_boxes = gt["boxes"][image_of_fg, safe[image_of_fg, anchor_of_fg]]
        box_per_fg = self.box_regression_loss(
            box_deltas[image_of_fg, anchor_of_fg], anchors[anchor_of_fg], matched_boxes
        )
        box_sums = torch.zeros(len(targets), dtype=torch.float32, device=box_deltas.device)
        box_sums = box_sums.index_add(0, image_of_fg, box_per_fg.float())
        loss_box = self.normalize(box_sums, num_foreground) * self.box_loss_weight
        return {"loss_cls": loss_cls, "loss_box": loss_box}
