"""Augmentation seeding on the CamVid sample: each draw of an epoch is augmented from (seed, epoch,
draw), so DataLoader workers never repeat each other, 0 and 2 workers feed the same batches, and a
resumed run continues with the batches an uninterrupted one would have seen."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from trainables.dataset import SegDataset, build_transforms
from trainables.loop import FoldTrainer

TRAIN, VAL = list(range(0, 32, 2)), [1, 3]
# the sampled images, a crop, a random affine, flips, copy-paste and oversampling: every random step
RANDOM = {"train.batch_size": 4, "train.max_train_batches": 3, "augment.random_crop": True,
          "augment.scale_rotate": 1.0, "augment.vflip": 0.5, "augment.copy_paste": 0.5,
          "train.oversample": 1.0}


def record(trainer: FoldTrainer) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The (images, target) batches the training loop steps on, per epoch (the real steps still run)."""
    batches: list[list] = []
    step, epoch_start = trainer.train_step, trainer.train_one_epoch

    def recording_epoch():
        batches.append([])
        return epoch_start()

    def recording_step(images, target, *args, **kwargs):
        batches[-1].append((images.clone(), target.clone()))
        return step(images, target, *args, **kwargs)

    trainer.train_one_epoch, trainer.train_step = recording_epoch, recording_step
    return batches


def run(sample, workers: int, train_idx=TRAIN, epochs: int = 2, **overrides):
    """Train ``epochs`` epochs with ``workers`` loader workers: (trainer, batches per epoch)."""
    cfg = tiny_config(**{**RANDOM, "train.num_workers": workers, **overrides})
    trainer = FoldTrainer(cfg, sample, train_idx, VAL, fold=0)
    batches = record(trainer)
    for record_ in trainer.epochs():
        if record_["epoch"] == epochs:
            break
    return trainer, batches


def assert_same(a: list[list], b: list[list]) -> None:
    assert [len(e) for e in a] == [len(e) for e in b]
    differ = [(e, k) for e, (epoch_a, epoch_b) in enumerate(zip(a, b))
              for k, ((image_a, target_a), (image_b, target_b)) in enumerate(zip(epoch_a, epoch_b))
              if not (torch.equal(image_a, image_b) and torch.equal(target_a, target_b))]
    assert not differ, f"(epoch, batch) fed differently: {differ}"


@pytest.fixture(scope="module")
def two_workers(sample):
    """An uninterrupted 2-epoch run with 2 persistent workers: (trainer, batches per epoch)."""
    return run(sample, 2)


def test_workers_never_repeat_an_augmentation(sample):
    """16 copies of one image: with 2 workers every augmented sample of both epochs differs."""
    _, batches = run(sample, 2, train_idx=[4] * 16, **{"train.oversample": 0.0, "augment.copy_paste": 0.0})
    images = [image for epoch in batches for batch, _ in epoch for image in batch]
    assert len(images) == 2 * 3 * 4
    same = [(j, i) for i in range(len(images)) for j in range(i) if torch.equal(images[i], images[j])]
    assert not same, f"pairs of samples augmented alike: {same}"


def test_zero_and_two_workers_feed_the_same_batches(sample, two_workers):
    _, batches = two_workers
    _, single = run(sample, 0)
    assert [len(e) for e in batches] == [3, 3]
    assert_same(single, batches)
    assert not torch.equal(batches[0][0][0], batches[1][0][0])  # epochs differ


def test_resume_feeds_the_next_epoch_of_an_uninterrupted_run(sample, two_workers):
    """1 epoch with 2 workers, save the state, resume in a new trainer (2 workers): its epoch 2 is
    the uninterrupted run's epoch 2."""
    first, _ = run(sample, 2, epochs=1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    cfg = tiny_config(**{**RANDOM, "train.num_workers": 2})
    second = FoldTrainer(cfg, sample, TRAIN, VAL, fold=0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    resumed = record(second)
    assert [r["epoch"] for r in second.epochs()] == [2]
    assert_same(resumed, two_workers[1][1:])


def flips(dataset: SegDataset, k: int, base: np.ndarray) -> tuple[bool, bool]:
    image = dataset[k][0].numpy()
    for h in (False, True):
        for v in (False, True):
            flipped = base[:, ::-1 if v else 1, ::-1 if h else 1]
            if np.array_equal(image, flipped):
                return h, v
    raise AssertionError("neither flipped nor unflipped")


def test_horizontal_and_vertical_flips_are_drawn_independently(sample):
    """The pipeline's steps share one random stream per sample (albumentations' ``seed=`` gives
    each step its own generator of that seed: hflip 0.5 and vflip 0.5 then always came together)."""
    cfg = tiny_config(**{"augment.vflip": 0.5})
    trainer = FoldTrainer(cfg, sample, [4] * 40, VAL, fold=0)
    base = SegDataset(sample, [4], build_transforms(cfg["augment"], [64, 96], False))[0][0].numpy()
    seen = {flips(trainer.train_set, k, base) for k in range(40)}
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
