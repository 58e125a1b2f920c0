"""The training DataLoader: batches and augmentations fixed by (seed, epoch) alone.

Every epoch reseeds one generator from (seed, epoch); it draws the shuffle (or the
replay mix) and one augmentation seed per sample, which the dataset applies before
augmenting. So an epoch's batches and augmentations do not depend on what ran before
(a resumed run replays them), on the number of workers, on workers living across
epochs, or on how many processes share the epoch: under DDP every rank draws the same
sequence and takes every world-th batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import cast

import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, RandomSampler, Sampler

from segloop.data.replay import MixedBatchSampler

SEED_STRIDE = 100_003  # epoch seeds of different run seeds never collide for < 100,003 epochs


def sized(dataset: Dataset) -> Sized:
    """`dataset` as Sized: torch types Dataset without __len__ (optional there); ours are map-style and have it."""
    return cast(Sized, dataset)


class SeededSamples(Dataset):
    """`dataset` indexed by (index, seed): the seed is set before the sample is read and augmented."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(sized(self.dataset))

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # torchvision's random transforms draw from the default CPU generator.
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (index, augmentation seed) of one epoch; `set_epoch` chooses the epoch.

    `batches` draws from `generator`; this rank yields batches rank, rank + world, ...
    and every rank the same number of them (the remainder of the epoch is dropped).
    """

    def __init__(
        self,
        batches: BatchSampler | MixedBatchSampler,
        generator: torch.Generator,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.batches, self.generator, self.seed = batches, generator, seed
        self.rank, self.world = rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * SEED_STRIDE + epoch)

    def __len__(self) -> int:
        return len(self.batches) // self.world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keep = len(self) * self.world
        for i, batch in enumerate(self.batches):
            if i >= keep:
                return
            seeds = torch.randint(0, 2**62, (len(batch),), generator=self.generator).tolist()
            if i % self.world == self.rank:
                yield list(zip(batch, seeds))


def training_loader(
    dataset: Dataset,
    replay: Dataset | None,
    ratio: float,
    batch_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    rank: int = 0,
    world: int = 1,
    iters: int | None = None,
) -> DataLoader:
    """One loader for the whole run (workers persist); call `loader.batch_sampler.set_epoch(e)` per epoch.

    An epoch is `iters` batches per process (reshuffling the data as often as that takes), or
    one pass over the data when None. With `replay`, each batch mixes round(ratio * batch_size)
    buffer samples into the new data.
    """
    generator = torch.Generator()
    total = None if iters is None else iters * world
    if replay is None:
        n = len(sized(dataset)) // batch_size * batch_size if total is None else total * batch_size
        batches: BatchSampler | MixedBatchSampler = BatchSampler(
            RandomSampler(sized(dataset), num_samples=n, generator=generator), batch_size, drop_last=True
        )
    else:
        batches = MixedBatchSampler(len(sized(dataset)), len(sized(replay)), batch_size, ratio, generator, total)
        dataset = ConcatDataset([dataset, replay])
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=EpochBatches(batches, generator, seed, rank, world),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
