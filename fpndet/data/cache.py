"""Decode each image once and keep the samples in memory (small datasets, CPU training)."""
from __future__ import annotations

from torch.utils.data import Dataset


class CachedSamples(Dataset):
    """``dataset[i]`` decoded once (uint8 image and target, no transforms) and then served from
    memory. With DataLoader workers each worker fills its own copy, so use ``num_workers=0``
    when the dataset is small enough to cache (raccoon: 160 images, about 100 MB)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._samples: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index not in self._samples:
            self._samples[index] = self.dataset[index]
        image, target = self._samples[index]
        return image, dict(target)
