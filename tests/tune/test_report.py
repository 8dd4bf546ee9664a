"""The experiment report: one self-contained HTML page with interactive plotly figures (plotly.js
embedded once, nothing loaded from the network), numbers to 4 significant digits, the cross-fold
view, the ensemble's out-of-fold / holdout / test rows and its members' cost.

The experiment is written by hand (experiment.json, trials.csv, Optuna studies, Tune's per-trial
result.json, the ensemble's files), so no search runs."""
from __future__ import annotations

import csv
import html
import json
import re

import numpy as np
import optuna
import pytest
from PIL import Image

from tune.report import write_report
from tune.report_html import fmt

CLASSES = ["background", "road", "car"]
# fold -> (trial id, loss, encoder, lr, score): ce wins both folds, each encoder wins one fold
TRIALS = {0: [("a0", "ce", "mit-b0", 0.0017128179054138398, 0.30), ("b0", "dice", "mit-b0", 0.0005, 0.25),
              ("c0", "ce", "mit-b1", 0.003, 0.20)],
          1: [("a1", "ce", "mit-b1", 0.002, 0.35), ("b1", "dice", "mit-b0", 0.0004, 0.28),
              ("c1", "dice", "mit-b1", 0.001, 0.10)]}
EPOCHS = 3


def metrics(miou: float) -> dict:
    return {"miou": miou, "dice": miou + 0.1, "biou": miou / 2, "pixel_acc": 0.9,
            "iou_per_class": [miou, miou + 0.05, None]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "demo"
    (run / "tune").mkdir(parents=True)
    (run / "experiment.json").write_text(json.dumps({
        "settings": {"name": "demo", "space": "segformer.yaml", "search": {"metric": "val_miou", "mode": "max"}},
        "dataset": {"source": "data/sample.json", "images": 10, "class_names": CLASSES}}))
    storage = f"sqlite:///{run / 'studies.db'}"
    rows = []
    for fold, trials in TRIALS.items():
        study = optuna.create_study(storage=storage, study_name=f"demo-fold{fold}", direction="maximize")
        for tid, loss, encoder, lr, score in trials:
            trial = study.ask()
            trial.suggest_categorical("loss.name", ["ce", "dice"])
            trial.suggest_categorical("model.encoder", ["mit-b0", "mit-b1"])
            trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
            curve = [score * (e + 1) / EPOCHS for e in range(EPOCHS)]
            for epoch, value in enumerate(curve, 1):
                trial.report(value, epoch)
            study.tell(trial, score)
            (run / "tune" / f"fold{fold}_{tid}").mkdir()
            (run / "tune" / f"fold{fold}_{tid}" / "result.json").write_text(
                "".join(json.dumps({"epoch": e, "val_miou": v}) + "\n" for e, v in enumerate(curve, 1)))
            rows.append({"trial_id": tid, "fold": fold, "status": "completed", "epochs": EPOCHS,
                         "best_epoch": EPOCHS, "best_val_miou": repr(score), "checkpoint": "",
                         "param:loss.name": loss, "param:model.encoder": encoder, "param:optimizer.lr": repr(lr)})
    with open(run / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ens = run / "ensemble"
    (ens / "predictions").mkdir(parents=True)
    checkpoint = run / "member.pt"
    checkpoint.write_bytes(b"\0" * 2_500_000)  # 2.5 MB
    (ens / "members.json").write_text(json.dumps({
        "selection": "topk", "top_k": 1, "voting": "soft", "tta": "none",
        "members": {"0": [{"trial_id": "a0", "score": 0.3, "epoch": 3, "checkpoint": str(checkpoint),
                           "ms_per_image": 12.3456}],
                    "1": [{"trial_id": "a1", "score": 0.35, "epoch": 3, "checkpoint": str(checkpoint)}]}}))
    tuned = {**metrics(0.41), "confusion": [[5, 1, 0], [1, 7, 2], [0, 1, 3]]}
    (ens / "oof_metrics.json").write_text(json.dumps({
        "single": metrics(0.31), "ensemble": metrics(0.36), "tuned": tuned, "tuned_in_sample": metrics(0.43),
        "crf": metrics(0.40), "postprocessing": {"kept": False},
        "optimism": {"tuned": 0.012345678}, "class_names": CLASSES, "oof_images": 10,
        "holdout": {"images": 5, "single": metrics(0.29), "tuned": metrics(0.38)}}))
    (ens / "predictions" / "test_metrics.json").write_text(json.dumps({
        **metrics(0.37), "images": 3,
        "rows": {"single": metrics(0.27), "ensemble": metrics(0.33), "tuned": metrics(0.37)}}))
    grid = [0.3, 0.5, 0.7]
    (ens / "thresholds.json").write_text(json.dumps({
        "thresholds": [0.0, 0.5, 0.3], "metric": "iou",
        "curves": {"thresholds": grid, "score": [None, [0.5, 0.6, 0.55], [0.2, 0.3, 0.25]]}}))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ens / "overlays.png")
    return run


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return write_report(run_dir).read_text()


def visible_text(page: str) -> str:
    """What a reader sees: the page without its scripts (plotly.js, figure data) and tags."""
    no_scripts = re.sub(r"<script.*?</script>", " ", page, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", " ", no_scripts))


def test_figures_are_plotly_with_plotlyjs_embedded_once_and_nothing_from_the_network(page):
    assert page.count("plotly.js v") == 1  # the bundle's banner: embedded with the first figure only
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script is loaded from elsewhere"
    assert "<img src='fold" not in page  # the study plots are no longer PNG files
    # learning curves; per fold: history, per-epoch values, importances, parallel coordinates, slices;
    # the ensemble: class-wise IoU, threshold curves, confusion
    assert page.count('class="plotly-graph-div"') == 1 + 2 * 5 + 3


def test_images_left_are_pictures_that_exist(run_dir, page):
    images = re.findall(r"<img src='([^']+)'>", page)
    assert images == ["../ensemble/overlays.png"]
    assert all((run_dir / "report" / i).exists() for i in images)


def test_numbers_have_four_significant_digits(page):
    text = visible_text(page)
    assert "0.0017128179054138398" not in text and "0.001713" in text
    for number in re.findall(r"\d*\.\d+", text):
        assert len(number.replace(".", "").lstrip("0")) <= 4, number


@pytest.mark.parametrize("value, shown", [(0.0017128179054138398, "0.001713"), ("0.30000000000000004", "0.3"),
                                          (6.0, "6"), ("6", "6"), (1e-05, "1e-5"), (123456.7, "1.235e5"),
                                          (float("nan"), "–"), ("", "–"), ("12e45678", "12e45678"),
                                          ("nvidia/mit-b0", "nvidia/mit-b0"), ("0.5*ce+0.5*dice", "0.5*ce+0.5*dice")])
def test_fmt(value, shown):
    assert fmt(value) == shown


def test_cross_fold_view_says_what_won_everywhere_and_what_won_one_fold(page):
    text = " ".join(visible_text(page).split())
    assert "ce on every fold" in text
    assert "mit-b0: best on fold 0 only, in the top 3 on every fold" in text
    assert "mit-b1: best on fold 1 only, in the top 3 on every fold" in text
    assert "top trials overlap on every fold: fold 0 0.0005–0.003; fold 1 0.0004–0.002" in text


def test_ensemble_oof_holdout_and_test_rows_with_optimism(page):
    text = " ".join(visible_text(page).split())
    oof = text[text.index("Ensemble, out-of-fold (10 images)"):text.index("Holdout")]
    assert "(a) best single 0.31" in oof and "(b) ensemble (in-sample) 0.36" in oof
    # its members were chosen on these images: the note says so and points to the holdout
    assert ("Row (b) is in-sample: its members were chosen on these same out-of-fold images (top-k by "
            "validation score, greedy selection, latency budget), as was (a)'s trial, so both flatter; quote the "
            "holdout's rows (folds.holdout) below.") in oof
    assert "(c) post-processed 0.41 0.51 0.205 0.9 0.01235" in oof  # optimism to 4 digits
    assert "in-sample (fitted and scored on the same images) 0.43" in oof
    assert "(d) CRF 0.4" in oof and "DenseCRF: not kept (no gain)" in oof
    holdout = text[text.index("Holdout (5 images)"):text.index("Test (3 images")]
    assert "(a) best single 0.29" in holdout and "(c) post-processed 0.38" in holdout
    assert "(b) ensemble" not in holdout  # only the rows the file has
    test = text[text.index("Test (3 images"):text.index("Members")]
    assert "(a) best single 0.27" in test and "(b) ensemble 0.33" in test and "(c) post-processed 0.37" in test
    assert "in-sample" not in test  # images the members were not chosen on


def test_oof_note_without_a_holdout_says_how_to_get_one():
    from tune.report_ensemble import oof_note

    note = html.unescape(oof_note({"single": metrics(0.3), "ensemble": metrics(0.35)}))
    assert "Row (b) is in-sample: its members were chosen on these same out-of-fold images" in note
    assert "this search has no holdout: set folds.holdout (e.g. --set folds.holdout=0.1)" in note
    assert oof_note({"single": metrics(0.3)}) == ""  # no row (b), nothing to say


def test_members_and_their_cost(page):
    text = " ".join(visible_text(page).split())
    members = text[text.index("Members"):]
    assert "2 members, 5.0 MB of checkpoints in all" in members
    assert "0 a0 0.3 3 mit-b0 2.5 12.35" in members  # checkpoint MB, ms per image where recorded
    assert "1 a1 0.35 3 mit-b1 2.5 –" in members
