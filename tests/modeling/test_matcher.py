from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from fpndet.modeling.box_ops import pairwise_intersection, pairwise_iou
from fpndet.modeling.matcher import BACKGROUND, IGNORE, AnchorMatcher


def random_boxes(n: int, *, generator: torch.Generator, size: float = 200.0, max_side: float = 80.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * max_side + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def reference_match(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor, gt_crowd: torch.Tensor, crowd_ioa: float = 0.5
) -> torch.Tensor:
    """Per image: torchvision's Matcher(0.5, 0.4, low-quality) on the valid non-crowd boxes, then crowd ignores."""
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    rows = []
    for b in range(gt_boxes.shape[0]):
        keep = (gt_valid[b] & ~gt_crowd[b]).nonzero().flatten()
        if keep.numel() == 0:
            labels = torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.int64)
        else:
            labels = matcher(box_iou(gt_boxes[b, keep], anchors))
            labels = torch.where(labels >= 0, keep[labels.clamp(min=0)], labels)
        crowd_boxes = gt_boxes[b, gt_valid[b] & gt_crowd[b]]
        if crowd_boxes.numel():
            ioa = pairwise_intersection_loop(crowd_boxes, anchors) / anchor_area
            labels = torch.where((labels == BACKGROUND) & (ioa >= crowd_ioa).any(0), IGNORE, labels)
        rows.append(labels)
    return torch.stack(rows)


def pairwise_intersection_loop(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Reference intersections ``[N, A]`` built one box at a time (test only)."""
    rows = []
    for box in boxes:
        w = (torch.minimum(box[2], anchors[:, 2]) - torch.maximum(box[0], anchors[:, 0])).clamp(min=0)
        h = (torch.minimum(box[3], anchors[:, 3]) - torch.maximum(box[1], anchors[:, 1])).clamp(min=0)
        rows.append(w * h)
    return torch.stack(rows)


def test_pairwise_iou_equals_torchvision_bitwise():
    g = torch.Generator().manual_seed(0)
    gt = random_boxes(2 * 7, generator=g).view(2, 7, 4)
    anchors = random_boxes(300, generator=g)
    ours = pairwise_iou(gt, anchors)
    assert ours.shape == (2, 7, 300)
    for b in range(2):
        assert torch.equal(ours[b], box_iou(gt[b], anchors))
    torch.testing.assert_close(pairwise_intersection(gt[0], anchors), pairwise_intersection_loop(gt[0], anchors))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_chunk_elements", [2**24, 50, 1])
def test_matches_torchvision_reference_on_random_batches(seed, max_chunk_elements):
    g = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 5, (1,), generator=g))
    num_gt = int(torch.randint(1, 9, (1,), generator=g))
    num_anchors = int(torch.randint(50, 400, (1,), generator=g))
    anchors = random_boxes(num_anchors, generator=g)
    gt_boxes = random_boxes(batch * num_gt, generator=g).view(batch, num_gt, 4)
    gt_valid = torch.rand(batch, num_gt, generator=g) < 0.8
    gt_valid[0] = False  # first image has no boxes at all
    gt_crowd = torch.rand(batch, num_gt, generator=g) < 0.2
    if num_gt >= 2:  # an exact duplicate box: IoU ties between gts, lowest index must win
        gt_boxes[-1, 1] = gt_boxes[-1, 0]
    anchors[-1] = anchors[0]  # duplicate anchor: ties in a gt's best IoU
    ours = AnchorMatcher(max_chunk_elements=max_chunk_elements)(anchors, gt_boxes, gt_valid, gt_crowd)
    expected = reference_match(anchors, gt_boxes, gt_valid, gt_crowd)
    assert ours.dtype == torch.int64 and ours.shape == (batch, num_anchors)
    assert torch.equal(ours, expected)
    assert (ours[0] == BACKGROUND).all() or gt_crowd[0].any()


def test_hand_made_thresholds_and_low_quality_match():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU with gt0 = 60/100 = 0.6      -> foreground (gt 0)
            [0.0, 0.0, 10.0, 40.0 / 3.0],  # IoU with gt0 = 60/133.3 = 0.45 -> ignore
            [100.0, 100.0, 110.0, 110.0],  # IoU 0 with everything -> background
            [200.0, 200.0, 220.0, 220.0],  # IoU with gt1 = 100/400 = 0.25, gt1's best -> low-quality match
        ]
    )
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 6.0], [200.0, 200.0, 210.0, 210.0]]])
    ious = box_iou(gt_boxes[0], anchors)
    assert ious[0, 0].item() == pytest.approx(0.6)
    assert 0.4 <= ious[0, 1].item() < 0.5 and ious[:, 1].max() == ious[0, 1]
    assert ious[1, 3].item() == pytest.approx(0.25)
    ones = torch.ones(1, 2, dtype=torch.bool)
    labels = AnchorMatcher()(anchors, gt_boxes, ones, ~ones)
    # gt0's best anchor is anchor 0 (0.6), so the low-quality rule leaves anchor 1 ignored.
    assert labels.tolist() == [[0, IGNORE, BACKGROUND, 1]]
    strict = AnchorMatcher(allow_low_quality_matches=False)(anchors, gt_boxes, ones, ~ones)
    assert strict.tolist() == [[0, IGNORE, BACKGROUND, BACKGROUND]]


def test_low_quality_restores_the_anchors_own_best_gt():
    # gt1's best anchor (IoU 0.25) overlaps gt0 more (IoU 0.3): it gets gt0 back, as in torchvision.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 3.0], [0.0, 0.0, 5.0, 5.0]]])
    ones = torch.ones(1, 2, dtype=torch.bool)
    assert AnchorMatcher()(anchors, gt_boxes, ones, ~ones).tolist() == [[0]]
    assert torch.equal(AnchorMatcher()(anchors, gt_boxes, ones, ~ones), reference_match(anchors, gt_boxes, ones, ~ones))


def test_gt_without_any_overlap_copies_torchvision():
    # A gt far from every anchor has best IoU 0: torchvision then "restores" every anchor with IoU 0
    # to it, i.e. those anchors get their own argmax gt (here gt 0). We copy that on purpose.
    g = torch.Generator().manual_seed(3)
    anchors = random_boxes(100, generator=g)
    gt_boxes = torch.stack([random_boxes(2, generator=g), torch.tensor([[5000.0, 5000.0, 5010.0, 5010.0]] * 2)])
    gt_boxes = gt_boxes.view(1, 4, 4)
    valid = torch.ones(1, 4, dtype=torch.bool)
    crowd = torch.zeros(1, 4, dtype=torch.bool)
    ours = AnchorMatcher()(anchors, gt_boxes, valid, crowd)
    assert torch.equal(ours, reference_match(anchors, gt_boxes, valid, crowd))
    zero_overlap = box_iou(gt_boxes[0, :2], anchors).amax(0) == 0
    assert zero_overlap.any() and (ours[0, zero_overlap] == 0).all()


def test_padding_never_matches():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    # Padding rows identical to the anchors (IoU 1) or NaN must be invisible.
    gt_boxes = torch.tensor([[[50.0, 50.0, 60.0, 61.0], [0.0, 0.0, 10.0, 10.0], [float("nan")] * 4]])
    valid = torch.tensor([[True, False, False]])
    labels = AnchorMatcher()(anchors, gt_boxes, valid, torch.zeros_like(valid))
    assert labels.tolist() == [[BACKGROUND, 0]]


def test_crowd_boxes_are_ignored_never_matched():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # identical to the crowd box -> IGNORE, not matched
            [34.0, 20.0, 44.0, 30.0],  # 60% inside the crowd region -> IGNORE
            [36.0, 20.0, 46.0, 30.0],  # 40% inside -> BACKGROUND
            [100.0, 100.0, 110.0, 110.0],  # matched to the normal gt
            [101.0, 100.0, 111.0, 110.0],  # IoU 0.82 with gt 2, inside crowd -> stays foreground
        ]
    )
    gt_boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 40.0], [100.0, 100.0, 110.0, 110.0], [100.0, 100.0, 120.0, 120.0]]]
    )
    valid = torch.ones(1, 4, dtype=torch.bool)
    crowd = torch.tensor([[True, True, False, True]])
    labels = AnchorMatcher()(anchors, gt_boxes, valid, crowd)
    assert labels.tolist() == [[IGNORE, IGNORE, BACKGROUND, 2, 2]]
    assert torch.equal(labels, reference_match(anchors, gt_boxes, valid, crowd))
    # Only crowd boxes in the image: nothing is foreground, crowd-covered anchors are ignored.
    only_crowd = AnchorMatcher()(anchors, gt_boxes, valid, torch.ones_like(crowd))
    assert only_crowd.tolist() == [[IGNORE, IGNORE, BACKGROUND, IGNORE, IGNORE]]
    stricter = AnchorMatcher(crowd_ioa=0.7)(anchors, gt_boxes, valid, crowd)
    assert stricter.tolist() == [[IGNORE, BACKGROUND, BACKGROUND, 2, 2]]


def test_empty_ground_truth_and_empty_anchors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    no_gt = torch.zeros(2, 0, 4)
    mask = torch.zeros(2, 0, dtype=torch.bool)
    assert AnchorMatcher()(anchors, no_gt, mask, mask).tolist() == [[BACKGROUND] * 3] * 2
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    one = torch.ones(1, 1, dtype=torch.bool)
    assert AnchorMatcher()(torch.zeros(0, 4), gt, one, ~one).shape == (1, 0)


def test_rejects_bad_shapes_and_thresholds():
    anchors = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="gt_boxes"):
        AnchorMatcher()(anchors, torch.zeros(2, 4), torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_valid"):
        AnchorMatcher()(anchors, torch.zeros(1, 2, 4), torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="background_iou"):
        AnchorMatcher(foreground_iou=0.4, background_iou=0.5)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from fpndet.modeling.matcher import AnchorMatcher

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 1000
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 300 + 4], 1)
    anchors, gt = boxes(200_000), boxes(500)[None]
    valid, crowd = torch.ones(1, 500, dtype=torch.bool), torch.zeros(1, 500, dtype=torch.bool)
    crowd[0, :5] = True
    AnchorMatcher()(anchors[:100], gt, valid, crowd)  # warm-up: lazy initialisation is not the matcher's
    try:  # reset the high-water mark to the current RSS where the kernel allows it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    labels = AnchorMatcher(max_chunk_elements=int(sys.argv[1]))(anchors, gt, valid, crowd)
    print(json.dumps({"peak_growth": status("VmHWM") - before, "foreground": int((labels >= 0).sum())}))
    """
)


def _peak_growth(max_chunk_elements: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(max_chunk_elements)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/self/status")
def test_chunked_matching_bounds_peak_memory():
    """500 boxes x 200k anchors: one [1, 500, 200k] float32 intermediate alone is 400 MB."""
    chunked = _peak_growth(2**24)
    unchunked = _peak_growth(2**62)
    one_full_intermediate = 500 * 200_000 * 4
    assert chunked["foreground"] == unchunked["foreground"] > 0
    assert chunked["peak_growth"] < 1.2e9
    # Chunked: below even a single full-size intermediate (measured ~0.23 GB).
    assert chunked["peak_growth"] < one_full_intermediate
    # One chunk: several full-size intermediates live at once (measured ~1.2 GB).
    assert unchunked["peak_growth"] > 2 * one_full_intermediate
    assert unchunked["peak_growth"] > 3 * chunked["peak_growth"]


# ------------------------------------------------------------------------------------------
# Per-image candidates [B, N, 4] (Fast R-CNN RoIs) against a per-image reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fg, bg, low_quality", [(0.5, 0.5, False), (0.7, 0.3, True)])
def test_per_image_candidates_equal_per_image_matching(fg, bg, low_quality):
    torch.manual_seed(3)
    batch, num_candidates = 3, 400
    xy = torch.rand(batch, num_candidates, 2) * 300
    candidates = torch.cat([xy, xy + 5 + torch.rand(batch, num_candidates, 2) * 120], dim=-1)
    gt_xy = torch.rand(batch, 6, 2) * 300
    gt = torch.cat([gt_xy, gt_xy + 10 + torch.rand(batch, 6, 2) * 100], dim=-1)
    gt_valid = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [False] * 6])
    gt_crowd = torch.zeros(batch, 6, dtype=torch.bool)
    gt_crowd[0, 5] = True
    candidate_valid = torch.ones(batch, num_candidates, dtype=torch.bool)
    candidate_valid[1, 300:] = False
    candidates[1, 300:] = 0.0  # padding
    matcher = AnchorMatcher(foreground_iou=fg, background_iou=bg, allow_low_quality_matches=low_quality,
                            max_chunk_elements=1000)
    batched = matcher(candidates, gt, gt_valid, gt_crowd, candidate_valid)
    assert batched.shape == (batch, num_candidates)
    for image in range(batch):
        real = candidate_valid[image]
        single = matcher(candidates[image][real], gt[image : image + 1], gt_valid[image : image + 1],
                         gt_crowd[image : image + 1])
        assert torch.equal(batched[image][real], single[0]), image
        assert bool((batched[image][~real] == IGNORE).all())
    assert bool((batched[2] == BACKGROUND).all())
    assert bool((batched[0] >= 0).any())


def test_per_image_candidate_shapes_are_checked():
    matcher = AnchorMatcher()
    gt = torch.zeros(2, 1, 4)
    mask = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="differ in B"):
        matcher(torch.zeros(3, 5, 4), gt, mask, ~mask)
    with pytest.raises(ValueError, match="anchor_valid"):
        matcher(torch.zeros(2, 5, 4), gt, mask, ~mask, torch.ones(2, 4, dtype=torch.bool))
