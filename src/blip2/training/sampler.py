"""Which items each rank reads, in a order that survives resume and does not depend on the world size.

Every epoch the dataset is shuffled with a generator seeded by (seed, epoch) and cut into global batches
of `batch_size * world_size` items (the last partial one is dropped). Rank r takes the r-th slice of each
global batch, so the ranks' batches, concatenated in rank order, are exactly the global batch one process
would read: N processes on batch B see the same data as one process on batch N*B. The sampler yields keys
`(epoch, index)`, which the datasets use to seed each item's augmentation.

A position is a count of micro-batches (one per rank per forward); `start` resumes mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from blip2.data.datasets import DatasetError


class GlobalBatchSampler(torch.utils.data.Sampler):
    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.world_size, self.rank = size, batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = size // self.global_batch
        if self.batches_per_epoch == 0:  # a user's setting, reported as one line by the recipes
            raise DatasetError(
                f"the dataset has {size} items, fewer than one global batch ({batch_size} per process x "
                f"{world_size} processes = {self.global_batch}): lower batch_size or add data"
            )
        self.epoch, self.start = 0, 0

    def set_position(self, micro_batches: int) -> None:
        """Continue after `micro_batches` micro-batches (counted from the very first)."""
        self.epoch, self.start = divmod(micro_batches, self.batches_per_epoch)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        lo = self.rank * self.batch_size
        for b in range(self.start, self.batches_per_epoch):
            rows = order[b * self.global_batch : (b + 1) * self.global_batch][lo : lo + self.batch_size]
            yield [(self.epoch, int(i)) for i in rows]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def micro_batches(loader: torch.utils.data.DataLoader, sampler: GlobalBatchSampler, start: int = 0):
    """Endless micro-batches from `loader` (built on `sampler` as its batch_sampler), from position `start`."""
    position = start
    while True:
        sampler.set_position(position)
        for batch in loader:
            position += 1
            yield batch


def make_loader(
    dataset, batch_size: int, world_size: int, rank: int, seed: int, collate_fn, num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[torch.utils.data.DataLoader, GlobalBatchSampler]:
    """A DataLoader over `dataset` reading this rank's share of each global batch (see GlobalBatchSampler).

    The loader gets its own generator: without one, every new epoch's iterator draws its workers' base seed
    from torch's global RNG, which would shift dropout after a mid-epoch resume."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, world_size, rank, seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + rank),
    )
    return loader, sampler
