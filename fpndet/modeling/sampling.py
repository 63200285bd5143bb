"""Balanced positive/negative sampling of training examples (Faster R-CNN §3.1.3; FPN paper §5.1,
§5.2): each image contributes ``batch_size_per_image`` examples, at most
``positive_fraction`` of them positive, the rest filled with negatives.

RPN: 256 anchors per image, up to half positive. Fast R-CNN: 512 RoIs per image, up to 25 %
foreground. The choice is uniform at random without replacement, like torchvision's
``BalancedPositiveNegativeSampler``, but done for all images at once: every candidate draws a
random key and each image keeps its best-keyed positives/negatives (one ``topk`` over ``[B, N]``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

POSITIVE = 1
NEGATIVE = 0
IGNORED = -1
PADDING = -2
"""Labels understood by :class:`BalancedSampler` (``[B, N]`` int): a positive, a negative, a
real candidate never sampled (e.g. between the IoU thresholds), a padding slot (no candidate)."""

Choice = Callable[[Tensor], "tuple[Tensor, Tensor]"]


def labels_from_matches(matches: Tensor, present: Optional[Tensor] = None) -> Tensor:
    """Sampler labels ``[B, N]`` from :class:`~fpndet.modeling.matcher.AnchorMatcher` output:
    a matched gt index (>= 0) is POSITIVE, ``BACKGROUND`` NEGATIVE, ``IGNORE`` IGNORED, and
    slots where ``present`` (bool ``[B, N]``) is False PADDING."""
    from .matcher import BACKGROUND, IGNORE

    labels = torch.full_like(matches, POSITIVE)
    labels = torch.where(matches == BACKGROUND, NEGATIVE, labels)
    labels = torch.where(matches == IGNORE, IGNORED, labels)
    return labels if present is None else labels.masked_fill(~present, PADDING)


class BalancedSampler:
    """Chooses positives and negatives per image.

    Args (keyword-only):
        batch_size_per_image: examples per image (256 for the RPN, 512 for Fast R-CNN).
        positive_fraction: upper bound of the positive share (0.5 RPN, 0.25 Fast R-CNN); the
            number of positives is ``min(#positives, int(batch_size_per_image * positive_fraction))``
            and negatives fill up to ``batch_size_per_image`` when there are enough.
        generator: optional ``torch.Generator`` (on the labels' device) for reproducible draws.
        choose: optional function replacing the random draw: ``choose(labels [B, N])`` returns
            ``(positive_mask, negative_mask)``, two bool ``[B, N]`` tensors (used by tests to
            make two implementations pick the same examples).

    Raises:
        ValueError: non-positive ``batch_size_per_image`` or ``positive_fraction`` outside [0, 1].
    """

    def __init__(
        self,
        *,
        batch_size_per_image: int,
        positive_fraction: float,
        generator: Optional[torch.Generator] = None,
        choose: Optional[Choice] = None,
    ):
        if batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image must be positive, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.generator = generator
        self.choose = choose

    def quotas(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """int64 ``[B]`` numbers of positives and negatives each image will get."""
        num_pos = (labels == POSITIVE).sum(dim=1).clamp(max=int(self.batch_size_per_image * self.positive_fraction))
        num_neg = (labels == NEGATIVE).sum(dim=1)
        return num_pos, torch.minimum(num_neg, self.batch_size_per_image - num_pos)

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Sample.

        Args:
            labels: int ``[B, N]`` with :data:`POSITIVE`, :data:`NEGATIVE`, :data:`IGNORED` or
                :data:`PADDING` per candidate (anchor or RoI).

        Returns:
            ``(positive_mask, negative_mask)``: bool ``[B, N]``, disjoint, true only on
            positive resp. negative labels, per image as many as :meth:`quotas` says.

        Raises:
            ValueError: ``labels`` is not 2-D.
        """
        if labels.ndim != 2:
            raise ValueError(f"labels must be [B, N], got {list(labels.shape)}")
        if self.choose is not None:
            return self.choose(labels)
        num_pos, num_neg = self.quotas(labels)
        keys = torch.rand(labels.shape, generator=self.generator, device=labels.device)
        return pick_by_key(labels == POSITIVE, num_pos, keys), pick_by_key(labels == NEGATIVE, num_neg, keys)


def pick_by_key(candidates: Tensor, counts: Tensor, keys: Tensor) -> Tensor:
    """Per row, the ``counts[b]`` candidates with the largest ``keys``.

    Args:
        candidates: bool ``[B, N]``.
        counts: int64 ``[B]``, at most the number of candidates of each row.
        keys: float ``[B, N]`` in [0, 1) (ties broken by ``topk``).

    Returns:
        bool ``[B, N]`` mask of the chosen entries.
    """
    chosen = torch.zeros_like(candidates)
    most = int(counts.max()) if counts.numel() else 0
    if most == 0:
        return chosen
    ranked = keys.masked_fill(~candidates, -1.0).topk(most, dim=1).indices
    in_quota = torch.arange(most, device=counts.device)[None, :] < counts[:, None]
    return chosen.scatter_(1, ranked, in_quota)
