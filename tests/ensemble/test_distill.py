"""One model from the ensemble (``ensemble/run.py --distill``): the distillation loss against a
brute-force computation, the student's targets are the ensemble's probabilities (out-of-fold for the
training images, the shipped ensemble's for unlabeled ones), the student's bundle predicts through
the normal predictor, and bad flags are one line with exit code 2."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import write_image
from tests.ensemble.test_ensemble import VAL_JSON, _one_torch_thread  # noqa: F401 (fixture)

# --------------------------------------------------------------------------- 1. the loss


def _kl_by_hand(logits: torch.Tensor, teacher: torch.Tensor, T: float, valid: torch.Tensor) -> torch.Tensor:
    """KL(teacher_T || softmax(logits / T)) summed over classes, averaged over valid pixels, written out:
    teacher_T = teacher^(1/T) renormalised (softmax of log p / T), sum_c t_c * (log t_c - log q_c)."""
    t = teacher.double() ** (1.0 / T)
    t = t / t.sum(1, keepdim=True)
    z = logits.double() / T
    log_q = z - torch.log(torch.exp(z).sum(1, keepdim=True))
    per_pixel = (t * (torch.log(t) - log_q)).sum(1)
    return per_pixel[valid].mean()


def _bce_by_hand(logits: torch.Tensor, teacher: torch.Tensor, T: float, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logits / T) against sigmoid(logit(teacher) / T), averaged over
    classes and valid pixels."""
    p = teacher.double()
    t = 1.0 / (1.0 + torch.exp(-(torch.log(p) - torch.log(1 - p)) / T))
    s = 1.0 / (1.0 + torch.exp(-logits.double() / T))
    per = -(t * torch.log(s) + (1 - t) * torch.log(1 - s))
    return per.mean(1)[valid].mean()


def _multiclass_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 5, 6, generator=g) * 2
    teacher = torch.softmax(torch.randn(3, 4, 5, 6, generator=g) * 2, 1)
    labels = torch.randint(0, 4, (3, 5, 6), generator=g)
    labels[0, 0, :3] = 255  # some ignored pixels
    labels[2] = 255  # an image without labels (an unlabeled image)
    teacher[1, :, 2, 2] = 255.0  # a pixel an augmentation filled: no teacher there
    packed = torch.cat([labels[:, None].float(), teacher], 1)
    return logits, teacher, labels, packed


def test_kd_loss_is_the_standard_mix_computed_by_hand():
    from trainables.losses import DistillLoss

    logits, teacher, labels, packed = _multiclass_case()
    hard = nn.CrossEntropyLoss(ignore_index=255)
    valid = (teacher <= 1).all(1)
    for T, alpha in ((1.0, 0.5), (2.0, 0.3), (4.0, 0.9)):
        loss = DistillLoss(hard, "multiclass", 4, temperature=T, alpha=alpha)(logits, packed)
        kl = _kl_by_hand(logits, teacher.clamp(0, 1), T, valid)
        # the hard term over the labelled images only (image 2 has none)
        ce = F.cross_entropy(logits[:2].double(), labels[:2], ignore_index=255)
        expected = alpha * T ** 2 * kl + (1 - alpha) * ce
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # the same through torch's own kl_div on the valid pixels, T=2
    t2 = torch.softmax(torch.log(teacher.clamp(1e-8, 1)) / 2, 1)
    kl2 = F.kl_div(F.log_softmax(logits / 2, 1), t2, reduction="none").sum(1)[valid].mean()
    assert float(_kl_by_hand(logits, teacher.clamp(0, 1), 2.0, valid)) == pytest.approx(float(kl2), rel=1e-5)


def test_kd_loss_alpha_zero_is_the_hard_loss_and_alpha_one_ignores_labels():
    from trainables.losses import DistillLoss

    logits, teacher, labels, packed = _multiclass_case(1)
    hard = nn.CrossEntropyLoss(ignore_index=255)
    labelled = packed[:2]  # every image with labels: alpha 0 is exactly the hard loss
    assert float(DistillLoss(hard, "multiclass", 4, temperature=3.0, alpha=0.0)(logits[:2], labelled)) == \
        float(hard(logits[:2], labels[:2]))
    other = packed.clone()
    other[:, 0] = torch.randint(0, 4, other[:, 0].shape).float()  # different labels, same teacher
    one = DistillLoss(hard, "multiclass", 4, temperature=3.0, alpha=1.0)
    assert float(one(logits, packed)) == float(one(logits, other))
    valid = (teacher <= 1).all(1)
    assert float(one(logits, packed)) == pytest.approx(9 * float(_kl_by_hand(logits, teacher.clamp(0, 1), 3.0, valid)),
                                                       rel=1e-5)
    # the teacher itself at T=1 is a minimum of the soft term: its loss is 0
    exact = torch.log(teacher.clamp(0, 1).clamp_min(1e-8))
    at_one = DistillLoss(hard, "multiclass", 4, temperature=1.0, alpha=1.0)
    assert float(at_one(exact, packed)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_multilabel_is_bce_against_the_teachers_sigmoid():
    from trainables.losses import DistillLoss, MultilabelBCE

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    teacher = torch.rand(2, 3, 4, 5, generator=g) * 0.98 + 0.01
    labels = torch.randint(0, 2, (2, 3, 4, 5), generator=g).float()
    labels[1, :, 0, 0] = 255
    packed = torch.cat([labels, teacher], 1)
    hard = MultilabelBCE(None, 255)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    for T, alpha in ((1.0, 0.5), (2.5, 0.7)):
        loss = DistillLoss(hard, "multilabel", 3, temperature=T, alpha=alpha)(logits, packed)
        expected = alpha * T ** 2 * _bce_by_hand(logits, teacher, T, valid) + (1 - alpha) * hard(logits, labels)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    hard_only = DistillLoss(hard, "multilabel", 3, temperature=2.0, alpha=0.0)
    assert float(hard_only(logits, packed)) == float(hard(logits, labels))


def test_kd_loss_refuses_bad_settings():
    from trainables.losses import DistillLoss

    with pytest.raises(ValueError):
        DistillLoss(nn.CrossEntropyLoss(), "multiclass", 4, temperature=0.0)
    with pytest.raises(ValueError):
        DistillLoss(nn.CrossEntropyLoss(), "multiclass", 4, alpha=1.5)


# --------------------------------------------------------------------------- 2. the targets


class Constant(nn.Module):
    """A member whose logits are the same everywhere: 0 for ``classes``, -1e4 elsewhere (its
    probabilities are exactly 1/len(classes) on those classes, 0 elsewhere)."""

    def __init__(self, num_classes: int, classes: tuple[int, ...]):
        super().__init__()
        logits = torch.full((num_classes,), -1e4)
        logits[list(classes)] = 0.0
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()


def _member(name: str, fold: int, num_classes: int, cls: int, class_names):
    from ensemble.predictor import Member

    return Member(name, fold, Constant(num_classes, (cls,)).eval(), (32, 48), "multiclass", class_names, 0.5)


def test_targets_are_the_out_of_fold_and_the_shipped_ensembles_probabilities(sample, tmp_path):
    """Each fold's two members put all their probability on a class of their own, so the out-of-fold
    average says which fold's members predicted an image: every training image's target is exactly
    the average of the members of the fold where it was validation (0.5 on that fold's two classes);
    holdout images are no target; an unlabeled image's target is the average of all members."""
    from ensemble.distill import oof_targets, unlabeled_targets
    from ensemble.oof import oof_evaluate
    from ensemble.predictor import Ensemble
    from trainables.dataset import SegDataset
    from trainables.folds import load_or_make_folds, read_holdout, train_val_indices
    from trainables.kd import SoftTargetSet

    data, C = sample, sample.num_classes
    folds = load_or_make_folds(tmp_path / "folds.json", "stratified", k=2, seed=0, ids=data.ids,
                               presence=data.presence, fingerprint=data.fingerprint, group_regex=None, holdout=0.25)
    holdout = set(read_holdout(tmp_path / "folds.json"))
    classes = {0: (1, 2), 1: (3, 4)}
    ensembles = {f: Ensemble([_member(f"f{f}m{j}", f, C, c, data.class_names) for j, c in enumerate(cs)],
                             device="cpu") for f, cs in classes.items()}
    result = oof_evaluate(ensembles, data, folds=folds, max_size=64, out_dir=tmp_path, batch_size=8, max_per_fold=6,
                          bins=50)
    items = oof_targets(result["images"], tmp_path)
    assert [it.index for it in items] == result["images"]
    fold_of = {}
    for f in classes:
        for i in train_val_indices(folds, f, data.ids)[1][:6]:
            fold_of[i] = f
    assert set(fold_of) == {it.index for it in items} and len(items) == 12
    assert not {data.ids[it.index] for it in items} & holdout
    ds = SoftTargetSet(data, items, transform=None, max_size=64)
    for k, it in enumerate(items):
        probs = np.load(it.probs)
        expected = np.zeros(C, np.float16)
        expected[list(classes[fold_of[it.index]])] = 0.5
        assert probs.dtype == np.float16 and (probs == expected[:, None, None]).all()
        image, packed = ds.load(k)  # what the student trains on: the label, then exactly these targets
        assert packed.shape == (*image.shape[:2], 1 + C)
        assert (packed[..., 1:].transpose(2, 0, 1) == probs.astype(np.float32)).all()
        assert (packed[..., 0] == SegDataset(data, [it.index], None, 64).load(it.index)[1]).all()

    shipped = Ensemble([m for e in ensembles.values() for m in e.members], device="cpu")
    folder = tmp_path / "unlabeled"
    paths = [folder / f"u{k}.png" for k in range(3)]
    for k, p in enumerate(paths):
        write_image(p, 50 + 10 * k, 90, seed=k)
    extra = unlabeled_targets(shipped, paths, max_size=64, out_dir=tmp_path / "u_probs", batch_size=2)
    expected = np.zeros(C, np.float16)
    expected[[1, 2, 3, 4]] = 0.25
    ds = SoftTargetSet(data, items[:1] + extra, transform=None, max_size=64)
    for k, it in enumerate(extra, 1):
        probs = np.load(it.probs)
        assert it.index is None and it.image == paths[k - 1]
        assert (probs == expected[:, None, None]).all()
        image, packed = ds.load(k)
        assert probs.shape[1:] == image.shape[:2] and max(image.shape[:2]) <= 64
        assert (packed[..., 0] == 255).all()  # no labels: the soft term only


def test_student_trains_on_packed_targets_through_augmentation(sample, tmp_path):
    """A short DistillTrainer run over labelled and unlabeled items gives a checkpoint the predictor
    loads; flips and crops move labels and teacher together (both channels flipped alike)."""
    from ensemble.predictor import Ensemble, load_member
    from tests.conftest import tiny_config
    from trainables.checkpoint import save_checkpoint
    from trainables.dataset import SegDataset, build_transforms
    from trainables.kd import DistillTrainer, SoftItem, SoftTargetSet

    data, C = sample, sample.num_classes
    items = []
    for i in range(6):
        _, mask = SegDataset(data, [i], None, 64).load(i)
        onehot = np.eye(C, dtype=np.float16)[np.minimum(mask, C - 1)].transpose(2, 0, 1)
        np.save(tmp_path / f"{i}.npy", onehot)
        items.append(SoftItem(tmp_path / f"{i}.npy", index=i))
    cfg = tiny_config(**{"data.max_size": 64, "train.image_size": [32, 48], "train.batch_size": 4,
                         "train.epochs": 1, "augment.hflip": 1.0})
    flip = SoftTargetSet(data, items, transform=build_transforms(cfg["augment"], [32, 48], True, 0), max_size=64,
                         seed=0)
    _, packed = flip[0]
    labels, teacher = packed[0], packed[1:]
    known = labels != 255
    assert (teacher.argmax(0)[known] == labels[known].long().clamp(max=C - 1)).all()
    trainer = DistillTrainer(cfg, data, items, temperature=2.0, alpha=0.5)
    records = list(trainer.epochs())
    assert len(records) == 1 and math.isfinite(records[0]["train_loss"])
    path = save_checkpoint(trainer.best_checkpoint(), tmp_path / "student" / "model.pt")
    member = load_member(path, "student", "cpu")
    probs = Ensemble([member], device="cpu").predict_batch([data.read_image(0)])[0]
    assert probs.shape == (C, *data.read_image(0).shape[:2])


def test_student_draws_its_items_once_without_copy_paste_or_oversampling(sample, tmp_path, caplog):
    """The student's loader is built once, over the items (labelled and unlabeled), drawn uniformly:
    the search's copy-paste and rare-class oversampling are never built (nor logged), and the schedule
    counts the items' batches."""
    import logging

    from PIL import Image

    from tests.conftest import tiny_config
    from trainables.kd import DistillTrainer, SoftItem, SoftTargetSet

    data, C = sample, sample.num_classes
    items = []
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", np.full((C, *data.read_image(i).shape[:2]), 1.0 / C, np.float16))
        items.append(SoftItem(tmp_path / f"{i}.npy", index=i))
    np.save(tmp_path / "u.npy", np.full((C, 64, 80), 1.0 / C, np.float16))
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "u.png")
    items += [SoftItem(tmp_path / "u.npy", image=tmp_path / "u.png")] * 3
    cfg = tiny_config(**{"train.image_size": [32, 48], "train.batch_size": 3, "train.epochs": 1,
                         "augment.copy_paste": 1.0, "train.oversample": 2.0})
    with caplog.at_level(logging.INFO):
        trainer = DistillTrainer(cfg, data, items, temperature=2.0, alpha=0.5)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "copy-paste" not in said and "oversampling" not in said
    assert isinstance(trainer.train_set, SoftTargetSet) and len(trainer.train_set) == 8
    assert trainer.train_loader.sampler.weights is None and len(trainer.train_loader.sampler) == 8
    assert trainer.steps_per_epoch == 8 // 3  # drop_last over the 8 items, not the 5 labelled images


# --------------------------------------------------------------------------- 3./4. the command


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--distill", "NoSuchNet:resnet18"], ["--distill", "unknown architecture 'NoSuchNet'"]),
    (["--distill", "Unet:no_such_encoder"], ["--distill", "no_such_encoder"]),
    (["--distill", "Unet:"], ["--distill", "ARCH:ENCODER"]),
    (["--distill", "Unet", "--unlabeled", "EMPTY"], ["--unlabeled", "no images"]),
    (["--distill", "Unet", "--unlabeled", "MISSING"], ["--unlabeled", "not found"]),
    (["--distill", "Unet", "--distill-alpha", "1.5"], ["--distill-alpha", "[0, 1]"]),
    (["--distill", "Unet", "--distill-temperature", "0"], ["--distill-temperature", "> 0"]),
    (["--unlabeled", "EMPTY"], ["--unlabeled", "only with --distill"]),
])
def test_bad_distill_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, words):
    """Checked before the experiment loads (there is none here): one line naming the flag, exit 2."""
    from ensemble.run import main

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
    flags = [str(tmp_path / f) if f in ("EMPTY", "MISSING") else f for f in flags]
    with pytest.raises(SystemExit) as exc:
        main(["--experiment", str(tmp_path / "no-such-run"), *flags])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and all(w in line for w in words), line


@pytest.mark.slow
def test_distill_end_to_end_bundle_rows_and_latency(tmp_path, monkeypatch, capsys, _one_torch_thread):  # noqa: F811
    """``ensemble/run.py --distill Unet:resnet18 --unlabeled DIR --predict <annotated>`` on a tiny
    finished search with a holdout: the student's bundle is a one-member bundle the normal predictor
    runs (its masks are the student's argmax), and distill.json puts its rows beside (a)-(c) on the
    holdout and the annotated inputs, with both bundles' ms per image."""
    from ensemble.bundle import load_bundle
    from ensemble.holdout import holdout_indices
    from ensemble.infer import score_rows
    from ensemble.predict import predict_with_bundle
    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment
    from trainables.folds import read_holdout

    exp = fake_experiment(tmp_path, "val_miou")
    unlabeled = tmp_path / "unlabeled"
    for k in range(2):
        write_image(unlabeled / f"u{k}.png", 60, 80, seed=k)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["--experiment", str(exp.run_dir), "--top-k", "1", "--batch-size", "12", "--distill", "Unet:resnet18",
          "--distill-epochs", "1", "--unlabeled", str(unlabeled), "--predict", str(VAL_JSON),
          "--out", str(tmp_path / "pred")])
    printed = capsys.readouterr().out
    out = exp.run_dir / "ensemble" / "distill"
    record = json.loads((out / "distill.json").read_text())
    s = record["student"]
    assert (s["arch"], s["encoder"], s["epochs"], s["unlabeled_images"]) == ("Unet", "resnet18", 1, 2)
    index = holdout_indices(exp.data, read_holdout(exp.run_dir / "folds.json"))
    assert s["labelled_images"] == len(exp.data) - len(index)
    assert sorted(int(p.stem) for p in (out / "unlabeled_probs").glob("*.npy")) == [0, 1]
    info = json.loads((out / "bundle" / "bundle.json").read_text())
    assert len(info["members"]) == 1 and info["tta"] == "none" and info["rule"]["thresholds"] is None
    student = load_bundle(out / "bundle", "cpu")
    h = record["holdout"]
    assert h["images"] == len(index)
    rows = score_rows(student.ensemble("cpu"), exp.data, index, None, None, None, 12)
    assert h["student"]["miou"] == pytest.approx(rows["ensemble"]["miou"], abs=1e-12)
    report = json.loads((exp.run_dir / "ensemble" / "oof_metrics.json").read_text())
    for key in ("single", "ensemble", "tuned"):
        assert h[key]["miou"] == pytest.approx(report["holdout"][key]["miou"], abs=1e-12)
    t = record["test"]
    assert t["images"] == 24 and {"single", "ensemble", "tuned", "student"} <= set(t)
    test_rows = json.loads((tmp_path / "pred" / "test_metrics.json").read_text())["rows"]
    assert t["ensemble"]["miou"] == pytest.approx(test_rows["ensemble"]["miou"], abs=1e-12)
    lat = record["latency"]
    shipped = json.loads((exp.run_dir / "ensemble" / "bundle" / "bundle.json").read_text())["members"]
    assert lat["ensemble_ms"] > 0 and lat["student_ms"] > 0 and lat["ensemble_members"] == len(shipped)
    assert "student Unet:resnet18" in printed and "ms per image" in printed
    # the normal predictor on the student's bundle: masks are the student's own argmax
    res = predict_with_bundle(student, VAL_JSON, out=tmp_path / "student_pred", device="cpu")
    assert res["images"] == 24 and res["test_metrics"]["rows"]["ensemble"]["miou"] == \
        pytest.approx(t["student"]["miou"], abs=1e-12)
    # ONNX export and the onnx runtime apply to it as to any bundle
    from ensemble.onnx_export import export_bundle

    assert len(export_bundle(out / "bundle")) == 1
    images = [exp.data.read_image(index[0])]
    onnx = load_bundle(out / "bundle", runtime="onnx").ensemble("cpu").predict_batch(images)[0]
    np.testing.assert_allclose(onnx, load_bundle(out / "bundle").ensemble("cpu").predict_batch(images)[0], atol=1e-4)


def test_multilabel_student_packs_every_label_channel_then_the_teacher(sample_cache, tmp_path):
    """Multilabel: C label channels (0/1, 255 ignored) then C teacher channels, and a short run trains."""
    from tests.conftest import SAMPLE_DIR, tiny_config
    from trainables.data import load_dataset
    from trainables.dataset import SegDataset
    from trainables.kd import DistillTrainer, SoftItem, SoftTargetSet

    data = load_dataset(SAMPLE_DIR / "annotations-multilabel.json", task="multilabel", cache_dir=sample_cache)
    C = data.num_classes
    items = []
    for i in range(4):
        _, mask = SegDataset(data, [i], None, 64).load(i)
        probs = np.clip(mask.transpose(2, 0, 1).astype(np.float16), 0, 1) * 0.5 + 0.25  # 0.25 / 0.75
        np.save(tmp_path / f"{i}.npy", probs)
        items.append(SoftItem(tmp_path / f"{i}.npy", index=i))
    ds = SoftTargetSet(data, items, transform=None, max_size=64)
    _, packed = ds.load(0)
    _, mask = SegDataset(data, [0], None, 64).load(0)
    assert packed.shape[-1] == 2 * C
    assert (packed[..., :C] == mask).all() and (packed[..., C:] == np.load(items[0].probs).transpose(1, 2, 0)).all()
    cfg = tiny_config(**{"data.task": "multilabel", "data.max_size": 64, "train.image_size": [32, 48],
                         "train.batch_size": 2, "train.epochs": 1, "loss.name": "bce"})
    records = list(DistillTrainer(cfg, data, items, temperature=2.0, alpha=0.5).epochs())
    assert math.isfinite(records[0]["train_loss"])
