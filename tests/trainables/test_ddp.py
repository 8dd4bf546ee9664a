"""Data-parallel FoldTrainer without Ray: two gloo processes on CPU against one process.

Two workers on the same weights must give the single process's validation counts exactly (the
confusion matrix, boundary and per-image counts are summed or gathered, never averaged), and
their training draws together must be the single-process epoch, batch for batch.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_config
from trainables.loop import FoldTrainer
from trainables.sampling import EpochSampler, build_sampler

TRAIN_IDX, VAL_IDX = list(range(11)), list(range(40, 45))  # 11: the ranks' draws differ in number
SETTINGS = {"train.epochs": 1, "train.batch_size": 4, "train.oversample": 1.0, "train.boundary_iou": "every",
            "metrics.average": "image", "train.image_size": [32, 48]}


def _worker(rank: int, world: int, init_file: str, cache: str, weights: str, out: str) -> None:
    """One rank: validate on the given weights, record the epoch's batches, train one DDP epoch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from trainables.data import load_dataset

        trainer = FoldTrainer(tiny_config(**SETTINGS), load_dataset(cache_dir=cache), TRAIN_IDX, VAL_IDX, fold=0)
        trainer.model.load_state_dict(torch.load(weights, weights_only=True))
        record = trainer.validate()
        validation = trainer.last_validation
        trainer.set_epoch(0)
        batches = [list(b) for b in trainer.train_loader.batch_sampler][:trainer.train_batches]
        train = trainer.train_one_epoch()
        torch.save({"record": record, "validation": validation, "batches": batches, "train": train,
                    "train_batches": trainer.train_batches, "is_main": trainer.is_main,
                    "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, sample, sample_cache):
    """The single-process trainer after one epoch, and what each of two ranks saw on its weights."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = FoldTrainer(tiny_config(**SETTINGS), sample, TRAIN_IDX, VAL_IDX, fold=0)
    single.set_epoch(0)
    single_batches = [list(b) for b in single.train_loader.batch_sampler][:single.train_batches]
    next(single.epochs())  # trained weights: predictions of more than one class
    torch.save(single.model.state_dict(), tmp / "weights.pt")
    single_record = single.validate()
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(sample_cache), str(tmp / "weights.pt"), str(tmp)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, single_record, single_batches, ranks


@pytest.mark.slow
def test_two_workers_validate_like_one_process(two_workers):
    single, record, _, ranks = two_workers
    want = single.last_validation
    assert len(set(np.asarray(want["confusion"]).argmax(1))) > 1  # not a constant prediction
    for rank in ranks:
        got = rank["validation"]
        assert got["confusion"] == want["confusion"]  # summed counts, exactly
        assert got["void_per_class"] == want["void_per_class"]
        assert got["images"] == want["images"] == len(VAL_IDX)  # every image once: no padding
        np.testing.assert_array_equal(got["biou_per_class"], want["biou_per_class"])
        for key in ("miou", "dice", "pixel_acc", "biou", "miou_image", "dice_image"):
            assert rank["record"][f"val_{key}"] == pytest.approx(record[f"val_{key}"], abs=1e-12, nan_ok=True)
        assert rank["record"]["val_loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert [r["is_main"] for r in ranks] == [True, False]


def test_two_workers_draw_the_single_process_epoch(two_workers):
    single, _, single_batches, ranks = two_workers
    assert all(r["train_batches"] == single.train_batches == len(TRAIN_IDX) // 4 for r in ranks)
    for step, batch in enumerate(single_batches):  # step k of the ranks together = single-process batch k
        union = sorted(ranks[0]["batches"][step] + ranks[1]["batches"][step], key=lambda d: d.position)
        assert union == batch and len(ranks[0]["batches"][step]) == len(ranks[1]["batches"][step]) == 2
    assert single.train_loader.sampler.weights is not None  # the oversampling (weighted) sampler


def test_ddp_epoch_keeps_the_ranks_in_step(two_workers):
    _, _, _, ranks = two_workers
    assert ranks[0]["train"]["train_loss"] == ranks[1]["train"]["train_loss"]  # reduced: both stop alike
    for key, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_the_epoch(weighted, world):
    weights = torch.rand(13, dtype=torch.double, generator=torch.Generator().manual_seed(1)) if weighted else None
    whole = EpochSampler(13, seed=5, weights=weights)
    whole.set_epoch(2)
    shards = []
    for rank in range(world):
        sampler = EpochSampler(13, seed=5, weights=weights, rank=rank, world_size=world)
        sampler.set_epoch(2)
        shards += list(sampler)
        assert len(sampler) == len(list(sampler))
    assert sorted(shards, key=lambda d: d.position) == list(whole)


def test_build_sampler_shards():
    presence = np.eye(6, dtype=bool)[np.arange(10) % 6]
    train = {"oversample": 1.0, "oversample_cap": 5.0}
    parts = [list(build_sampler(train, presence, True, 0, rank, 2)) for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(build_sampler(train, presence, True, 0))
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(5, 0, rank=2, world_size=2)
