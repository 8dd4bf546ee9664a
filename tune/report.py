"""The experiment report: ``runs/<name>/report/report.html`` with PNG plots beside it.

Per fold, from its Optuna study: optimisation history, intermediate values (the learning curves
ASHA saw), parameter importances (fANOVA) and parallel coordinates; learning curves of the best
trials from Tune's per-trial progress files; the table of the best trial per fold; and, once
``ensemble/run.py`` has run, its out-of-fold table and plots.

    python tune/report.py --experiment runs/segformer-demo
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from tqdm import tqdm  # noqa: E402

from trainables.io import atomic_path, atomic_write_text  # noqa: E402
from tune.experiment import best_per_fold, read_trial_file, read_trials_csv  # noqa: E402

logger = logging.getLogger(__name__)

STUDY_PLOTS = {
    "history": ("optimisation history", optuna.visualization.matplotlib.plot_optimization_history),
    "intermediate": ("per-epoch values (what ASHA compared)", optuna.visualization.matplotlib.plot_intermediate_values),
    "importances": ("parameter importances (fANOVA)", optuna.visualization.matplotlib.plot_param_importances),
    "parallel": ("parallel coordinates", optuna.visualization.matplotlib.plot_parallel_coordinate),
}
ENSEMBLE_PLOTS = ("iou_bars.png", "threshold_curves.png", "confusion.png", "overlays.png")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def study_plots(study: optuna.Study, out: Path, fold: int) -> list[tuple[str, str]]:
    """PNG files of one fold's study; a plot Optuna cannot draw yet (too few trials) is skipped."""
    made = []
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    for key, (title, plot) in STUDY_PLOTS.items():
        if not finished or (key in ("importances", "parallel") and
                            sum(t.state == optuna.trial.TrialState.COMPLETE for t in finished) < 2):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                if key == "parallel":  # the most important parameters only, or the plot is unreadable
                    top = list(optuna.importance.get_param_importances(study))[:5]
                    ax = plot(study, params=top)
                else:
                    ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            logger.info("fold %d: %s not drawn (%s)", fold, title, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4)
        name = f"fold{fold}_{key}.png"
        _save(fig, out / name)
        made.append((title, name))
    return made


def learning_curves(run_dir: Path, rows: list[dict], metric: str, mode: str, out: Path, top: int = 3) -> str | None:
    """Validation metric per epoch of the best ``top`` trials of each fold."""
    sign = -1 if mode == "max" else 1
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for fold in sorted({int(r["fold"]) for r in rows}):
        ranked = sorted((r for r in rows if int(r["fold"]) == fold and r.get(f"best_{metric}")),
                        key=lambda r: sign * float(r[f"best_{metric}"]))[:top]
        for row in ranked:
            text = read_trial_file(run_dir, f"fold{fold}_{row['trial_id']}", "result.json")
            if text is None:
                continue
            points = [json.loads(line) for line in text.splitlines() if line.strip()]
            ax.plot([p["epoch"] for p in points], [p.get(metric, math.nan) for p in points], marker=".",
                    label=f"fold {fold} {row['trial_id']}")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    _save(fig, out / "learning_curves.png")
    return "learning_curves.png"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    experiment = json.loads((run_dir / "experiment.json").read_text())
    rows = read_trials_csv(run_dir / "trials.csv")
    search = experiment["settings"]["search"]
    metric, mode, name = search["metric"], search["mode"], experiment["settings"]["name"]
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{run_dir / 'studies.db'}"
    parts = [f"<h1>{html.escape(run_dir.name)}</h1>",
             f"<p>space <code>{html.escape(experiment['settings']['space'])}</code>, dataset "
             f"<code>{html.escape(experiment['dataset']['source'])}</code> ({experiment['dataset']['images']} images, "
             f"{len(experiment['dataset']['class_names'])} classes), metric <b>{metric}</b> ({mode}), "
             f"{len(rows)} trials.</p>"]
    best = best_per_fold(rows, metric, mode)
    params = sorted({k for r in best.values() for k in r if k.startswith("param:") and r[k] != ""})
    parts.append("<h2>Best trial per fold</h2><div class='wide'>" + _table(
        ["fold", "trial", metric, "best epoch", "status"] + [p[6:] for p in params],
        [[f, r["trial_id"], _fmt(r[f"best_{metric}"]), r["best_epoch"], r["status"]] + [r.get(p, "") for p in params]
         for f, r in sorted(best.items())]) + "</div>")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parts.append("<p>trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "</p>")
    curves = learning_curves(run_dir, rows, metric, mode, out)
    if curves:
        parts.append(f"<h2>Learning curves of the best trials</h2><img src='{curves}'>")
    names = optuna.get_all_study_names(storage) if (run_dir / "studies.db").exists() else []
    for study_name in tqdm(sorted(names), desc="report plots", leave=False, disable=None):
        fold = int(study_name.rsplit("fold", 1)[-1])
        study = optuna.load_study(study_name=study_name, storage=storage)
        made = study_plots(study, out, fold)
        states = {}
        for t in study.trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        parts.append(f"<h2>Fold {fold}: Optuna study <code>{html.escape(study_name)}</code></h2><p>"
                     + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + "</p>"
                     + "".join(f"<figure><img src='{f}'><figcaption>{html.escape(t)}</figcaption></figure>"
                               for t, f in made))
    ens = run_dir / "ensemble"
    if (ens / "oof_metrics.json").exists():
        oof = json.loads((ens / "oof_metrics.json").read_text())
        labels = {"single": "(a) best single trial per fold", "ensemble": "(b) ensemble, default decisions",
                  "tuned": "(c) ensemble, tuned thresholds", "crf": "(d) DenseCRF + tuned thresholds"}
        labels = {k: v for k, v in labels.items() if k in oof}
        if "postprocessing" in oof:
            labels["crf"] += " (kept)" if oof["postprocessing"].get("kept") else " (not kept: no gain)"
        parts.append(f"<h2>Ensemble, out-of-fold ({oof['oof_images']} images)</h2>" + _table(
            ["", "mIoU", "mean Dice", "boundary IoU", "pixel acc"],
            [[label, _fmt(oof[k]["miou"]), _fmt(oof[k]["dice"]), _fmt(oof[k].get("biou")), _fmt(oof[k]["pixel_acc"])]
             for k, label in labels.items()]))
        parts += [f"<figure><img src='../ensemble/{p}'><figcaption>{p}</figcaption></figure>"
                  for p in ENSEMBLE_PLOTS if (ens / p).exists()]
    else:
        parts.append(f"<p>No ensemble yet: <code>python ensemble/run.py --experiment {html.escape(str(run_dir))}"
                     "</code> adds its results here.</p>")
    parts.append(f"<p>Explore the studies interactively: <code>optuna-dashboard {html.escape(storage)}</code>; "
                 f"training curves: <code>tensorboard --logdir {html.escape(str(run_dir / 'tune'))}</code>.</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}figure{display:inline-block;margin:6px}"
             "img{max-width:520px}figcaption{font-size:12px;color:#555}div.wide{overflow-x:auto}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)} report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def main(argv=None) -> None:
    from trainables.cli import exit_on_user_error

    @exit_on_user_error
    def run() -> None:
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--experiment", type=Path, required=True)
        args = p.parse_args(argv)
        print(f"report: {write_report(args.experiment)}")

    run()


if __name__ == "__main__":
    main()
