"""The ensemble step of a finished search as named steps, in the order ``ensemble/run.py`` calls them:

    check_options        the flags' values, before anything loads
    load_experiment_run  experiment.json, folds, trials.csv and the dataset (unchanged since the search)
    select_members       top-k (or greedy, or within a latency budget) per fold      -> members.json
    out_of_fold          rows (a)-(c) and the thresholds fitted out-of-fold          -> thresholds.json, oof_probs/
    post_processing      the CRF fitted on the out-of-fold probabilities (--crf)     -> postprocessing.json
    refit                with --refit N: the N best configurations on every training image -> refits/
    combination          on the holdout: how the bundle combines the members (and refits), rows (a)-(d)
    bundle               the members and the kept decision rule                      -> bundle/
    oof_metrics          every result above in one record                            -> oof_metrics.json

Each step takes what earlier steps returned and the :class:`EnsembleOptions`, writes its own files
and returns what later ones need. The extras (--predict, --pseudo-label, --cam) are in
:mod:`ensemble.extras`; the plots, the printed tables and the experiment's report page are written
by ``ensemble/run.py`` after the steps (:mod:`ensemble.report`, ``tune/report.py``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ensemble.bundle import write_bundle
from ensemble.combine import combine_on_holdout, no_holdout_record, shipped_members
from ensemble.compare import compare_oof
from ensemble.crf import crf_step
from ensemble.crf import missing as crf_missing
from ensemble.crossfit import prediction_rule, score_key
from ensemble.holdout import everyone, holdout_indices, holdout_step
from ensemble.latency import budget_members, summary_line
from ensemble.members import local_checkpoint, top_k
from ensemble.oof import oof_evaluate
from ensemble.predictor import TTA, Ensemble, Member, best_member_index, load_member
from ensemble.refit import REFIT_FOLD, ROWS_NOTE, check_refit, plan_refits, refit_members, with_refits
from ensemble.selection import greedy_members
from trainables.data import SegData, dataset_options, load_data
from trainables.device import resolve_device
from trainables.errors import ConfigError, InputError
from trainables.folds import read_holdout
from trainables.io import atomic_write_json
from trainables.metrics import empty_score
from trainables.rows import ROWS
from trainables.runfiles import EnsembleFiles, RunFiles, read_experiment, read_folds, read_trials_csv

logger = logging.getLogger("ensemble")


@dataclass(frozen=True)
class EnsembleOptions:
    """How the ensemble is chosen, decided and scored (``ensemble/run.py``'s flags)."""
    top_k: int = 3
    selection: str = "topk"  # topk | greedy
    voting: str = "soft"  # soft | hard
    tta: str = "none"  # as TTA.parse reads it
    min_area: bool = False
    max_ms_per_image: float | None = None
    crf: bool = False
    batch_size: int = 8
    device: str = "auto"
    debug: bool = False  # 4 out-of-fold images per fold, written to ensemble-debug/

    @property
    def max_per_fold(self) -> int | None:
        return 4 if self.debug else None


@dataclass(frozen=True)
class ExperimentRun:
    """A finished search as the ensemble step reads it, and where the step writes."""
    run_dir: Path
    experiment: dict
    folds: list[list[str]]
    rows: list[dict]
    data: SegData
    out: EnsembleFiles
    device: torch.device

    @property
    def settings(self) -> dict:
        return self.experiment["settings"]

    @property
    def data_settings(self) -> dict:
        return self.settings["fixed"]["data"]

    @property
    def bundle_data(self) -> dict:
        """How the training data was read, as a bundle records it (``bundle.json``'s ``data``)."""
        d = self.data_settings
        return {"unannotated": d["unannotated"], **dataset_options(d), "has_background": self.data.has_background}

    @property
    def max_size(self) -> int | None:
        return self.data_settings["max_size"]

    @property
    def metric(self) -> str:
        return self.settings["search"]["metric"]

    @property
    def mode(self) -> str:
        return self.settings["search"]["mode"]

    @property
    def empty(self) -> float | None:
        """Per-image metrics' score of an empty pair (None: the setting is neither 1 nor NaN)."""
        return empty_score(self.settings["fixed"].get("metrics", {}).get("empty", 1))

    @property
    def empty_or_one(self) -> float:
        return 1.0 if self.empty is None else self.empty


@dataclass(frozen=True)
class Members:
    """The members chosen per fold, and how."""
    ensembles: dict[int, Ensemble]
    pool: dict[int, list[dict]]  # the trials.csv rows the members were chosen from
    tta_text: str  # the TTA predicted with (a latency budget may have dropped views)
    tta: TTA
    selection: dict | None  # greedy selection's record
    latency: dict | None  # the latency budget's record


@dataclass(frozen=True)
class OutOfFold:
    result: dict  # ensemble.oof.oof_evaluate's
    thresholds: dict  # fitted on every out-of-fold prediction: what prediction applies if kept


@dataclass(frozen=True)
class PostProcessing:
    post: dict  # postprocessing.json: the CRF (or None) and every step's keep decision
    crf_rows: dict  # the report's entries of the CRF (rows (d), its parameters); empty without --crf


@dataclass(frozen=True)
class Combination:
    weights: list[float] | None  # per member of every fold, decided on the holdout (None: uniform)
    record: dict  # the report's ``combination``
    holdout: dict | None  # rows (a)-(d) on the holdout
    shipped: list[Member]  # the bundle's members, with their weights


def load_experiment(run_dir: Path) -> tuple[dict, list[list[str]], list[dict]]:
    """experiment.json, the folds and the rows of trials.csv of a finished search."""
    return read_experiment(run_dir), read_folds(run_dir), read_trials_csv(RunFiles(run_dir).trials_csv)


def check_options(options: EnsembleOptions) -> None:
    """The options' values, before anything loads (each a :class:`ConfigError`)."""
    if options.crf and crf_missing():
        raise ConfigError("command line", "--crf", crf_missing())
    try:
        TTA.parse(options.tta)
    except ValueError as exc:
        raise ConfigError("command line", "--tta", str(exc)) from None
    if options.max_ms_per_image is not None and not options.max_ms_per_image > 0:
        raise ConfigError("command line", "--max-ms-per-image",
                          f"expected milliseconds > 0, got {options.max_ms_per_image:g}")


def load_experiment_run(run_dir: Path, options: EnsembleOptions) -> ExperimentRun:
    """The search's files and its dataset, which must not have changed since the search."""
    experiment, folds, rows = load_experiment(run_dir)
    d = experiment["settings"]["fixed"]["data"]
    data = load_data(d)
    if data.fingerprint != experiment["dataset"]["fingerprint"]:
        raise InputError(d["path"], "the dataset changed since the search: out-of-fold results would be mixed")
    return ExperimentRun(run_dir, experiment, folds, rows, data, RunFiles(run_dir).ensemble(options.debug),
                         resolve_device(options.device))


def select_members(run: ExperimentRun, options: EnsembleOptions) -> Members:
    """Each fold's members: its top-k trials, or greedy forward selection among its top 2k, then,
    with a latency budget, the members and TTA views that fit it; writes members.json."""
    tta = TTA.parse(options.tta)
    pool = top_k(run.rows, run.metric, run.mode, options.top_k * (2 if options.selection == "greedy" else 1),
                 num_folds=len(run.folds))  # a racing run: configurations that ran every fold
    checkpoints = RunFiles(run.run_dir).checkpoints_dir
    ensembles = {}
    for fold, chosen in pool.items():
        # a URI (trials in an object store) is fetched once into the run directory
        members = [load_member(local_checkpoint(r["checkpoint"], checkpoints), r["trial_id"], run.device)
                   for r in chosen]
        ensembles[fold] = Ensemble(members, tta, options.voting, run.device)
    selection = None
    if options.selection == "greedy":
        ensembles, selection = greedy_members(ensembles, run.data, run.folds, run.max_size, options.top_k,
                                              run.metric, run.mode, empty=run.empty_or_one)
    latency, tta_text = None, options.tta
    if options.max_ms_per_image is not None:
        ensembles, tta_text, latency = budget_members(ensembles, run.data, folds=run.folds, max_size=run.max_size,
                                                      budget_ms=options.max_ms_per_image, metric=run.metric,
                                                      mode=run.mode,
                                                      empty=run.empty_or_one, max_images=options.max_per_fold)
        tta = TTA.parse(tta_text)
        print(summary_line(latency))
    members_json = {str(f): [{"trial_id": m.name, "score": m.score, "epoch": m.meta["epoch"],
                              "checkpoint": next(r["checkpoint"] for r in pool[f] if r["trial_id"] == m.name)}
                             for m in e.members] for f, e in ensembles.items()}
    atomic_write_json(run.out.members_json, {"selection": options.selection, "top_k": options.top_k,
                                             "voting": options.voting, "tta": tta_text, "members": members_json})
    return Members(ensembles, pool, tta_text, tta, selection, latency)


def out_of_fold(run: ExperimentRun, members: Members, *, options: EnsembleOptions) -> OutOfFold:
    """Every fold's ensemble on its own validation images: rows (a)-(c), the thresholds (and minimum
    areas) cross-fitted, and fitted on everything; writes oof_probs/ and thresholds.json."""
    result = oof_evaluate(members.ensembles, run.data, folds=run.folds, max_size=run.max_size, out_dir=run.out.root,
                          batch_size=options.batch_size,
                          tune_min_area=options.min_area, max_per_fold=options.max_per_fold, metric=run.metric,
                          empty=run.empty)
    atomic_write_json(run.out.thresholds_json, result["thresholds"])
    return OutOfFold(result, result["thresholds"])


def post_processing(run: ExperimentRun, members: Members, *, oof: OutOfFold,
                    options: EnsembleOptions) -> PostProcessing:
    """With ``options.crf``, the CRF fitted on the stored out-of-fold probabilities (row (d)); writes
    postprocessing.json either way (the keep decisions of every step)."""
    post, crf_rows = {"crf": None, "steps": oof.result["steps"]}, {}
    if options.crf:
        row, in_sample, crf = crf_step(oof.result, next(iter(members.ensembles.values())), run.data, run.max_size,
                                       run.out.root, options.min_area, metric=run.metric, empty=run.empty)
        post.update(crf)
        post["steps"] = {**oof.result["steps"], "crf": crf["crf"]["step"]}
        crf_rows = {"crf": row, "crf_in_sample": in_sample,
                    "postprocessing": {k: v for k, v in crf["crf"].items() if k not in ("thresholds", "step")}}
    atomic_write_json(run.out.postprocessing_json, post)
    return PostProcessing(post, crf_rows)


def refit(run: ExperimentRun, n: int | None, *, options: EnsembleOptions, connect=None,
          runner=None) -> tuple[list[Member], list[dict]]:
    """With ``--refit N`` (a holdout needed: ConfigError otherwise), the N best configurations trained
    on every training image by Ray tasks (ensemble/refit.py; ``connect()`` joins Ray first), as
    members; writes refits/. With ``--debug``, one short epoch each."""
    check_refit(n, read_holdout(RunFiles(run.run_dir).folds_json))
    if not n:
        return [], []
    plans = plan_refits(run.rows, run.metric, run.mode, n, folds=run.folds,
                        holdout=read_holdout(RunFiles(run.run_dir).folds_json))
    return refit_members(plans, checkpoints=RunFiles(run.run_dir).checkpoints_dir, out_dir=run.out.refits_dir,
                         fingerprint=run.data.fingerprint, device=run.device, resources=run.settings.get("resources"),
                         runner=runner, connect=connect, debug=options.debug)


def combination(run: ExperimentRun, members: Members, *, oof: OutOfFold, post: PostProcessing,
                options: EnsembleOptions, refits: list[Member] | None = None) -> Combination:
    """With a holdout (folds.holdout): how the bundle combines every fold's members and the ``refits``
    (uniform average, best member or a fitted keep/drop, ensemble/combine.py) and rows (a)-(d) on it;
    without one, the uniform average, the comparison unknown. Out-of-fold rows never see the refits."""
    holdout = read_holdout(RunFiles(run.run_dir).folds_json)
    weights, rows = None, None
    ensembles = with_refits(members.ensembles, refits)
    if holdout:
        ens = everyone(ensembles)
        weights, record = combine_on_holdout(
            ens, run.data, indices=holdout_indices(run.data, holdout), metric=run.metric, mode=run.mode,
            best=best_member_index(ens.members, run.mode), empty=run.empty_or_one,
            seed=int(run.settings["fixed"].get("folds", {}).get("seed", 0)))
        rows = holdout_step(ensembles, run.data, holdout=holdout, thresholds=oof.thresholds, post=post.post,
                            steps=post.post["steps"],
                            mode=run.mode, max_size=run.max_size, batch_size=options.batch_size, weights=weights,
                            combination=record["shipped"])
    else:
        record = no_holdout_record()
    shipped = shipped_members([m for e in ensembles.values() for m in e.members], weights)
    if refits:  # which rows a refit is in: rows (b)-(d) of the holdout and the bundle's, when kept
        kept = [m.name for m in shipped if m.fold == REFIT_FOLD]
        record["refits"] = {"offered": [m.name for m in refits], "shipped": kept, "rows": ROWS_NOTE}
        if rows is not None:
            rows["refits"] = kept
    return Combination(weights, record, rows, shipped)


def bundle(run: ExperimentRun, members: Members, *, oof: OutOfFold, post: PostProcessing, combined: Combination,
           options: EnsembleOptions) -> Path:
    """The bundle ``ensemble/predict.py`` runs anywhere: the shipped members, TTA, voting and the kept
    decision rule; returns its folder."""
    return write_bundle(run.out.bundle_dir, combined.shipped, tta=members.tta_text, voting=options.voting,
                        rule=prediction_rule(oof.thresholds, post.post, run.max_size), metric=run.metric, mode=run.mode,
                        source={"experiment": str(run.run_dir.resolve())}, data=run.bundle_data)


def oof_metrics(run: ExperimentRun, members: Members, *, oof: OutOfFold, post: PostProcessing,
                combined: Combination, compare: Path | None = None, refits: list[dict] | None = None) -> dict:
    """The record of every step (rows (a)-(d) cross-fitted and in-sample, the keep decisions, the
    selection, the combination, the holdout rows, with ``compare`` another experiment's rows beside
    them); writes oof_metrics.json and returns it."""
    result = oof.result
    report = {k: v for k, v in result.items() if k in ROWS or k.endswith("_in_sample") or k == "thresholds_only"}
    report["class_names"] = run.data.class_names
    report["oof_images"] = len(result["images"])
    report["extra_train"] = run.data_settings.get("extra_train")  # pseudo-labels (or other extra data) trained on
    report["steps"] = post.post["steps"]
    if members.selection:
        report["selection"] = members.selection
    if members.latency:
        report["latency"] = members.latency
    report.update(post.crf_rows)
    report["combination"] = combined.record
    if refits:  # out-of-fold rows never include a refit; the holdout's and the bundle's may
        report["refits"] = {"members": refits, "shipped": combined.record["refits"]["shipped"], "rows": ROWS_NOTE}
    if combined.holdout is not None:
        report["holdout"] = combined.holdout
    key = score_key(run.data.task, run.metric)
    report["optimism"] = {k: report[f"{k}_in_sample"][key] - report[k][key] for k in ("tuned", "crf") if k in report}
    if compare:
        report["compare"] = compare_oof(run.run_dir, compare, report, run.experiment)
    atomic_write_json(run.out.oof_metrics_json, report)
    return report
