"""Tune (Optuna + ASHA) against a W&B sweep on the same fold: best validation score so far against
epochs spent, the measure of a search's cost that both share.

    python tune/compare.py --experiment runs/smp --sweep entity/segmentation-hpo/abc123
    python tune/compare.py --experiment runs/smp --sweep runs/wandb-sweeps/wandb/offline-run-* --fold 0

``--sweep``: a W&B sweep path (read with ``wandb.Api()``) or the offline run folders
``tune/sweep_agent.py`` wrote with ``WANDB_MODE=offline``. The Tune side is the experiment's
searched (not retrained) trials of the fold, from ``trials.csv`` and each trial's per-epoch
``result.json`` (the fold's Optuna study's intermediate values where a trial has no result.json).

Each search's trials are laid end to end in the order they started (each trial's epochs in epoch
order), so ``epochs_spent`` counts every epoch either search trained, stopped trials included, and
``best_so_far`` is the best value of the experiment's metric (and mode) seen up to then. Written
to ``<out>/compare.csv`` (search, fold, epochs_spent, best_so_far, run, value: a table a W&B line
panel plots as it is, and logged as a ``wandb.Table`` to the experiment's W&B group unless W&B is
disabled), ``<out>/compare.html`` (a plotly figure, plotly.js embedded) and a summary printed.
``<out>`` defaults to ``<experiment>/compare``, where the experiment's report finds it.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
from pathlib import Path

from trainables.cli import add_wandb_flags, command_parser, exit_on_user_error, wandb_mode
from trainables.errors import InputError
from trainables.io import atomic_write_text
from trainables.runfiles import RunFiles, read_experiment, read_trial_file, read_trials_csv
from tune.report_html import Page, tidy_figure
from tune.wandb_runs import SearchRun, read_sweep

logger = logging.getLogger(__name__)

TUNE, SWEEP = "tune", "wandb-sweep"
COLUMNS = ("search", "fold", "epochs_spent", "best_so_far", "run", "value")


def tune_runs(run_dir: Path, fold: int, metric: str) -> list[SearchRun]:
    """The searched trials of ``fold`` with their metric per epoch."""
    rows = [r for r in read_trials_csv(run_dir)
            if str(r.get("fold")) == str(fold) and r.get("retrain", "False") != "True"]
    intermediate = _study_values(run_dir, fold)
    runs = []
    for row in rows:
        text = read_trial_file(run_dir, f"fold{fold}_{row['trial_id']}", "result.json")
        if text is not None:
            points = sorted((json.loads(line) for line in text.splitlines() if line.strip()), key=lambda p: p["epoch"])
            values = [_num(p.get(metric)) for p in points]
            first = points[0] if points else {}
            start = first.get("timestamp", math.nan) - first.get("time_this_iter_s", 0.0)
        elif row["trial_id"] in intermediate:
            start, values = intermediate[row["trial_id"]]
        else:
            logger.warning("trial %s: no per-epoch values; its %s epochs count as spent",
                           row["trial_id"], row["epochs"])
            start, values = math.nan, [math.nan] * int(float(row.get("epochs") or 0))
        runs.append(SearchRun(row["trial_id"], start, fold, values))
    if any(math.isnan(run.start) for run in runs):  # not all start times known: trials.csv's order (Tune's)
        for index, run in enumerate(runs):
            run.start = index
    return runs


def _study_values(run_dir: Path, fold: int) -> dict[str, tuple[float, list[float]]]:
    """Tune trial id -> (start, value per epoch) from the fold's Optuna study, if there is one."""
    files = RunFiles(run_dir)
    if not files.studies_db.exists():
        return {}
    import optuna

    storage = files.studies_url
    names = [n for n in optuna.get_all_study_names(storage) if n.rsplit("fold", 1)[-1] == str(fold)]
    out = {}
    for name in names:
        for t in optuna.load_study(study_name=name, storage=storage).trials:
            if "tune_trial_id" in t.user_attrs and t.intermediate_values:
                epochs = range(1, max(t.intermediate_values) + 1)
                start = t.datetime_start.timestamp() if t.datetime_start else math.nan
                out[t.user_attrs["tune_trial_id"]] = (start, [t.intermediate_values.get(e, math.nan) for e in epochs])
    return out


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def best_so_far(search: str, runs: list[SearchRun], fold: int, mode: str) -> list[dict]:
    """One row per epoch trained, the runs in start order: epochs spent and the best value yet."""
    rows, spent, best = [], 0, math.nan
    for run in sorted(runs, key=lambda r: r.start):
        for value in run.values:
            spent += 1
            if not math.isnan(value) and (math.isnan(best) or (value > best if mode == "max" else value < best)):
                best = value
            rows.append({"search": search, "fold": fold, "epochs_spent": spent, "best_so_far": best,
                         "run": run.name, "value": value})
    return rows


def read_compare_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{**r, "fold": int(r["fold"]), "epochs_spent": int(r["epochs_spent"]),
                 "best_so_far": float(r["best_so_far"] or "nan"), "value": float(r["value"] or "nan")}
                for r in csv.DictReader(fh)]


def _reached(rows: list[dict], target: float, mode: str) -> int | None:
    for r in rows:
        best = r["best_so_far"]
        if not math.isnan(best) and (best >= target if mode == "max" else best <= target):
            return r["epochs_spent"]
    return None


def summary(rows: list[dict], metric: str, mode: str) -> str:
    """Best score of each search, the epochs it spent and needed, and the epochs it needed to reach
    the other's best."""
    searches = {s: [r for r in rows if r["search"] == s] for s in (TUNE, SWEEP)}
    fold = rows[0]["fold"] if rows else "?"
    lines = [f"fold {fold}, {metric} ({mode}): best so far against epochs spent"]
    for name, own in searches.items():
        other_name = SWEEP if name == TUNE else TUNE
        other = searches[other_name]
        if not own:
            lines.append(f"  {name:12s} no epochs")
            continue
        best = own[-1]["best_so_far"]
        trials = len(dict.fromkeys(r["run"] for r in own))
        line = (f"  {name:12s} best {best:.4g} after {_reached(own, best, mode)} of {own[-1]['epochs_spent']} "
                f"epochs ({trials} trial{'s' if trials != 1 else ''})")
        if other and not math.isnan(other[-1]["best_so_far"]):
            at = _reached(own, other[-1]["best_so_far"], mode)
            line += (f"; {other_name}'s best {other[-1]['best_so_far']:.4g} reached after {at} epochs"
                     if at is not None else f"; {other_name}'s best {other[-1]['best_so_far']:.4g} not reached")
        lines.append(line)
    return "\n".join(lines)


def figure(rows: list[dict], metric: str):
    """Best so far against epochs spent, one step line per search."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for search in (TUNE, SWEEP):
        own = [r for r in rows if r["search"] == search]
        fig.add_scatter(x=[r["epochs_spent"] for r in own], y=[r["best_so_far"] for r in own], name=search,
                        mode="lines+markers", line_shape="hv", text=[r["run"] for r in own],
                        hovertemplate="%{text}: epochs spent %{x}, best so far %{y:.4g}")
    fig.update_layout(xaxis_title="epochs spent", yaxis_title=f"best {metric} so far")
    fold = rows[0]["fold"] if rows else "?"
    return tidy_figure(fig, f"fold {fold}: Tune (Optuna + ASHA) against the W&B sweep")


def comparison_section(page, path: Path, metric: str, mode: str) -> None:
    """The report's section: the summary and the figure of a compare.csv."""
    rows = read_compare_csv(path)
    page.add(f"<h2>Tune against the W&B sweep</h2><pre>{html.escape(summary(rows, metric, mode))}</pre>")
    page.figures([figure(rows, metric)])


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)
    return out.getvalue()


def log_table(rows: list[dict], project: str, group: str, directory: Path, mode: str) -> None:
    """The table (and a line plot of it) as one W&B run in the experiment's group."""
    import wandb

    fold = rows[0]["fold"]
    run = wandb.init(project=project, group=group, job_type="sweep-comparison", name=f"{group}-compare-fold{fold}",
                     dir=str(directory), mode=mode, tags=[f"fold{fold}", "sweep-comparison"],
                     settings=wandb.Settings(silent=True))
    table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
    run.log({"sweep_comparison": table,
             "sweep_comparison_plot": wandb.plot.line(table, "epochs_spent", "best_so_far", stroke="search",
                                                      title=f"fold {fold}: best so far against epochs spent")})
    run.finish()


def compare(run_dir: Path, sweep: list[str], fold: int | None = None, out: Path | None = None,
            wandb_mode: str = "disabled", wandb_project: str = "segmentation-hpo") -> tuple[list[dict], str]:
    """Write compare.csv and compare.html under ``out``; return the rows and the summary."""
    run_dir = Path(run_dir)
    search = read_experiment(run_dir)["settings"]["search"]
    metric, mode = search["metric"], search["mode"]
    swept = read_sweep(sweep, metric)
    folds = sorted({r.fold for r in swept if r.fold is not None})
    if fold is None:
        if len(folds) != 1:
            raise InputError(sweep[0], f"the sweep's runs are on folds {folds}: choose one with --fold")
        fold = folds[0]
    swept = [r for r in swept if r.fold in (fold, None)]
    tuned = tune_runs(run_dir, fold, metric)
    if not swept or not tuned:
        raise InputError(sweep[0] if not swept else RunFiles(run_dir).trials_csv, f"no runs on fold {fold}")
    rows = best_so_far(TUNE, tuned, fold, mode) + best_so_far(SWEEP, swept, fold, mode)
    text = summary(rows, metric, mode)
    out = Path(out) if out else run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.csv", _csv_text(rows))
    page = Page(f"{run_dir.name}: Tune against the W&B sweep")
    page.add(f"<h1>{html.escape(run_dir.name)}: Tune against the W&B sweep</h1><pre>{html.escape(text)}</pre>")
    page.figures([figure(rows, metric)])
    atomic_write_text(out / "compare.html", page.render())
    if wandb_mode != "disabled":
        log_table(rows, wandb_project, run_dir.name, out, wandb_mode)
    return rows, text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", type=Path, required=True, help="the Tune experiment, runs/<name>")
    p.add_argument("--sweep", nargs="+", required=True, metavar="RUNS",
                   help="entity/project/sweep_id, or offline run folders (wandb/offline-run-*)")
    p.add_argument("--fold", type=int, help="the fold both searched (default: the sweep's fold)")
    p.add_argument("--out", type=Path, help="output folder [<experiment>/compare]")
    add_wandb_flags(p, "log the table to W&B")


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or args.experiment / "compare"
    _rows, text = compare(args.experiment, args.sweep, args.fold, out, wandb_mode(args), args.wandb_project)
    print(f"{text}\ncomparison: {out / 'compare.html'}, table: {out / 'compare.csv'}")


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


@exit_on_user_error
def main(argv=None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
