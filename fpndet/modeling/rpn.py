"""Region Proposal Network on a feature pyramid (FPN paper §4.1 "Feature Pyramid Networks for
RPN"; Faster R-CNN §3.1).

One head (3x3 conv + ReLU, then sibling 1x1 convs for A objectness logits and 4A box deltas) is
shared by all levels P2..P6; each level carries anchors of one size (32² on P2 ... 512² on P6)
and three aspect ratios (A = 3). Training: anchors with IoU ≥ 0.7 with a ground-truth box (or a
box's best anchors) are positive, IoU < 0.3 negative; 256 anchors per image are sampled, at most
half positive; anchors crossing the image border are kept (as torchvision and detectron2).
Loss: binary cross-entropy on objectness + smooth-L1 (β = 1/9) on the positives' deltas, both
divided by the number of sampled anchors of the batch (torchvision).

Proposals: per level the ``pre_nms_topk`` best anchors (2000 train / 1000 test), decoded,
clipped, boxes smaller than ``min_size`` removed, score threshold, NMS 0.7 within each (image,
level), then the best ``post_nms_topk`` (2000 train / 1000 test, torchvision's numbers; detectron2's
FPN configs keep 1000 in training) per image, or, in training, over the whole batch (Detectron1:
2000 per batch). All images are processed together; the only
Python loop is over pyramid levels.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from . import losses as L
from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .box_ops import batched_class_nms, boxes_at_least, clip_boxes
from .heads import flatten_level
from .matcher import AnchorMatcher
from .poolers import flatten_rois
from .postprocess import first_n_per_image
from .sampling import BalancedSampler, labels_from_matches


class Proposals(NamedTuple):
    """Candidate boxes of a batch, padded to P per image.

    boxes: float32 ``[B, P, 4]`` xyxy pixels of the network-input (resized) images; scores:
    ``[B, P]`` (objectness probabilities for RPN proposals; 1 for external ones); valid: bool
    ``[B, P]``, True for real boxes. Real boxes come first in each row, by decreasing score.
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor

    @classmethod
    def from_list(cls, boxes: Sequence[Tensor], scores: Optional[Sequence[Tensor]] = None) -> "Proposals":
        """Pad per-image ``[N_i, 4]`` boxes (and ``[N_i]`` scores, default 1) into a batch."""
        image, flat = flatten_rois(boxes)
        flat_scores = torch.cat(list(scores)).float() if scores is not None else flat.new_ones(len(flat))
        return pack_per_image(image, flat.float(), flat_scores, len(boxes))

    def to_list(self) -> list[dict[str, Tensor]]:
        """One ``{"boxes" [N_i, 4], "scores" [N_i]}`` per image."""
        return [{"boxes": b[v], "scores": s[v]} for b, s, v in zip(self.boxes, self.scores, self.valid)]


class RPNOutputs(NamedTuple):
    """Raw RPN outputs of a padded batch: objectness logits ``[B, A]``, deltas ``[B, A, 4]``,
    anchors float32 ``[A, 4]`` xyxy pixels (shared), anchors_per_level (counts, lowest first)."""

    objectness: Tensor
    deltas: Tensor
    anchors: Tensor
    anchors_per_level: list[int]


class RPNHead(nn.Module):
    """Shared RPN head: ``conv_depth`` x (3x3 conv d→d + ReLU), then 1x1 convs to A objectness
    logits and 4A deltas; weights N(0, 0.01), biases 0 (FPN §4.1, Faster R-CNN §3.1).

    Args (keyword-only):
        in_channels: d (256).
        num_anchors: A per location (3).
        conv_depth: 3x3 convs (1; torchvision's v2 uses 2).

    ``forward(features)`` with ``[B, d, H_l, W_l]`` per level returns objectness
    ``[B, sum_l H_l W_l A]`` and deltas ``[B, sum_l H_l W_l A, 4]`` (location-major,
    anchor-minor, as :class:`AnchorGenerator`).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            )
        )
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        objectness, deltas = [], []
        for x in features:
            x = self.conv(x)
            objectness.append(flatten_level(self.objectness(x), 1)[..., 0])
            deltas.append(flatten_level(self.deltas(x), 4))
        return torch.cat(objectness, dim=1), torch.cat(deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """The RPN stage: head outputs, proposals and (with ground truth) losses.

    Args (keyword-only):
        head: an :class:`RPNHead`.
        anchor_generator: an :class:`AnchorGenerator` with one size per level (32..512 on P2..P6).
        matcher: an :class:`AnchorMatcher` (0.7 / 0.3, low-quality matches).
        sampler: a :class:`BalancedSampler` (256 per image, positive fraction 0.5).
        box_coder: a :class:`BoxCoder` with weights (1, 1, 1, 1).
        pre_nms_topk: (training, testing) anchors kept per level and image before NMS (2000, 1000).
        post_nms_topk: (training, testing) proposals kept after NMS (2000, 1000).
        post_nms_topk_per: "image" (torchvision, detectron2) or "batch" (Detectron1: in training the best
            ``post_nms_topk`` over all images of the batch; per image at test time).
        nms_thresh: IoU threshold of the NMS within each (image, level) (0.7).
        min_size: proposals narrower or lower than this (pixels) are dropped (1e-3).
        score_thresh: proposals need objectness probability ≥ this (0.0).
        box_loss: "smooth_l1" (β = ``smooth_l1_beta``, 1/9 as torchvision) or "l1".

    Raises:
        ValueError: unknown ``post_nms_topk_per`` or ``box_loss``.
    """

    def __init__(
        self,
        *,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        matcher: AnchorMatcher,
        sampler: BalancedSampler,
        box_coder: BoxCoder,
        pre_nms_topk: tuple[int, int] = (2000, 1000),
        post_nms_topk: tuple[int, int] = (2000, 1000),
        post_nms_topk_per: str = "image",
        nms_thresh: float = 0.7,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
    ):
        super().__init__()
        if post_nms_topk_per not in ("image", "batch"):
            raise ValueError(f"post_nms_topk_per must be 'image' or 'batch', got {post_nms_topk_per!r}")
        if box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.pre_nms_topk = tuple(pre_nms_topk)
        self.post_nms_topk = tuple(post_nms_topk)
        self.post_nms_topk_per = post_nms_topk_per
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.score_thresh = float(score_thresh)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)

    def outputs(self, features: Sequence[Tensor], padded_size: tuple[int, int]) -> RPNOutputs:
        """Head outputs and anchors for the pyramid ``features`` of a batch padded to (H, W) pixels."""
        objectness, deltas = self.head(features)
        anchors, counts = self.anchor_generator(tuple(padded_size), [tuple(f.shape[-2:]) for f in features])
        return RPNOutputs(objectness, deltas, anchors, counts)

    # ------------------------------------------------------------------------------------
    # Proposals
    # ------------------------------------------------------------------------------------

    def top_anchors(self, objectness: Tensor, anchors_per_level: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Per image and level, the ``pre_nms_topk`` highest objectness logits.

        Returns int64 anchor indices ``[B, K]`` (levels concatenated, each by decreasing logit)
        and the level index ``[K]`` (0 = lowest level) of each column.
        """
        topk = self.pre_nms_topk[0 if self.training else 1]
        indices, levels, start = [], [], 0
        for level, count in enumerate(anchors_per_level):
            k = min(topk, count)
            indices.append(objectness[:, start : start + count].topk(k, dim=1).indices + start)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=objectness.device))
            start += count
        return torch.cat(indices, dim=1), torch.cat(levels)

    @torch.no_grad()
    def proposals(self, outputs: RPNOutputs, image_sizes: Sequence[tuple[int, int]]) -> Proposals:
        """Proposals of each image (no gradient), in network-input pixels.

        Args:
            outputs: :meth:`outputs` of the batch.
            image_sizes: (h, w) of each resized image before padding (boxes are clipped to it).

        Returns:
            :class:`Proposals` with at most ``post_nms_topk`` real boxes per image (or in all
            with ``post_nms_topk_per="batch"`` in training), by decreasing objectness.
        """
        objectness, deltas, anchors = outputs.objectness.detach(), outputs.deltas.detach(), outputs.anchors
        batch, device = objectness.shape[0], objectness.device
        index, level = self.top_anchors(objectness, outputs.anchors_per_level)
        scores = torch.sigmoid(objectness.gather(1, index).float())
        boxes = self.box_coder.decode(deltas.gather(1, index[..., None].expand(-1, -1, 4)), anchors[index])
        sizes = torch.tensor(image_sizes, device=device)
        boxes = clip_boxes(boxes, sizes[:, None, :])
        keep = boxes_at_least(boxes, self.min_size) & (scores >= self.score_thresh)
        image, column = keep.nonzero(as_tuple=True)
        num_levels = len(outputs.anchors_per_level)
        kept = batched_class_nms(
            boxes[image, column], scores[image, column], image * num_levels + level[column], self.nms_thresh
        )
        post = self.post_nms_topk[0 if self.training else 1]
        if self.post_nms_topk_per == "image" or not self.training:
            kept = kept[first_n_per_image(image[kept], post)]
        else:
            kept = kept[:post]
        kept = kept[torch.sort(image[kept], stable=True).indices]
        return pack_per_image(image[kept], boxes[image[kept], column[kept]], scores[image[kept], column[kept]], batch)

    # ------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------

    def anchor_labels(self, anchors: Tensor, gt: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Match anchors to the padded ground truth ``gt`` (see ``criterion.pad_targets``).

        Returns sampler labels int64 ``[B, A]`` (POSITIVE / NEGATIVE / IGNORED) and the matched
        gt index ``[B, A]`` (clamped to ≥ 0: meaningful for positives only).
        """
        matches = self.matcher(anchors, gt["boxes"], gt["valid"], gt["crowd"])
        return labels_from_matches(matches), matches.clamp(min=0)

    def losses(self, outputs: RPNOutputs, gt: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss_objectness", "loss_rpn_box"}`` for the padded ground truth ``gt``.

        Objectness: BCE over the sampled anchors of the batch, averaged; box: smooth-L1 (or L1)
        of the positives' deltas (dx, dy, dw, dh) summed and divided by the number of sampled
        anchors (torchvision's normalisation).
        """
        labels, matched = self.anchor_labels(outputs.anchors, gt)
        positive, negative = self.sampler(labels)
        sampled = positive | negative
        num_sampled = sampled.sum().clamp(min=1)
        objectness = outputs.objectness[sampled]
        loss_objectness = L.binary_cross_entropy(objectness, positive[sampled].float(), reduction="sum") / num_sampled
        image, anchor = positive.nonzero(as_tuple=True)
        target = self.box_coder.encode(gt["boxes"][image, matched[image, anchor]], outputs.anchors[anchor])
        beta = self.smooth_l1_beta if self.box_loss == "smooth_l1" else 0.0
        loss_box = L.smooth_l1_loss(outputs.deltas[image, anchor], target, beta=beta, reduction="sum") / num_sampled
        return {"loss_objectness": loss_objectness, "loss_rpn_box": loss_box}


def pack_per_image(image: Tensor, boxes: Tensor, scores: Tensor, batch: int) -> Proposals:
    """Pack entries sorted by image (``image`` int64 ``[M]``, ``boxes [M, 4]``, ``scores [M]``)
    into :class:`Proposals` padded to the largest per-image count."""
    counts = torch.bincount(image, minlength=batch)
    most = max(int(counts.max()) if counts.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(image), device=image.device) - starts[image]
    packed = boxes.new_zeros((batch, most, 4))
    packed_scores = scores.new_zeros((batch, most))
    valid = torch.zeros((batch, most), dtype=torch.bool, device=image.device)
    packed[image, slot] = boxes
    packed_scores[image, slot] = scores
    valid[image, slot] = True
    return Proposals(packed, packed_scores, valid)
