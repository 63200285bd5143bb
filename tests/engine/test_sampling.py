"""ResumableSampler (per-epoch permutation, rank shares, start_batch) and SeededAugmentation
(augmentation depending only on seed, epoch and index)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fpndet.engine.sampling import ResumableSampler, SeededAugmentation


def epoch_order(sampler: ResumableSampler, epoch: int, start_batch: int = 0) -> list[int]:
    sampler.set_epoch(epoch, start_batch)
    order = list(sampler)
    assert len(order) == len(sampler)
    return order


def test_one_rank_sees_every_index_once_per_epoch_up_to_the_dropped_batch():
    sampler = ResumableSampler(num_items=18, batch_size=4, seed=3)
    assert sampler.batches_per_epoch() == 4
    dropped = []
    for epoch in range(4):
        order = epoch_order(sampler, epoch)
        assert len(order) == 16 and len(set(order)) == 16 and set(order) <= set(range(18))
        dropped.append(frozenset(range(18)) - set(order))
    assert all(len(d) == 2 for d in dropped)
    assert len(set(dropped)) > 1  # a different pair of images is dropped in different epochs


def test_divisible_dataset_is_covered_exactly():
    sampler = ResumableSampler(num_items=16, batch_size=4, seed=0)
    assert sorted(epoch_order(sampler, 0)) == list(range(16))


def test_order_differs_per_epoch_and_seed_but_repeats_exactly():
    sampler = ResumableSampler(num_items=64, batch_size=8, seed=0)
    orders = [epoch_order(sampler, e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert epoch_order(sampler, 1) == orders[1]
    assert epoch_order(ResumableSampler(num_items=64, batch_size=8, seed=0), 1) == orders[1]
    assert epoch_order(ResumableSampler(num_items=64, batch_size=8, seed=1), 1) != orders[1]
    assert orders[0] != sorted(orders[0])


def test_no_shuffle_is_dataset_order():
    sampler = ResumableSampler(num_items=10, batch_size=3, shuffle=False)
    assert epoch_order(sampler, 5) == list(range(9))


@pytest.mark.parametrize("num_items", [32, 30])
def test_two_ranks_get_disjoint_equal_shares(num_items):
    ranks = [ResumableSampler(num_items=num_items, batch_size=4, seed=7, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        shares = [epoch_order(s, epoch) for s in ranks]
        assert len(shares[0]) == len(shares[1]) == (16 if num_items == 32 else 12)  # 30: 15 each, 3 batches of 4
        assert not set(shares[0]) & set(shares[1])
        if num_items == 32:
            assert sorted(shares[0] + shares[1]) == list(range(32))
        # rank r takes every other image of the epoch's single-process permutation
        full = epoch_order(ResumableSampler(num_items=num_items, batch_size=1, seed=7), epoch)
        assert shares[0] == full[0::2][: len(shares[0])] and shares[1] == full[1::2][: len(shares[1])]


def test_uneven_count_is_padded_by_wrapping_so_ranks_stay_in_step():
    # 5 images on 2 ranks: 3 each, the 6th slot repeats the first image of the permutation
    ranks = [ResumableSampler(num_items=5, batch_size=1, seed=2, rank=r, world_size=2) for r in range(2)]
    shares = [epoch_order(s, 0) for s in ranks]
    full = epoch_order(ResumableSampler(num_items=5, batch_size=1, seed=2), 0)
    assert [len(s) for s in shares] == [3, 3]
    assert shares[1][-1] == full[0]
    assert sorted(set(shares[0]) | set(shares[1])) == list(range(5))


@pytest.mark.parametrize("world_size", [1, 2])
def test_start_batch_skips_to_the_tail_of_the_epoch(world_size):
    for rank in range(world_size):
        sampler = ResumableSampler(num_items=40, batch_size=4, seed=5, rank=rank, world_size=world_size)
        batches = sampler.batches_per_epoch()
        assert batches == 10 // world_size
        for epoch in (0, 3):
            full = epoch_order(sampler, epoch)
            for start in range(batches + 1):
                assert epoch_order(sampler, epoch, start) == full[start * 4 :]
                assert len(sampler) == (batches - start) * 4


def test_sampler_in_a_dataloader_gives_whole_batches():
    sampler = ResumableSampler(num_items=10, batch_size=4, seed=0)
    sampler.set_epoch(2, 1)
    loader = DataLoader(list(range(10)), batch_size=4, sampler=sampler, drop_last=True)
    batches = [b.tolist() for b in loader]
    assert batches == [epoch_order(sampler, 2, 1)[:4]]


class _Indices(Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, index):
        return index, {"index": index}


def _noise(image, target):
    """A 'transform' that reveals the torch RNG state it runs under."""
    return torch.rand(3), target


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index():
    augmented = SeededAugmentation(_Indices(), _noise, seed=0)
    first = [augmented[i][0] for i in range(50)]
    torch.manual_seed(1234)  # the global RNG does not matter ...
    backwards = {i: augmented[i][0] for i in reversed(range(50))}  # ... nor the order
    assert all(torch.equal(first[i], backwards[i]) for i in range(50))
    assert len({tuple(t.tolist()) for t in first}) == 50  # every image draws differently
    augmented.epoch = 1
    assert not any(torch.equal(augmented[i][0], first[i]) for i in range(50))
    other_seed = SeededAugmentation(_Indices(), _noise, seed=1)
    assert not any(torch.equal(other_seed[i][0], first[i]) for i in range(50))


def test_seeded_augmentation_leaves_the_global_rng_alone():
    augmented = SeededAugmentation(_Indices(), _noise, seed=0)
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    augmented[3]
    augmented[7]
    assert torch.equal(torch.rand(4), expected)


def test_seeded_augmentation_is_the_same_in_loader_workers():
    augmented = SeededAugmentation(_Indices(), _noise, seed=0)
    augmented.epoch = 2
    sampler = ResumableSampler(num_items=50, batch_size=5, seed=0)
    sampler.set_epoch(2)

    def run(num_workers):
        loader = DataLoader(augmented, batch_size=5, sampler=sampler, num_workers=num_workers,
                            collate_fn=lambda batch: torch.stack([image for image, _ in batch]))
        return torch.cat(list(loader))

    assert torch.equal(run(0), run(2))


def test_without_transforms_samples_pass_through():
    augmented = SeededAugmentation(_Indices(), None, seed=0)
    assert augmented[4] == (4, {"index": 4}) and len(augmented) == 50
