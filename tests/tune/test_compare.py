"""Tune against a W&B sweep (tune/compare.py): two offline runs of the real sweep agent on the tiny
space and the shipped sample, against a Tune experiment written by hand (trials.csv, Tune's
result.json, an Optuna study), checked against a running max computed here from what each run logged."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.tune.wandb_records import history, records

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"
SWEEP_EPOCHS = (3, 2)  # the first sweep run trains 3 epochs, the second 2
NOW = time.time()
# fold 0: trial id -> (per-epoch val_miou, start time); "c" has no result.json, only its Optuna study
TUNE = {"a": ([0.05, 0.50, 0.45], NOW - 100), "b": ([0.02, 0.03], NOW - 200), "c": ([0.04, 0.60], None)}


def env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "SEGHPO_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory) -> list[Path]:
    """Two offline sweep runs on fold 0; the second starts once the first has begun its W&B run, so
    they overlap but their start order is known. Their folders, in start order."""
    tmp = tmp_path_factory.mktemp("sweep")
    wandb_dir = tmp / "w" / "wandb"
    procs, folders = [], []
    for i, (epochs, params) in enumerate(zip(SWEEP_EPOCHS, [{"optimizer.lr": 0.003, "loss.name": "ce"},
                                                            {"optimizer.lr": 0.0003, "loss.name": "dice"}])):
        (tmp / f"params{i}.json").write_text(json.dumps(params))
        procs.append(subprocess.Popen(
            [sys.executable, "tune/sweep_agent.py", "--space", str(TINY), "--data", str(SAMPLE), "--fold", "0",
             "--params", str(tmp / f"params{i}.json"), "--dir", str(tmp / "w"),
             "--set", f"train.epochs={epochs}", "train.max_train_batches=1"],
            cwd=ROOT, env=env(tmp), stdout=subprocess.DEVNULL, stderr=open(tmp / f"agent{i}.log", "w")))
        deadline = time.monotonic() + 300
        while not (new := set(wandb_dir.glob("offline-run-*/run-*.wandb")) - set(folders)):
            assert procs[-1].poll() is None and time.monotonic() < deadline, (tmp / f"agent{i}.log").read_text()[-2000:]
            time.sleep(0.2)
        [run_file] = new
        folders.append(run_file)
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp / f"agent{i}.log").read_text()[-2000:]
    return [f.parent for f in folders]


def logged(folder: Path) -> list[float]:
    """val_miou per epoch as the run logged it (its history records, in epoch order)."""
    [run_file] = folder.glob("run-*.wandb")
    rows = sorted(history(run_file), key=lambda r: r["epoch"])
    return [r["val_miou"] for r in rows]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("exp") / "tiny"
    (run / "tune").mkdir(parents=True)
    (run / "experiment.json").write_text(json.dumps({"settings": {
        "name": "tiny", "space": "tiny.yaml", "search": {"metric": "val_miou", "mode": "max"}},
        "dataset": {"source": "sample.json", "images": 10, "class_names": ["background", "road"]}}))
    study = optuna.create_study(storage=f"sqlite:///{run / 'studies.db'}", study_name="tiny-fold0",
                                direction="maximize")
    rows = []
    for tid, (values, start) in TUNE.items():
        trial = study.ask()
        trial.set_user_attr("tune_trial_id", tid)
        for epoch, value in enumerate(values, 1):
            trial.report(value, epoch)
        study.tell(trial, max(values))
        if start is not None:
            (run / "tune" / f"fold0_{tid}").mkdir()
            (run / "tune" / f"fold0_{tid}" / "result.json").write_text("".join(
                json.dumps({"epoch": e, "val_miou": v, "timestamp": start + 10 * e, "time_this_iter_s": 10.0}) + "\n"
                for e, v in enumerate(values, 1)))
        rows.append({"trial_id": tid, "fold": 0, "status": "completed", "retrain": False, "epochs": len(values),
                     "best_epoch": len(values), "best_val_miou": max(values)})
    # a trial of another fold and a retrained config: neither is part of fold 0's search
    other = {"status": "completed", "epochs": 1, "best_epoch": 1, "best_val_miou": 0.9}
    rows += [{"trial_id": "d", "fold": 1, "retrain": False, **other},
             {"trial_id": "r", "fold": 0, "retrain": True, **other}]
    for tid, fold in (("d", 1), ("r", 0)):
        (run / "tune" / f"fold{fold}_{tid}").mkdir()
        (run / "tune" / f"fold{fold}_{tid}" / "result.json").write_text(json.dumps({"epoch": 1, "val_miou": 0.9}))
    with open(run / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run


def running_max(runs: list[list[float]]) -> list[tuple[int, float]]:
    flat = [v for values in runs for v in values]
    return [(i + 1, max(flat[:i + 1])) for i in range(len(flat))]


@pytest.fixture(scope="module")
def compared(experiment, sweep_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    proc = subprocess.run([sys.executable, "tune/compare.py", "--experiment", str(experiment),
                           "--sweep", *map(str, sweep_runs), "--out", str(out), "--wandb", "offline"],
                          cwd=ROOT, env=env(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "compare.csv", newline="") as fh:
        return out, list(csv.DictReader(fh)), proc.stdout


@pytest.mark.slow
def test_csv_is_the_running_best_over_epochs_in_start_order(compared, sweep_runs):
    _out, rows, _ = compared
    assert list(rows[0]) == ["search", "fold", "epochs_spent", "best_so_far", "run", "value"]
    assert {r["fold"] for r in rows} == {"0"}
    for search, runs in (("tune", [TUNE["b"][0], TUNE["a"][0], TUNE["c"][0]]),
                         ("wandb-sweep", [logged(f) for f in sweep_runs])):
        got = [(int(r["epochs_spent"]), float(r["best_so_far"])) for r in rows if r["search"] == search]
        assert [e for e, _ in got] == [e for e, _ in running_max(runs)]
        assert [b for _, b in got] == pytest.approx([b for _, b in running_max(runs)], rel=1e-12)
        assert all(x <= y for (_, x), (_, y) in zip(got, got[1:]))  # monotone
    sweep = [r for r in rows if r["search"] == "wandb-sweep"]
    assert [len(logged(f)) for f in sweep_runs] == list(SWEEP_EPOCHS)
    assert len(sweep) == sum(SWEEP_EPOCHS)
    # the run's own summary (another record of the .wandb file) agrees with the best it logged
    for folder in sweep_runs:
        [run_file] = folder.glob("run-*.wandb")
        summary = {}
        for r in records(run_file):
            if r.WhichOneof("record_type") == "summary":
                summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
        assert summary["best_score"] == pytest.approx(max(logged(folder)))


def test_summary_gives_each_best_and_the_epochs_to_reach_the_others(compared, sweep_runs):
    _out, _rows, stdout = compared
    sweep_best = max(v for f in sweep_runs for v in logged(f))
    tune_line = next(line for line in stdout.splitlines() if line.strip().startswith("tune "))
    # Tune's trials in start order b, a, c: best 0.6 at its 7th and last epoch
    assert "best 0.6 after 7 of 7 epochs (3 trials)" in tune_line
    flat = TUNE["b"][0] + TUNE["a"][0] + TUNE["c"][0]
    reach = next((i + 1 for i in range(len(flat)) if max(flat[:i + 1]) >= sweep_best), None)
    assert (f"reached after {reach} epochs" if reach else "not reached") in tune_line
    sweep_line = next(line for line in stdout.splitlines() if line.strip().startswith("wandb-sweep "))
    assert f"of {sum(SWEEP_EPOCHS)} epochs (2 trials)" in sweep_line
    assert f"best {sweep_best:.4g}" in sweep_line and ("not reached" in sweep_line) == (sweep_best < 0.6)


def test_page_embeds_plotly_and_the_table_is_logged_to_wandb(compared):
    out, rows, _ = compared
    page = (out / "compare.html").read_text()
    assert page.count("plotly.js v") == 1 and not re.search(r"<script[^>]*\bsrc=", page)
    assert page.count('class="plotly-graph-div"') == 1
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    [logged_row] = history(run_file)
    assert logged_row["sweep_comparison/_type"] == "table-file"
    assert logged_row["sweep_comparison/nrows"] == len(rows)


def test_report_shows_the_comparison_written_into_the_experiment(experiment, sweep_runs):
    from tune.compare import compare
    from tune.report import write_report

    assert "Tune against the W&B sweep" not in write_report(experiment).read_text()
    compare(experiment, [str(f) for f in sweep_runs])  # into <experiment>/compare, W&B disabled
    page = write_report(experiment).read_text()
    assert "Tune against the W&B sweep" in page and "best 0.6 after 7 of 7 epochs" in page


def test_bad_sweep_is_one_line_and_exit_2(experiment, tmp_path):
    proc = subprocess.run([sys.executable, "tune/compare.py", "--experiment", str(experiment),
                           "--sweep", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--wandb", "disabled"],
                          cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr
    assert not (tmp_path / "out").exists()
