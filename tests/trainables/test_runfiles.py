"""The run directory's format (trainables/runfiles.py): one Ray-free module both sides use.

The ensemble step, the predictor and the report import no Ray (checked in a fresh interpreter,
with every project module the ensemble step imports, even inside its functions), and the readers
read back what the writers wrote.
"""
from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.errors import InputError
from trainables.runfiles import (SEARCH_STATE, RunFiles, best_per_fold, experiment_location, read_experiment,
                                 read_folds, read_trial_file, read_trials_csv, redact, score_column,
                                 write_experiment_json, write_trials_csv)

ROOT = Path(__file__).resolve().parents[2]
NO_RAY = ("ensemble/run.py", "ensemble/steps.py", "ensemble/extras.py", "ensemble/predict.py", "tune/report.py")


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        names |= {m for m in modules if m.split(".")[0] in ("trainables", "tune", "ensemble")}
    return names


@pytest.mark.slow
def test_ensemble_predict_and_report_import_no_ray():
    """``ensemble/run.py`` imports the report, the members, the bundle, ... when it runs: none of them,
    nor what they import, may load Ray (only a cluster run would need it)."""
    modules = sorted({m for f in NO_RAY for m in project_imports(ROOT / f)} | {"ensemble.run", "ensemble.predict",
                                                                                "tune.report"})
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'ray' not in sys.modules, f'importing {name} loads Ray'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"ensemble.members", "ensemble.bundle", "tune.report"} <= set(modules)


def test_paths_of_a_run_directory(tmp_path):
    files = RunFiles(tmp_path / "x")
    assert files.trials_csv == tmp_path / "x" / "trials.csv"
    assert files.studies_url == f"sqlite:///{tmp_path / 'x' / 'studies.db'}"
    assert files.ensemble().bundle_dir == tmp_path / "x" / "ensemble" / "bundle"
    assert files.ensemble(debug=True).members_json == tmp_path / "x" / "ensemble-debug" / "members.json"
    assert files.report_html == tmp_path / "x" / "report" / "report.html"
    assert files.earlier_state() == []
    (tmp_path / "x" / "tune").mkdir(parents=True)
    files.asha_state.write_text("{}")
    (tmp_path / "x" / "report").mkdir()  # not state
    assert files.earlier_state() == ["asha_state.json", "tune"]
    assert set(SEARCH_STATE) >= {"experiment.json", "folds.json", "trials.csv", "studies.db"}


def test_experiment_json_round_trip_and_refused_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tune/run.py", "--wandb-api-key", "SECRET", "--space", "s.yaml"])
    settings = {"space": "s.yaml", "search": {"metric": "val_miou", "mode": "max"}, "trial_storage": None}
    write_experiment_json(tmp_path, settings, {"fingerprint": "abc", "images": 3})
    saved = read_experiment(tmp_path)
    assert saved["settings"] == settings and saved["dataset"] == {"fingerprint": "abc", "images": 3}
    assert saved["command"] == ["tune/run.py", "--wandb-api-key", "***", "--space", "s.yaml"]
    assert saved["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    with pytest.raises(InputError, match="the dataset changed"):
        write_experiment_json(tmp_path, settings, {"fingerprint": "other"})
    assert read_experiment(tmp_path) == saved  # nothing rewritten
    assert redact(["--token", "t", "--token=x", "--name", "n"]) == ["--token", "***", "--token=x", "--name", "n"]


def test_missing_or_damaged_files_are_one_line_errors(tmp_path):
    with pytest.raises(InputError) as err:
        read_experiment(tmp_path)
    assert str(err.value) == f"{tmp_path / 'experiment.json'}: missing: is this an experiment directory written " \
                             "by tune/run.py?"
    (tmp_path / "experiment.json").write_text('{"settings": ')
    with pytest.raises(InputError, match="experiment.json: unreadable"):
        read_experiment(tmp_path)
    (tmp_path / "folds.json").write_text('{"meta": {}}')
    with pytest.raises(InputError, match="folds.json: no 'folds' list"):
        read_folds(tmp_path)
    with pytest.raises(InputError, match="no trials.csv"):
        read_trials_csv(tmp_path / "trials.csv")


def test_folds_as_trainables_writes_them(tmp_path):
    import numpy as np

    from trainables.folds import load_or_make_folds, read_holdout

    ids = [f"img{i}" for i in range(10)]
    folds = load_or_make_folds(RunFiles(tmp_path).folds_json, "kfold", k=3, seed=0, ids=ids,
                               presence=np.ones((10, 2), bool), fingerprint="fp", holdout=0.2)
    assert read_folds(tmp_path) == folds
    assert sorted(sum(folds, []) + read_holdout(RunFiles(tmp_path).folds_json)) == sorted(ids)


def test_trials_csv_round_trip(tmp_path):
    """Rows with different keys (a retrain trial without a sampled parameter) keep every column, in
    first-seen order; the reader gives strings, as the csv module reads the file."""
    rows = [{"trial_id": "a", "fold": 0, "status": "completed", score_column("val_miou"): 0.5, "param:lr": 0.001},
            {"trial_id": "b", "fold": 1, "status": "stopped", score_column("val_miou"): "", "checkpoint": "s3://b/x"}]
    path = tmp_path / "trials.csv"
    write_trials_csv(path, rows)
    back = read_trials_csv(tmp_path)  # a run directory works too
    assert back == read_trials_csv(path)
    assert list(back[0]) == ["trial_id", "fold", "status", "best_val_miou", "param:lr", "checkpoint"]
    with open(path, newline="") as fh:
        assert list(csv.DictReader(fh)) == back
    assert back[0]["param:lr"] == "0.001" and back[1]["checkpoint"] == "s3://b/x" and back[0]["checkpoint"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name != "trials.csv"]  # no temporary file left


def test_best_per_fold_brute_force():
    """Against a brute force over every row: finished trials only, empty scores skipped, per mode."""
    rows = [{"trial_id": t, "fold": str(f), "status": s, "best_val_loss": v}
            for t, f, s, v in [("a", 0, "completed", "0.3"), ("b", 0, "stopped", "0.2"), ("c", 0, "error", "0.1"),
                               ("d", 1, "completed", ""), ("e", 1, "completed", "0.9"), ("f", 2, "running", "0.1")]]
    for mode, pick in (("min", min), ("max", max)):
        expect = {}
        for fold in {int(r["fold"]) for r in rows}:
            ok = [r for r in rows if int(r["fold"]) == fold and r["status"] in ("completed", "stopped")
                  and r["best_val_loss"]]
            if ok:
                expect[fold] = pick(ok, key=lambda r: float(r["best_val_loss"]))["trial_id"]
        assert {f: r["trial_id"] for f, r in best_per_fold(rows, "val_loss", mode).items()} == expect


def test_trial_files_in_the_run_directory_or_a_recorded_storage(tmp_path):
    run = tmp_path / "runs" / "x"
    (run / "tune" / "fold0_t1").mkdir(parents=True)
    (run / "tune" / "fold0_t1" / "result.json").write_text("{}\n")
    assert read_trial_file(run, "fold0_t1", "result.json") == "{}\n"
    assert read_trial_file(run, "fold0_t2", "result.json") is None
    shared = tmp_path / "shared"
    (run / "experiment.json").write_text(json.dumps({"settings": {"trial_storage": str(shared)}}))
    assert experiment_location(run, str(shared), "fold0_t1") == f"{shared}/x/fold0_t1"
    assert experiment_location(run, "s3://b/p?region=r", "t") == "s3://b/p/x/t?region=r"
    assert read_trial_file(run, "fold0_t1", "result.json") is None  # the recorded storage is read, not tune/
    (shared / "x" / "fold0_t1").mkdir(parents=True)
    (shared / "x" / "fold0_t1" / "result.json").write_text('{"epoch": 1}\n')
    assert read_trial_file(run, "fold0_t1", "result.json") == '{"epoch": 1}\n'
