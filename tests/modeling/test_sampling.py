"""Balanced sampler, batched over images, against a per-image reference."""
from __future__ import annotations

import pytest
import torch

from fpndet.modeling.sampling import IGNORED, NEGATIVE, PADDING, POSITIVE, BalancedSampler, pick_by_key


def random_labels(batch: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    choices = torch.tensor([POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE, IGNORED, PADDING])
    labels = choices[torch.randint(len(choices), (batch, n), generator=generator)]
    labels[0, : n // 2] = NEGATIVE  # an image with many positives, one with few
    labels[1] = torch.where(labels[1] == POSITIVE, NEGATIVE, labels[1])
    labels[1, :3] = POSITIVE
    return labels


def reference_pick(candidates: torch.Tensor, count: int, keys: torch.Tensor) -> torch.Tensor:
    """One image: the ``count`` candidates of largest key."""
    index = torch.nonzero(candidates).squeeze(1)
    chosen = index[torch.argsort(keys[index], descending=True)[:count]]
    mask = torch.zeros_like(candidates)
    mask[chosen] = True
    return mask


@pytest.mark.parametrize("batch_size, fraction", [(256, 0.5), (512, 0.25), (16, 1.0)])
def test_batched_sampling_equals_per_image_reference(batch_size, fraction):
    labels = random_labels(4, 3000, seed=batch_size)
    sampler = BalancedSampler(batch_size_per_image=batch_size, positive_fraction=fraction,
                              generator=torch.Generator().manual_seed(7))
    positive, negative = sampler(labels)
    keys = torch.rand(labels.shape, generator=torch.Generator().manual_seed(7))
    for image in range(len(labels)):
        num_pos = min(int((labels[image] == POSITIVE).sum()), int(batch_size * fraction))
        num_neg = min(int((labels[image] == NEGATIVE).sum()), batch_size - num_pos)
        assert torch.equal(positive[image], reference_pick(labels[image] == POSITIVE, num_pos, keys[image]))
        assert torch.equal(negative[image], reference_pick(labels[image] == NEGATIVE, num_neg, keys[image]))
        assert int(positive[image].sum()) == num_pos and int(negative[image].sum()) == num_neg
    assert not bool((positive & negative).any())
    assert int(positive[1].sum()) == 3 and int((positive[1] | negative[1]).sum()) == batch_size


def test_sampling_is_uniform_over_candidates():
    labels = torch.full((1, 10), NEGATIVE)
    sampler = BalancedSampler(batch_size_per_image=3, positive_fraction=0.5, generator=torch.Generator().manual_seed(0))
    counts = sum(sampler(labels)[1].int() for _ in range(3000))
    assert int(counts.sum()) == 9000
    assert float(counts.float().min()) > 800 and float(counts.float().max()) < 1000


def test_injected_choice_and_argument_checks():
    labels = torch.tensor([[POSITIVE, NEGATIVE]])
    picked = (torch.tensor([[True, False]]), torch.tensor([[False, False]]))
    assert BalancedSampler(batch_size_per_image=2, positive_fraction=0.5, choose=lambda _: picked)(labels) is picked
    with pytest.raises(ValueError, match="batch_size_per_image"):
        BalancedSampler(batch_size_per_image=0, positive_fraction=0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(batch_size_per_image=2, positive_fraction=1.5)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        BalancedSampler(batch_size_per_image=2, positive_fraction=0.5)(labels[0])
    assert not pick_by_key(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), torch.rand(2, 3)).any()
