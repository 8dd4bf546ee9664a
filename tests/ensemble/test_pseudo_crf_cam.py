"""Pseudo-labels, DenseCRF post-processing and Grad-CAM on the shipped CamVid sample.

Reuses the tiny experiment of tests/ensemble/test_ensemble.py (2 folds x 2 tiny Unets) and runs
``ensemble/run.py --crf --pseudo-label --pseudo-per-fold --cam`` on it once, in process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.ensemble.test_ensemble import NUM_CLASSES, ROOT, _one_torch_thread, experiment  # noqa: F401 (fixtures)
from trainables.errors import InputError

VAL_IMAGES = ROOT / "data" / "camvid-sample" / "val" / "images"
UNLABELLED = 6


def _has_crf() -> bool:
    from ensemble.crf import missing

    return missing() is None


needs_crf = pytest.mark.skipif(not _has_crf(), reason="pydensecrf2 is not installed (optional: pip install pydensecrf2)")


@pytest.fixture(scope="module")
def extras_run(experiment, tmp_path_factory):  # noqa: F811
    """One ensemble run with every option of this file; its outputs are checked below."""
    from ensemble.run import main

    tmp = tmp_path_factory.mktemp("extras")
    unlabelled = tmp / "unlabelled"
    unlabelled.mkdir()
    for p in sorted(VAL_IMAGES.iterdir())[:UNLABELLED]:
        shutil.copy(p, unlabelled / p.name)
    run_dir = tmp / "run"
    run_dir.mkdir()
    for name in ("experiment.json", "folds.json", "trials.csv"):
        shutil.copy(experiment.run_dir / name, run_dir / name)
    args = ["--experiment", run_dir, "--top-k", 1, "--wandb", "disabled", "--pseudo-label", unlabelled,
            "--pseudo-confidence", 0.2, "--pseudo-per-fold", "--cam", "Road", "--cam-images", 2]
    main([str(a) for a in args + (["--crf"] if _has_crf() else [])])
    return SimpleNamespace(run_dir=run_dir, report=run_dir / "ensemble", pseudo=run_dir / "pseudo",
                           unlabelled=unlabelled)


# --------------------------------------------------------------------------- pseudo-labels


def test_confidence_filter():
    from ensemble.pseudo import confident_labels

    probs = np.array([[[0.7, 0.2]], [[0.3, 0.5]], [[0.0, 0.3]]])  # (C=3, H=1, W=2)
    decision = np.array([[0, 1]], np.uint8)
    np.testing.assert_array_equal(confident_labels(probs, decision, 0.6), [[0, 255]])
    np.testing.assert_array_equal(confident_labels(probs, decision, 0.5), [[0, 1]])
    np.testing.assert_array_equal(confident_labels(probs, np.array([[255, 1]], np.uint8), 0.0), [[255, 1]])


@pytest.mark.slow
def test_pseudo_labels_round_trip_through_the_loader(experiment, extras_run):  # noqa: F811
    from trainables.data import load_dataset

    names = sorted(p.name for p in extras_run.unlabelled.iterdir())
    for fold in range(2):
        root = extras_run.pseudo / f"fold{fold}"
        pseudo = load_dataset(root, cache_dir=experiment.cache)
        assert pseudo.class_names == experiment.data.class_names
        assert pseudo.ids == names and len(pseudo) == UNLABELLED
        summary = json.loads((root / "pseudo.json").read_text())
        assert summary["confidence"] == 0.2 and summary["images"] == UNLABELLED
        assert len(summary["members"]) == 1  # that fold's member only
        for i in range(len(pseudo)):
            mask = pseudo.read_mask(i)
            with Image.open(extras_run.unlabelled / names[i]) as im:
                assert mask.shape == (im.height, im.width)
            values = set(np.unique(mask).tolist())
            assert values <= set(range(NUM_CLASSES)) | {255}
            kept = float((mask != 255).mean())
            assert kept == pytest.approx(summary["kept_share_per_image"][names[i]])
        assert 0 < summary["kept_share"] < 1  # the confidence filter marked some pixels ignore, not all


def test_pseudo_labels_are_the_fold_members_decision_where_confident(experiment, extras_run):  # noqa: F811
    """Each fold's masks, recomputed here: that fold's member predicts the image, the decision rule of the
    bundle is applied by hand (argmax; with kept thresholds, a pixel whose argmax probability is below its
    class's threshold falls to the fallback class), then pixels whose probability of that label is below
    --pseudo-confidence become 255."""
    import csv

    import torch

    from ensemble.predictor import TTA, Ensemble, load_member
    from trainables.data import read_image

    with open(extras_run.run_dir / "trials.csv", newline="") as fh:
        checkpoints = {r["trial_id"]: r["checkpoint"] for r in csv.DictReader(fh)}
    bundle = json.loads((extras_run.report / "bundle" / "bundle.json").read_text())
    rule = bundle["rule"]["thresholds"]  # None: argmax
    assert bundle["rule"]["crf"] is None  # (no CRF here: its refinement is not recomputed)
    assert rule is None or not any(rule.get("min_area") or [])
    tta = json.loads((extras_run.report / "members.json").read_text())["tta"]
    confidence = 0.2
    names = sorted(p.name for p in extras_run.unlabelled.iterdir())
    for fold in range(2):
        root = extras_run.pseudo / f"fold{fold}"
        summary = json.loads((root / "pseudo.json").read_text())
        best = max((r for r in experiment.rows if r["fold"] == fold), key=lambda r: r["best_val_miou"])
        assert summary["members"] == [best["trial_id"]]  # top-1 of that fold
        ens = Ensemble([load_member(checkpoints[n], n, torch.device("cpu")) for n in summary["members"]],
                       TTA.parse(tta), device="cpu")
        kept = []
        for name in names:
            image = read_image(extras_run.unlabelled / name)
            probs = ens.predict_batch([image])[0].astype(np.float64)
            label = probs.argmax(0)
            if rule is not None:
                top = probs.max(0)
                label = np.where(top < np.asarray(rule["thresholds"])[label], rule["fallback"], label)
            chosen = np.take_along_axis(probs, label[None], 0)[0]
            want = np.where(chosen < confidence, 255, label).astype(np.uint8)
            with Image.open(root / "masks" / f"{Path(name).stem}.png") as im:
                got = np.asarray(im)
            assert got.shape == want.shape
            assert (got != want).mean() <= 1e-4, f"fold {fold} {name}: {(got != want).mean():.2%} of pixels differ"
            assert (root / "images" / name).read_bytes() == (extras_run.unlabelled / name).read_bytes()
            kept.append(float((want != 255).mean()))
        assert summary["kept_share"] == pytest.approx(np.mean(kept), abs=1e-4)
        assert 0 < summary["kept_share"] < 1  # the confidence filter marked some pixels ignore, not all


def test_pseudo_labels_train_only_never_validation(experiment, extras_run, tmp_path):  # noqa: F811
    from trainables.extra import check_extra_train, with_extra_train
    from trainables.folds import load_or_make_folds, train_val_indices

    data, folds = experiment.data, experiment.folds
    d = {"task": "multiclass", "unannotated": "background", "cache_dir": str(experiment.cache),
         "extra_train": [str(extras_run.pseudo / "fold{fold}")]}
    check_extra_train(d, data, folds)
    for fold in range(2):
        train_idx, val_idx = train_val_indices(folds, fold, data.ids)
        combined, train_plus = with_extra_train(data, train_idx, d, fold)
        assert len(combined) == len(data) + UNLABELLED
        extra = [i for i in train_plus if i >= len(data)]
        assert len(extra) == UNLABELLED and train_plus[:len(train_idx)] == train_idx
        assert not set(extra) & set(val_idx) and all(i < len(data) for i in val_idx)
        assert all(f"pseudo/fold{fold}/masks" in str(combined.mask_paths[i]) for i in extra)
        # the validation images are the labelled ones, read from the labelled dataset
        assert [combined.ids[i] for i in val_idx] == [data.ids[i] for i in val_idx]
    # folds stay the labelled dataset's: the fingerprint check still accepts them
    f = json.loads((experiment.run_dir / "folds.json").read_text())
    again = load_or_make_folds(experiment.run_dir / "folds.json", "kfold", k=2, seed=0, ids=data.ids,
                               presence=data.presence,
                               fingerprint=data.fingerprint, group_regex=None)
    assert again == f["folds"]
    # classes must match: one error naming the pseudo-label folder
    bad = tmp_path / "bad"
    shutil.copytree(extras_run.pseudo / "fold0", bad)
    (bad / "classes.txt").write_text("".join(f"other{c}\n" for c in range(NUM_CLASSES)))
    with pytest.raises(InputError, match="bad: extra training data has classes"):
        with_extra_train(data, train_idx, {**d, "extra_train": [str(bad)]}, 0)


def test_plain_cli_trains_with_pseudo_labels(experiment, extras_run, tmp_path, capsys):  # noqa: F811
    from trainables.train import main

    out = tmp_path / "plain"
    main(["--data", str(experiment.data.source), "--fold", "1", "--out", str(out), "--set",
          f"data.extra_train=['{extras_run.pseudo / 'fold{fold}'}']", f"data.cache_dir={experiment.cache}",
          "data.max_size=96", "model.weights=null", "model.encoder=resnet18", "train.image_size=[64,96]",
          "train.epochs=1", "train.max_train_batches=1", "train.device=cpu", "folds.k=2",
          "model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}"])
    printed = capsys.readouterr().out
    n_val = len(experiment.folds[1])
    assert f"{72 - n_val + UNLABELLED} train ({UNLABELLED} extra) / {n_val} val" in printed
    assert (out / "fold1" / "model.pt").exists()


def test_search_makes_extra_train_paths_absolute():
    pytest.importorskip("ray")
    from tune.search import absolute_data_paths

    base = absolute_data_paths({"data": {"path": "a.json", "extra_train": ["runs/x/pseudo/fold{fold}"]}})
    assert base["data"]["extra_train"] == [str(Path("runs/x/pseudo").resolve() / "fold{fold}")]
    one = absolute_data_paths({"data": {"path": "a.json", "extra_train": "runs/x/pseudo"}})  # one path alone
    assert one["data"]["extra_train"] == [str(Path("runs/x/pseudo").resolve())]


def test_compare_needs_the_same_folds(experiment, extras_run, tmp_path):  # noqa: F811
    from ensemble.compare import compare_oof

    exp = json.loads((extras_run.run_dir / "experiment.json").read_text())
    report = json.loads((extras_run.report / "oof_metrics.json").read_text())
    assert report["extra_train"] is None
    # another experiment on the same data and folds, with its own numbers and extra training data
    other = tmp_path / "other"
    shutil.copytree(extras_run.run_dir, other)
    their_exp = json.loads((other / "experiment.json").read_text())
    their_exp["settings"]["fixed"]["data"]["extra_train"] = ["runs/x/pseudo/fold{fold}"]
    (other / "experiment.json").write_text(json.dumps(their_exp))
    theirs = {k: {**report[k], "miou": v} for k, v in (("single", 0.125), ("ensemble", 0.25), ("tuned", 0.375))}
    (other / "ensemble" / "oof_metrics.json").write_text(json.dumps(theirs))
    both = compare_oof(extras_run.run_dir, other, report, exp)
    assert both["this"] == {"experiment": str(extras_run.run_dir), "extra_train": None,
                            **{k: report[k]["miou"] for k in ("single", "ensemble", "tuned", "crf") if k in report}}
    assert both["other"] == {"experiment": str(other), "extra_train": ["runs/x/pseudo/fold{fold}"],
                             "single": 0.125, "ensemble": 0.25, "tuned": 0.375}
    folds = json.loads((other / "folds.json").read_text())
    folds["folds"] = folds["folds"][::-1]
    (other / "folds.json").write_text(json.dumps(folds))
    with pytest.raises(InputError, match="other folds"):
        compare_oof(extras_run.run_dir, other, report, exp)


# --------------------------------------------------------------------------- DenseCRF


@needs_crf
def test_crf_output_is_a_probability_map_of_the_input_shape(experiment, extras_run):  # noqa: F811
    from ensemble.crf import GRID, OOFImages, refine, refine_at

    load = OOFImages(experiment.data, 96, extras_run.report / "oof_probs")
    i = int(sorted(extras_run.report.joinpath("oof_probs").glob("*.npy"))[0].stem)
    image, probs, mask = load(i)
    assert probs.shape == (NUM_CLASSES, *image.shape[:2])
    for params in (None, GRID[-1]):
        q = refine(probs, image, params)
        assert q.shape == probs.shape and q.dtype == np.float32
        assert np.isfinite(q).all() and q.min() >= 0
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
        assert np.abs(q - probs).max() > 1e-3  # it did something
    full = experiment.data.read_image(i)  # at the original size: refined at 96 px, returned at full size
    big = np.stack([np.asarray(Image.fromarray(c).resize(full.shape[1::-1])) for c in probs])
    q = refine_at(big / big.sum(0, keepdims=True), full, GRID[0], 96)
    assert q.shape == (NUM_CLASSES, *full.shape[:2])
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        refine(probs, image[:-1], None)


@needs_crf
def test_crf_fitted_out_of_fold_and_reported_beside_the_thresholds(extras_run):
    report = json.loads((extras_run.report / "oof_metrics.json").read_text())
    post = json.loads((extras_run.report / "postprocessing.json").read_text())["crf"]
    assert {"single", "ensemble", "tuned", "crf"} <= set(report)
    # both cross-fitted: the CRF competes with the best rule kept before it, (c) or else (b)
    before = "tuned" if report["steps"]["thresholds"]["kept"] else "ensemble"
    assert post["step"]["compared_with"] == before
    assert post["miou_without"] == report[before]["miou"] and post["miou_with"] == report["crf"]["miou"]
    assert post["kept"] == (post["miou_with"] > post["miou_without"])  # kept only if it helps, out of sample
    assert post["miou_with_in_sample"] == report["crf_in_sample"]["miou"]
    assert set(post["params_per_fold"]) == {"0", "1"}
    assert len(post["grid"]) == 9 and post["grid"][0]["params"] is None
    assert len(post["thresholds"]["thresholds"]) == NUM_CLASSES
    assert len(list((extras_run.report / "oof_probs_crf").glob("*.npy"))) == report["oof_images"]
    page = (extras_run.run_dir / "report" / "report.html").read_text()  # row (d) on the report page too
    assert "<td>(d) CRF</td>" in page
    assert "DenseCRF: " + ("kept" if post["kept"] else "not kept (no gain)") in page


@pytest.mark.slow
def test_crf_missing_package_is_one_line(experiment, monkeypatch, capsys):  # noqa: F811
    import ensemble.crf
    from ensemble.run import main

    monkeypatch.setattr(ensemble.crf, "missing", lambda: "needs the optional package pydensecrf2, which is not "
                                                         "installed: pip install pydensecrf2==1.1")
    with pytest.raises(SystemExit) as exc:
        main(["--experiment", str(experiment.run_dir), "--crf"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: command line: --crf: needs the optional package pydensecrf2, which is not installed: "
                   "pip install pydensecrf2==1.1"]


# --------------------------------------------------------------------------- Grad-CAM


def test_cam_overlays_in_the_report(extras_run):
    figure = extras_run.report / "cam_Road.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    overlays = sorted((extras_run.report / "cam" / "Road").glob("*/*.png"))
    assert len(overlays) == 2 * 2  # 2 members (best of each fold) x 2 images


@pytest.mark.parametrize("arch, encoder, kwargs, layer", [
    ("Unet", "resnet18", {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, "decoder"),
    ("segformer", "nvidia/mit-b0", {}, "linear_fuse"),
])
def test_cam_for_both_model_families(experiment, tmp_path, arch, encoder, kwargs, layer):  # noqa: F811
    import torch

    from ensemble.cam import grad_cam, target_layer, write_cams
    from ensemble.predictor import Member
    from trainables.models import build_model

    torch.manual_seed(0)
    data = experiment.data
    model = build_model(arch, encoder, data.num_classes, None, kwargs).eval()
    named = dict(model.named_modules())
    assert any(n.endswith(layer) and m is target_layer(model) for n, m in named.items())
    member = Member(arch.lower(), 0, model, (64, 96), "multiclass", data.class_names)
    image = data.read_image(0)
    heat, predicted = grad_cam(member, image, 4)
    assert heat.shape == predicted.shape == image.shape[:2]
    assert np.isfinite(heat).all() and 0 <= heat.min() and heat.max() <= 1
    files = write_cams([member], [(data.ids[0], image), (data.ids[1], data.read_image(1))], 4, data.class_names,
                       tmp_path)
    assert [f.name for f in files[:2]] == [Path(data.ids[0]).stem + ".png", Path(data.ids[1]).stem + ".png"]
    for f in files[:2]:
        with Image.open(f) as im:
            assert im.size == (image.shape[1], image.shape[0]) and im.mode == "RGB"
            assert np.abs(np.asarray(im).astype(int) - image).mean() > 1  # an overlay, not the bare image
    assert files[-1] == tmp_path / "cam_Road.png" and files[-1].exists()
