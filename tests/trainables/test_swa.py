"""Stochastic weight averaging in the fold loop (``train.swa_epochs``, torch's AveragedModel and
update_bn): the average against the epochs' weights averaged by hand, the BatchNorm statistics against
the training batches' own statistics, validation and the best checkpoint on the average, resume, and
the settings. Tiny Unet, 64x96 images, 4-image batches, two batches an epoch."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.trainables.test_ema import SMALL, copied, make, split  # noqa: F401 (fixture)
from trainables.config import setting_problem, validate_config
from trainables.errors import ConfigError


def run_with_snapshots(trainer) -> tuple[list[dict], list[dict]]:
    """Every epoch's record and the raw weights at its end (before any averaging or validation)."""
    raw, train_one_epoch = [], trainer.train_one_epoch

    def snapshot() -> dict:
        out = train_one_epoch()
        raw.append(copied(trainer.model.state_dict()))
        return out
    trainer.train_one_epoch = snapshot
    return list(trainer.epochs()), raw


def test_swa_is_the_equal_average_of_the_last_epochs_weights(sample, split):  # noqa: F811
    trainer = make(sample, split, **{"train.epochs": 3, "train.swa_epochs": 2})
    records, raw = run_with_snapshots(trainer)
    assert [r.get("swa_epochs") for r in records] == [None, 1, 2]
    swa = trainer.swa.module.state_dict()
    params = dict(trainer.model.named_parameters())
    assert params and trainer.eval_model is trainer.swa.module
    for key in params:  # every parameter: the mean of epochs 2 and 3's, not the last epoch's
        torch.testing.assert_close(swa[key], (raw[1][key] + raw[2][key]) / 2, rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(swa[k], raw[2][k]) for k in params)


def test_swa_batchnorm_statistics_are_the_last_epochs_batches(sample, split):  # noqa: F811
    """update_bn's cumulative average: the first BatchNorm's running mean is the mean over the last
    epoch's training batches of each batch's per-channel input mean, through the averaged weights."""
    trainer = make(sample, split, **{"train.epochs": 2, "train.swa_epochs": 1})
    list(trainer.epochs())
    model = copy.deepcopy(trainer.swa.module).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    means = []
    bn.register_forward_hook(lambda m, inputs, out: means.append(inputs[0].mean((0, 2, 3))))
    trainer.set_epoch(1)  # the last epoch's draws
    with torch.no_grad():
        for _, (images, _) in zip(range(SMALL["train.max_train_batches"]), trainer.train_loader):
            model(images)
    assert len(means) == SMALL["train.max_train_batches"]
    first = next(m for m in trainer.swa.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(first.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)


def test_validation_and_the_best_checkpoint_use_the_average(sample, split):  # noqa: F811
    trainer = make(sample, split, **{"train.epochs": 2, "train.swa_epochs": 1, "train.metric": "val_loss",
                                     "train.mode": "min"})
    records = list(trainer.epochs())
    swa = copied(trainer.swa.module.state_dict())
    assert trainer.validate()["val_loss"] == records[-1]["val_loss"]  # epoch 2 scored the average
    best = trainer.best_checkpoint()["state_dict"]
    if records[-1]["improved"]:  # epoch 2 kept: the average's weights and statistics
        assert all(torch.equal(best[k], swa[k]) for k in swa)
    else:  # epoch 1 kept: before the window, the raw weights
        assert trainer.best_epoch == 1 and any(not torch.equal(best[k], swa[k]) for k in swa)
    held, trainer.swa = trainer.swa, None  # the raw weights score otherwise
    assert trainer.validate()["val_loss"] != records[-1]["val_loss"]
    trainer.swa = held
    assert set(trainer.best_checkpoint()["state_dict"]) == set(trainer.model.state_dict())  # plain keys


def test_resume_inside_the_window_keeps_the_average(sample, split):  # noqa: F811
    cfg = {"train.epochs": 3, "train.swa_epochs": 2, "train.max_train_batches": 1}
    straight = make(sample, split, **cfg)
    records = straight.epochs()
    next(records), next(records)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)  # as the Tune adapter does: torch.save + weights_only load
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    end = next(records)
    resumed = make(sample, split, **cfg)
    resumed.load_state_dict(state)
    assert int(resumed.swa.n_averaged) == 1
    (again,) = resumed.epochs()
    assert again["swa_epochs"] == 2 and again["val_loss"] == end["val_loss"]
    other = straight.swa.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in resumed.swa.state_dict().items())


def test_swa_off_has_no_average(sample, split):  # noqa: F811
    trainer = make(sample, split, **{"train.epochs": 1})
    (record,) = trainer.epochs()
    assert trainer.swa is None and "swa_epochs" not in record and trainer.eval_model is trainer.model


@pytest.mark.parametrize("value, ok", [(0, True), (3, True), (-1, False), (1.5, False), (None, False)])
def test_swa_setting_is_checked(value, ok):
    assert (setting_problem("train.swa_epochs", value) is None) == ok


def test_swa_with_ema_is_one_config_error():
    with pytest.raises(ConfigError, match="train.swa_epochs.*one weight average at a time"):
        validate_config({"train": {"swa_epochs": 2, "ema_decay": 0.99}})
    validate_config({"train": {"swa_epochs": 2, "ema_decay": None}})
