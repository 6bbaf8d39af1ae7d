"""The order in which each rank reads the data: a function of (seed, epoch) alone, so that resuming is exact."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..errors import TrainError


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's permutation and of its DataLoader's worker seeds."""
    return seed * 100_003 + epoch


class ShardedOrder:
    """Which dataset indices each rank reads: a seeded permutation per epoch, dealt out to the ranks.

    The order is a function of (seed, epoch) alone, so a resumed run reads exactly what an uninterrupted
    one would: it rebuilds its epoch's permutation and starts at the saved batch. Every rank gets the
    same number of full batches (the tail of the permutation is dropped, a new one each epoch).
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, rank: int, world_size: int):
        self.indices, self.batch_size, self.seed = list(indices), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(self.indices) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise TrainError(
                f"{len(self.indices)} training images are fewer than batch_size {batch_size} x {world_size} "
                "processes; lower the batch size or add images"
            )

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(len(self.indices), generator=g).tolist()
        mine = [self.indices[i] for i in perm[self.rank :: self.world_size]]
        bs = self.batch_size
        return [mine[b * bs : (b + 1) * bs] for b in range(start, self.batches_per_epoch)]


class BucketOrder(ShardedOrder):
    """ShardedOrder for aspect-ratio buckets: every batch holds images of one bucket.

    Per epoch, each bucket's images are permuted and cut into full batches (a bucket's tail waits for another
    epoch), all the batches are permuted together and dealt out to the ranks, every rank the same number.
    Still a function of (seed, epoch) alone, so resuming is exact; batches_per_epoch counts the real batches.
    """

    def __init__(self, indices: list[int], bucket_of, batch_size: int, seed: int, rank: int, world_size: int):
        self.groups: dict[int, list[int]] = {}
        for i in indices:
            self.groups.setdefault(int(bucket_of[i]), []).append(i)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.batches_per_epoch = sum(len(g) // batch_size for g in self.groups.values()) // world_size
        if self.batches_per_epoch == 0:
            sizes = ", ".join(str(len(g)) for _, g in sorted(self.groups.items()))
            raise TrainError(
                f"no aspect bucket holds batch_size {batch_size} images for each of {world_size} processes "
                f"(images per bucket: {sizes}); lower the batch size, add images or widen the buckets"
            )

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        bs, every = self.batch_size, []
        for _, group in sorted(self.groups.items()):
            perm = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            every += [perm[b * bs : (b + 1) * bs] for b in range(len(group) // bs)]
        dealt = [every[i] for i in torch.randperm(len(every), generator=g).tolist()][self.rank :: self.world_size]
        return dealt[start : self.batches_per_epoch]


def batch_stream(order: ShardedOrder, position: tuple[int, int], load: Callable[[int, list[list[int]]], Iterable]):
    """Endless (position after this batch, batch), from position = (epoch, batch in epoch) on.

    `load(epoch, index batches)` turns an epoch's index batches into batches (a DataLoader, or the indices).
    """
    epoch, start = position
    while True:
        for b, batch in enumerate(load(epoch, order.batches(epoch, start)), start=start):
            yield (epoch, b + 1), batch
        epoch, start = epoch + 1, 0


def epoch_loader(dataset, num_workers: int, seed: int) -> Callable[[int, list[list[int]]], Iterable]:
    """load(epoch, index batches) -> a DataLoader over them, for batch_stream.

    The loader's own generator (seeded by epoch) draws the worker seeds; by default they would come
    from torch's global RNG, which a resumed run would then draw at a different point.
    """

    def load(epoch: int, batches: list[list[int]]):
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=g)

    return load
