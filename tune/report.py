"""The experiment report: ``runs/<name>/report/report.html``, one self-contained page.

Interactive plotly figures with plotly.js embedded (it opens offline): per fold, Optuna's
optimisation history, per-epoch values (the learning curves ASHA compared), parameter importances
(Optuna's default evaluator, PED-ANOVA), parallel coordinates and slices of the most important
parameters; the learning curves of the best trials; the best trial per fold; a cross-fold view of
which settings won where; and, once ``ensemble/run.py`` has run, its out-of-fold / holdout / test
tables, members and figures.

    python tune/report.py --experiment runs/segformer-demo
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import math
import warnings
from pathlib import Path

import optuna
from tqdm import tqdm

from trainables.cli import command_parser, exit_on_user_error
from trainables.io import atomic_write_text
from trainables.runfiles import (PARAM_PREFIX, RunFiles, best_per_fold, read_experiment, read_trial_file,
                                 read_trials_csv, score_column)
from tune.compare import comparison_section
from tune.report_crossfold import crossfold_html, param_columns, top_per_fold
from tune.report_ensemble import ensemble_section
from tune.report_html import Page, Text, table, tidy_figure

logger = logging.getLogger(__name__)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TOP_PARAMS = 5  # parallel coordinates and slices show the most important parameters only


def study_figures(study: optuna.Study, fold: int) -> list:
    """Optuna's plotly figures of one fold's study; one Optuna cannot draw yet (too few trials, a
    single value) is left out."""
    import optuna.visualization as vis

    finished = [t for t in study.trials if t.state in FINISHED]
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
    if not finished:
        return []
    importances: dict[str, float] = {}
    if complete >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "some regimes have less than 2 trials": a small study
                importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            logger.info("fold %d: no parameter importances (%s)", fold, exc)
    top = list(importances)[:TOP_PARAMS] or None
    plots = [("optimisation history", lambda: vis.plot_optimization_history(study)),
             ("per-epoch values (what ASHA compared)", lambda: vis.plot_intermediate_values(study))]
    if importances:
        plots += [("parameter importances (PED-ANOVA)", lambda: vis.plot_param_importances(study)),
                  ("parallel coordinates, most important parameters",
                   lambda: vis.plot_parallel_coordinate(study, params=top)),
                  ("slices, most important parameters", lambda: vis.plot_slice(study, params=top))]
    figs = []
    for title, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's experimental / too-few-trials warnings
                fig = plot()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            logger.info("fold %d: %s not drawn (%s)", fold, title, exc)
            continue
        tidy_figure(fig, f"fold {fold}: {title}")
        if title.startswith("slices"):
            fig.update_layout(width=1120)
        figs.append(fig)
    return figs


def learning_curves(run_dir: Path, rows: list[dict], metric: str, mode: str, top: int = 3):
    """Validation metric per epoch of the best ``top`` trials of each fold (Tune's result.json)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for fold, ranked in top_per_fold(rows, metric, mode, top).items():
        for row in ranked:
            text = read_trial_file(run_dir, f"fold{fold}_{row['trial_id']}", "result.json")
            if text is None:
                continue
            points = [json.loads(line) for line in text.splitlines() if line.strip()]
            fig.add_scatter(x=[p["epoch"] for p in points], y=[p.get(metric, math.nan) for p in points],
                            mode="lines+markers", name=f"fold {fold} {row['trial_id']}")
    if not fig.data:
        return None
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric)
    return tidy_figure(fig, f"learning curves of the best {top} trials per fold")


def _header(page: Page, run_dir: Path, experiment: dict, rows: list[dict], metric: str, mode: str) -> None:
    dataset = experiment["dataset"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    page.add(f"<h1>{html.escape(run_dir.name)}</h1>"
             f"<p>space <code>{html.escape(experiment['settings']['space'])}</code>, dataset "
             f"<code>{html.escape(dataset['source'])}</code> ({dataset['images']} images, "
             f"{len(dataset['class_names'])} classes), metric <b>{html.escape(metric)}</b> ({mode}), "
             f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".</p>")
    best = best_per_fold(rows, metric, mode)
    params = param_columns(best.values())
    page.add("<h2>Best trial per fold</h2>" + table(
        ["fold", "trial", metric, "best epoch", "status", *(p[len(PARAM_PREFIX):] for p in params)],
        [[f, Text(r["trial_id"]), r[score_column(metric)], r["best_epoch"], r["status"],
          *(r.get(p, "") for p in params)]
         for f, r in sorted(best.items())]))


def write_report(run_dir: Path) -> Path:
    files = RunFiles(run_dir)
    run_dir = files.root
    experiment = read_experiment(run_dir)
    rows = read_trials_csv(files.trials_csv)
    search = experiment["settings"]["search"]
    metric, mode, name = search["metric"], search["mode"], experiment["settings"]["name"]
    out = files.report_dir
    out.mkdir(parents=True, exist_ok=True)
    page = Page(f"{name} report")
    _header(page, run_dir, experiment, rows, metric, mode)
    page.add(crossfold_html(rows, metric, mode))
    curves = learning_curves(run_dir, rows, metric, mode)
    if curves is not None:
        page.add("<h2>Learning curves</h2>")
        page.figures([curves])
    storage = files.studies_url
    names = optuna.get_all_study_names(storage) if files.studies_db.exists() else []
    for study_name in tqdm(sorted(names), desc="report figures", leave=False, disable=None):
        fold = int(study_name.rsplit("fold", 1)[-1])
        study = optuna.load_study(study_name=study_name, storage=storage)
        states: dict[str, int] = {}
        for t in study.trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        page.add(f"<h2>Fold {fold}: Optuna study <code>{html.escape(study_name)}</code></h2><p>"
                 + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + "</p>")
        page.figures(study_figures(study, fold))
    if (run_dir / "compare" / "compare.csv").exists():  # written by tune/compare.py
        comparison_section(page, run_dir / "compare" / "compare.csv", metric, mode)
    ensemble_section(page, run_dir, rows, metric)
    page.add(f"<p class='note'>Explore the studies: <code>optuna-dashboard {html.escape(storage)}</code>; "
             f"training curves: <code>tensorboard --logdir {html.escape(str(files.tune_dir))}</code>.</p>")
    path = files.report_html
    atomic_write_text(path, page.render())
    for stale in out.glob("*.png"):  # earlier reports' matplotlib plots, now figures in the page
        stale.unlink()
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", type=Path, required=True, help="runs/<name> written by tune/run.py")


def run(args: argparse.Namespace) -> None:
    print(f"report: {write_report(args.experiment)}")


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


@exit_on_user_error
def main(argv=None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
