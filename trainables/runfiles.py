"""The on-disk format of an experiment, ``runs/<name>/``: every path and file both sides use.

The search (``tune/``) writes it, the ensemble, the report and the predictor read it, and none of
them needs Ray to do so: this module imports no Ray, so the ensemble step and the report run on a
laptop without it. ``tune/experiment.py`` keeps what needs Tune (the callback that keeps
``trials.csv`` current as trials run).

    runs/<name>/
        experiment.json        resolved settings, dataset fingerprint, command, package versions
        folds.json             the folds (and the holdout), see trainables/folds.py
        trials.csv             one row per trial (columns: see :data:`PARAM_PREFIX`)
        studies.db             the searcher's Optuna studies (SQLite)
        asha_state.json        the scheduler's rungs
        budget.json            what a --time-budget / --epoch-budget search spent (tune/budget.py)
        tune/                  Ray Tune's experiment (unless experiment.json records a trial storage)
        checkpoints/           local copies of members whose checkpoint is a URI
        ensemble/              (``ensemble-debug/`` with ``--debug``): :class:`EnsembleFiles`
        pseudo/                pseudo-labels
        report/report.html     the report
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from trainables.errors import InputError
from trainables.io import atomic_write_json, atomic_write_text

EXPERIMENT_JSON = "experiment.json"
FOLDS_JSON = "folds.json"
TRIALS_CSV = "trials.csv"
STUDIES_DB = "studies.db"
ASHA_STATE = "asha_state.json"
TUNE_DIR = "tune"
# what a new run must not inherit from an earlier one in the same directory (tune/rundir.py)
SEARCH_STATE = (EXPERIMENT_JSON, FOLDS_JSON, TRIALS_CSV, STUDIES_DB, ASHA_STATE, TUNE_DIR)
TEST_METRICS_JSON = "test_metrics.json"  # in any prediction output folder with annotated inputs
PREVIEW_FILE = "preview.npz"  # in a trial's best checkpoint: a few validation images with truth and prediction (W&B)

# trials.csv: trial_id, fold, status, retrain, epochs, best_epoch, best_<metric> (:func:`score_column`),
# node, nodes, failures, weights, error, checkpoint (tune/experiment.py fills them from Tune's trials),
# then one ``param:<key>`` column per sampled setting
PARAM_PREFIX = "param:"
FINISHED = ("completed", "stopped")  # statuses of trials whose best score counts

PACKAGES = ("torch", "torchvision", "ray", "optuna", "segmentation-models-pytorch", "timm", "transformers",
            "albumentations", "pycocotools", "wandb", "numpy")
SECRET_HINTS = ("key", "token", "secret", "password")


class _Entry:
    """A path below ``root``: ``RunFiles(run_dir).trials_csv`` is ``run_dir / "trials.csv"``."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, obj, owner=None):
        return self if obj is None else Path(obj.root, *self.parts)


@dataclass(frozen=True)
class EnsembleFiles:
    """What ``ensemble/run.py`` writes (``runs/<name>/ensemble``) and ``ensemble/predict.py`` adds."""

    root: Path

    members_json = _Entry("members.json")
    thresholds_json = _Entry("thresholds.json")
    postprocessing_json = _Entry("postprocessing.json")
    oof_metrics_json = _Entry("oof_metrics.json")
    oof_probs_dir = _Entry("oof_probs")  # the out-of-fold probabilities the post-processing is fitted on
    bundle_dir = _Entry("bundle")
    refits_dir = _Entry("refits")  # --refit: <name>/model.pt and refits.json (ensemble/refit.py)
    predictions_dir = _Entry("predictions")  # where --predict writes unless given --out

    @property
    def test_metrics_jsons(self) -> tuple[Path, ...]:
        """Where the test rows may be, in the order the report looks: the default predictions
        folder, then a ``--out`` of the ensemble folder itself."""
        return self.predictions_dir / TEST_METRICS_JSON, Path(self.root, TEST_METRICS_JSON)


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run directory; ``RunFiles(run_dir).trials_csv`` and so on."""

    root: Path

    experiment_json = _Entry(EXPERIMENT_JSON)
    folds_json = _Entry(FOLDS_JSON)
    trials_csv = _Entry(TRIALS_CSV)
    studies_db = _Entry(STUDIES_DB)
    asha_state = _Entry(ASHA_STATE)
    tune_dir = _Entry(TUNE_DIR)  # Tune's experiment unless experiment.json records a trial storage
    checkpoints_dir = _Entry("checkpoints")
    pseudo_dir = _Entry("pseudo")
    report_dir = _Entry("report")
    report_html = _Entry("report", "report.html")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def studies_url(self) -> str:
        """The Optuna storage URL of :attr:`studies_db`."""
        return f"sqlite:///{self.studies_db}"

    def ensemble_dir(self, debug: bool = False) -> Path:
        return self.root / ("ensemble-debug" if debug else "ensemble")

    def ensemble(self, debug: bool = False) -> EnsembleFiles:
        return EnsembleFiles(self.ensemble_dir(debug))

    def earlier_state(self) -> list[str]:
        """The entries of :data:`SEARCH_STATE` this directory holds."""
        return [name for name in SEARCH_STATE if (self.root / name).exists()]


# -- experiment.json --------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def redact(argv: list[str]) -> list[str]:
    """Drop values of flags that look like credentials (never write API keys to disk)."""
    out, hide = [], False
    for arg in argv:
        out.append("***" if hide else arg)
        hide = arg.startswith("--") and any(h in arg.lower() for h in SECRET_HINTS) and "=" not in arg
    return out


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, f"missing: {what}") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable ({type(exc).__name__}: {exc})") from None


def read_experiment(run_dir: Path) -> dict:
    """experiment.json of ``run_dir``; InputError in one line when it is missing or damaged."""
    return _read_json(RunFiles(run_dir).experiment_json,
                      "is this an experiment directory written by tune/run.py?")


def write_experiment_json(run_dir: Path, settings: dict, data_info: dict) -> None:
    """Record the resolved settings; on resume the dataset fingerprint must match."""
    path = RunFiles(run_dir).experiment_json
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["dataset"]["fingerprint"] != data_info["fingerprint"]:
            raise InputError(path, f"the dataset changed since this experiment started (fingerprint "
                                   f"{saved['dataset']['fingerprint']} -> {data_info['fingerprint']}); "
                                   "start a new experiment with another --name")
    atomic_write_json(path, {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": redact(sys.argv),
        "settings": settings,
        "dataset": data_info,
        "versions": package_versions(),
    })


def read_folds(run_dir: Path) -> list[list[str]]:
    """The folds of folds.json (the holdout: :func:`trainables.folds.read_holdout`)."""
    path = RunFiles(run_dir).folds_json
    folds = _read_json(path, "is this an experiment directory written by tune/run.py?").get("folds")
    if not isinstance(folds, list):
        raise InputError(path, "no 'folds' list: not a folds file")
    return folds


# -- where Tune keeps the trials ----------------------------------------------------------------

def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def experiment_location(run_dir: Path, trial_storage: str | None, below: str = "") -> str:
    """Tune's experiment directory or URI (or ``below`` it): ``<run dir>/tune``, or
    ``<trial storage>/<name>`` (a URI's query string stays at the end)."""
    if not trial_storage:
        return str(Path(run_dir, TUNE_DIR, below))
    base, _, query = trial_storage.partition("?")
    path = "/".join(filter(None, [base.rstrip("/"), Path(run_dir).name, below]))
    return path + (f"?{query}" if query else "")


def read_trial_file(run_dir: Path, trial_dir: str, name: str) -> str | None:
    """A file Tune wrote for a trial (``result.json``), wherever the experiment keeps its trials:
    ``<run dir>/tune/<trial dir>``, or the ``trial_storage`` recorded in experiment.json."""
    files = RunFiles(run_dir)
    storage = None
    if files.experiment_json.exists():
        storage = json.loads(files.experiment_json.read_text())["settings"].get("trial_storage")
    if not storage:
        path = files.tune_dir / trial_dir / name
        return path.read_text() if path.exists() else None
    location = experiment_location(files.root, storage, f"{trial_dir}/{name}")
    if not is_uri(location):
        return Path(location).read_text() if Path(location).exists() else None
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


# -- trials.csv ---------------------------------------------------------------------------------

def score_column(metric: str) -> str:
    """The trials.csv column of a trial's best ``metric``."""
    return f"best_{metric}"


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as trials.csv, columns in the order they first appear, written atomically."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def read_trials_csv(path: Path) -> list[dict]:
    """trials.csv as rows of strings (``path``: the file, or a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = RunFiles(path).trials_csv
    if not path.exists():
        raise InputError(path, "no trials.csv: is this a finished (or resumed) experiment directory?")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def number(value) -> float:
    """A trials.csv cell as a float (NaN when empty or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def best_per_fold(rows: list[dict], metric: str, mode: str) -> dict[int, dict]:
    """The row of each fold's best finished trial (completed or stopped by the scheduler)."""
    best: dict[int, dict] = {}
    sign = 1 if mode == "max" else -1
    column = score_column(metric)
    for row in rows:
        score = number(row.get(column))
        if row["status"] not in FINISHED or math.isnan(score):
            continue
        fold = int(row["fold"])
        if fold not in best or sign * score > sign * number(best[fold][column]):
            best[fold] = row
    return best


def race_configs(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """A racing run's configurations (tune/racing.py: trials.csv has a ``config_id`` column), best first:
    ``{"config_id", "rows": {fold: finished row}, "scores": {fold: score of a completed trial}, "mean"}``
    with ``mean`` over the completed folds (NaN without one); ranked by completed folds (most first), then
    mean, then config id. Empty for a run without racing."""
    sign = 1 if mode == "max" else -1
    column = score_column(metric)
    configs: dict[str, dict] = {}
    for row in rows:
        cid = str(row.get("config_id") or "")
        if not cid or row.get("status") not in FINISHED or math.isnan(number(row.get(column))):
            continue
        entry = configs.setdefault(cid, {"config_id": cid, "rows": {}, "scores": {}})
        fold = int(row["fold"])
        entry["rows"][fold] = row
        if row["status"] == "completed":
            entry["scores"][fold] = number(row[column])
    for entry in configs.values():
        entry["mean"] = sum(entry["scores"].values()) / len(entry["scores"]) if entry["scores"] else math.nan
    return sorted(configs.values(), key=lambda e: (-len(e["scores"]), -sign * e["mean"] if e["scores"] else 0,
                                                   int(e["config_id"]) if e["config_id"].isdigit() else 0,
                                                   e["config_id"]))
