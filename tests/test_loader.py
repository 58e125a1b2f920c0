"""The training loader: an epoch's batches and augmentations depend on (seed, epoch) only."""

import torch
from torch.utils.data import BatchSampler, RandomSampler

from segloop.config import AugmentSettings
from segloop.data.dataset import SegmentationDataset, train_transform
from segloop.data.loader import EpochBatches, training_loader


def _batches(n, batch, seed, epoch, rank=0, world=1):
    g = torch.Generator()
    sampler = EpochBatches(
        BatchSampler(RandomSampler(range(n), generator=g), batch, drop_last=True), g, seed, rank, world
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epochs_replay_and_ranks_share_one_sequence():
    one = _batches(26, 4, seed=0, epoch=3)
    assert len(one) == 6 and all(len(b) == 4 for b in one)
    assert _batches(26, 4, seed=0, epoch=3) == one  # a resumed epoch draws the same batches and seeds
    assert _batches(26, 4, seed=0, epoch=4) != one and _batches(26, 4, seed=1, epoch=3) != one
    rank0, rank1 = _batches(26, 4, 0, 3, rank=0, world=2), _batches(26, 4, 0, 3, rank=1, world=2)
    assert rank0 == one[0::2] and rank1 == one[1::2]  # every rank draws the whole epoch, keeps its share
    indices = [i for b in rank0 + rank1 for i, _ in b]
    assert len(indices) == len(set(indices)) == 24
    assert len(_batches(26, 4, 0, 3, rank=1, world=4)) == 1  # 6 batches over 4 ranks: equal shares, rest dropped


def test_augmentations_do_not_depend_on_workers(base_data, tiny_settings):
    aug = AugmentSettings(noise_sigma=0.05, rotate_degrees=10, rot90=0.5)
    dataset = SegmentationDataset(base_data, 3, train_transform(tiny_settings.data.crop_size, aug))

    def epochs(num_workers):
        loader = training_loader(dataset, None, 0.0, batch_size=4, seed=5, num_workers=num_workers, pin_memory=False)
        out = []
        for epoch in (0, 1, 0):
            loader.batch_sampler.set_epoch(epoch)
            out.append([(x.clone(), y.clone()) for x, y in loader])
        return out

    inline, workers = epochs(0), epochs(2)  # the workers persist across the three epochs
    for a, b in zip(inline, workers):
        assert len(a) == len(b) == 6
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(inline[0], inline[2]))  # epoch 0 again: same
    assert not torch.equal(inline[0][0][0], inline[1][0][0])


def test_blur_softens_some_images_and_never_the_masks():
    """train.augment.blur_sigma: a third of the crops blurred (less high-frequency energy), masks as they were."""
    from torchvision import tv_tensors

    torch.manual_seed(0)
    still = AugmentSettings(hflip=0, vflip=0, brightness=0, contrast=0, gamma=0)
    blur = train_transform(32, still.model_copy(update={"blur_sigma": 2.0}))
    image, mask = tv_tensors.Image(torch.rand(3, 32, 32)), tv_tensors.Mask(torch.randint(0, 4, (32, 32)))
    edges = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean().item()  # noqa: E731
    blurred = 0
    for _ in range(60):
        x, y = blur(image, mask)
        assert torch.equal(y, mask)  # crop 32 of a 32-pixel image: geometry is the identity here
        blurred += edges(x) < 0.8 * edges(image)
    assert 10 <= blurred <= 35  # about a third of 60 (p = 1/3), never all or none
