"""Before ``--resume``: make the saved searcher state agree with Tune's list of trials, and raise
its trial count when ``--num-samples`` grew (:func:`grow_samples`).

Tune snapshots three files to storage together: the experiment state (every trial, its status
and config), the search generator's state (how many trials it created, and its concurrency
limiter's live trials) and the searcher's (tune/searcher.py: trials suggested per fold, the live
trials and their Optuna numbers). It copies them in parallel, so a driver killed during a copy
can leave one file from the new snapshot and another from the one before. With whole-file writes
(tune/storage.py) each file is intact, but the set can still be a snapshot apart, and then:

* the generator counts a trial the experiment state lacks: Tune creates one trial too few;
* its concurrency limiter holds a live trial Tune never restores: with ``max_concurrent`` 1 no
  trial is ever suggested again and the resumed run waits forever;
* the generator misses a trial the experiment state has: one trial too many.

The experiment state is what Tune restores, so it is the truth: the generator's count and live
set and the searcher's per-fold counts and live trials are recomputed from it (Optuna numbers
from the studies, where every asked trial carries its Tune trial id), and written back only
where they differ. The formats are Ray 2.60's, which requirements.txt pins; tests/tune/test_storage.py
checks them against files Tune wrote.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pyarrow.fs as pafs

from tune.searcher import study_name
from tune.storage import storage_filesystem

UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def _newest(fs, root: str, pattern: str) -> str | None:
    names = [Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if i.type == pafs.FileType.File]
    matching = fnmatch.filter(names, pattern)
    return f"{root.rstrip('/')}/{max(matching)}" if matching else None


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.readall()


def _write(fs, path: str, raw: bytes) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(raw)


def tune_trials(raw: bytes) -> list[dict]:
    """``trial_id``, ``status`` and ``config`` of every trial in an experiment state file."""
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    out = []
    for json_state, _ in _loads_with_cloudpickle(raw)["trial_data"]:
        state = json.loads(json_state)
        out.append({k: state[k] for k in ("trial_id", "status", "config")})
    return out


def optuna_numbers(studies: str, experiment: str, folds: set[int]) -> dict[str, tuple[int, int]]:
    """Tune trial id -> (fold, Optuna trial number), from the per-fold studies."""
    import optuna

    out = {}
    for fold in sorted(folds):
        try:
            study = optuna.load_study(study_name=study_name(experiment, fold), storage=studies)
        except KeyError:  # no trial of this fold was ever asked
            continue
        for t in study.get_trials(deepcopy=False):
            if "tune_trial_id" in t.user_attrs:
                out[t.user_attrs["tune_trial_id"]] = (fold, t.number)
    return out


def reconcile(location: str, trial_storage: str | None, studies: str, experiment: str) -> list[str]:
    """Rewrite the newest search generator and searcher state files in Tune's experiment
    directory ``location`` to agree with its newest experiment state; returns what changed."""
    from ray import cloudpickle
    from ray.train._internal.storage import get_fs_and_path

    fs, root = get_fs_and_path(location, storage_filesystem(trial_storage))
    paths = {k: _newest(fs, root, p) for k, p in (("experiment", "experiment_state-*.json"),
                                                   ("generator", "search_gen_state-*.json"),
                                                   ("searcher", "searcher-state-*.pkl"))}
    if not all(paths.values()):
        return []
    trials = tune_trials(_read(fs, paths["experiment"]))
    unfinished = [t for t in trials if t["status"] in UNFINISHED]
    changes = []

    generator = cloudpickle.loads(_read(fs, paths["generator"]))
    limiter = generator.get("name:ConcurrencyLimiter")
    live_ids = {t["trial_id"] for t in unfinished}
    if generator["counter"] != len(trials) or (limiter and set(limiter["live_trials"]) != live_ids):
        changes.append(f"search generator: {generator['counter']} trials created -> {len(trials)}"
                       + (f", live {sorted(limiter['live_trials'])} -> {sorted(live_ids)}" if limiter else ""))
        generator["counter"] = len(trials)
        if generator["counter"] < generator["total_samples"]:
            generator["finished"] = False
        if limiter:
            limiter["live_trials"], limiter["num_unfinished_live_trials"] = set(live_ids), len(live_ids)
        _write(fs, paths["generator"], cloudpickle.dumps(generator))

    searcher = json.loads(_read(fs, paths["searcher"]))
    suggested = {int(f): 0 for f in searcher["suggested"]}
    for t in trials:
        if not t["config"].get("retrain") and int(t["config"]["fold"]) in suggested:
            suggested[int(t["config"]["fold"])] += 1
    numbers = optuna_numbers(studies, experiment, set(suggested))
    live = {}
    for t in unfinished:
        tid, config = t["trial_id"], t["config"]
        if tid in searcher["live"]:
            live[tid] = searcher["live"][tid]
        elif config.get("retrain"):
            live[tid] = {"fold": int(config["fold"]), "number": None, "config": config, "retrain": True}
        elif tid in numbers:
            live[tid] = {"fold": numbers[tid][0], "number": numbers[tid][1], "config": config}
    before = {int(f): n for f, n in searcher["suggested"].items()}
    if suggested != before or set(live) != set(searcher["live"]):
        changes.append(f"searcher: suggested per fold {before} -> {suggested}, "
                       f"live {sorted(searcher['live'])} -> {sorted(live)}")
        searcher["suggested"], searcher["live"] = suggested, live
        _write(fs, paths["searcher"], json.dumps(searcher).encode())
    return changes


def grow_samples(location: str, trial_storage: str | None, num_samples: int, total: int) -> list[str]:
    """``--resume --num-samples`` with more trials per fold: Tune restores the trial count and the
    searcher's per-fold count from their saved states, where a larger number would be ignored, so
    raise both there (``total``: the trials of the whole search with ``num_samples``)."""
    from ray import cloudpickle
    from ray.train._internal.storage import get_fs_and_path

    fs, root = get_fs_and_path(location, storage_filesystem(trial_storage))
    paths = {k: _newest(fs, root, p) for k, p in (("generator", "search_gen_state-*.json"),
                                                   ("searcher", "searcher-state-*.pkl"))}
    if not all(paths.values()):
        return []
    generator = cloudpickle.loads(_read(fs, paths["generator"]))
    if generator["total_samples"] >= total:
        return []
    searcher = json.loads(_read(fs, paths["searcher"]))
    before = generator["total_samples"]
    generator["total_samples"], generator["finished"] = total, False
    searcher["num_samples"] = num_samples
    _write(fs, paths["searcher"], json.dumps(searcher).encode())
    _write(fs, paths["generator"], cloudpickle.dumps(generator))
    return [f"{num_samples} trials per fold: {before} -> {total} trials in all"]


def reopen_search(location: str, trial_storage: str | None) -> tuple[list[str], set[str]]:
    """``--resume`` of a search that a budget ended (tune/budget.py): Tune saved its search generator
    as finished, so a larger budget would start no trial; reopen it while it has created fewer trials
    than planned. Also returns the ids of the trials Tune restores as unfinished."""
    from ray import cloudpickle
    from ray.train._internal.storage import get_fs_and_path

    fs, root = get_fs_and_path(location, storage_filesystem(trial_storage))
    paths = {k: _newest(fs, root, p) for k, p in (("experiment", "experiment_state-*.json"),
                                                   ("generator", "search_gen_state-*.json"))}
    if not all(paths.values()):
        return [], set()
    unfinished = {t["trial_id"] for t in tune_trials(_read(fs, paths["experiment"])) if t["status"] in UNFINISHED}
    generator = cloudpickle.loads(_read(fs, paths["generator"]))
    if not generator["finished"] or generator["counter"] >= generator["total_samples"]:
        return [], unfinished
    generator["finished"] = False
    _write(fs, paths["generator"], cloudpickle.dumps(generator))
    return [f"search reopened after {generator['counter']} of {generator['total_samples']} trials"], unfinished


def apply_run_settings(location: str, trial_storage: str | None, max_failures: int, max_concurrent: int | None,
                       reuse_actors: bool, metric: str, mode: str) -> list[str]:
    """``--resume`` with ``--max-failures``, ``--max-concurrent`` or ``resources.reuse_actors``: Tune
    restores them from its saved states, not from the resumed call, so write the new values there:

    * each trial's ``max_failures`` (the experiment state's trials: a restored trial keeps its own) and
      the search generator's experiment spec's (the trials created after the resume are made from it);
    * the controller's ``_reuse_actors`` and ``_max_pending_trials`` (the experiment state's
      ``runner_data``, which Tune sets over the new controller's; the pending limit is what Tune
      derives from ``max_concurrent`` for a searcher of its own, 1 without a limit);
    * the search generator's ``ConcurrencyLimiter`` (its saved state replaces the new one's): its
      ``max_concurrent``; with a limit where the run had none, a limiter holding the unfinished
      trials, since a limiter passes on to the searcher only the trials it holds.

    Returns what changed (nothing when the settings are the run's)."""
    import os

    from ray import cloudpickle
    from ray.train._internal.storage import get_fs_and_path
    from ray.tune.search import ConcurrencyLimiter, Searcher

    fs, root = get_fs_and_path(location, storage_filesystem(trial_storage))
    paths = {k: _newest(fs, root, p) for k, p in (("experiment", "experiment_state-*.json"),
                                                   ("generator", "search_gen_state-*.json"))}
    if not all(paths.values()):
        return []
    changes = []
    state = json.loads(_read(fs, paths["experiment"]))  # plain JSON: Tune's pickled values stay as written
    trials, unfinished, retries = [], set(), set()
    for json_state, metadata in state["trial_data"]:
        trial = json.loads(json_state)
        if trial["status"] in UNFINISHED:
            unfinished.add(trial["trial_id"])
        if trial.get("max_failures") != max_failures:
            retries.add(trial.get("max_failures"))
            trial["max_failures"] = max_failures
            json_state = json.dumps(trial, indent=2)
        trials.append([json_state, metadata])
    if retries:
        changes.append(f"retries of a failing trial {', '.join(map(str, sorted(retries, key=str)))} -> {max_failures}")
    pending = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG", "auto")
    pending = int(pending) if pending != "auto" else (max_concurrent or 1)
    runner = state.get("runner_data", {})
    if runner.get("_reuse_actors", reuse_actors) != reuse_actors:
        changes.append(f"reuse_actors {runner['_reuse_actors']} -> {reuse_actors}")
    runner_changed = runner.get("_reuse_actors") != reuse_actors or runner.get("_max_pending_trials") != pending
    if retries or runner_changed:
        runner.update({"_reuse_actors": reuse_actors, "_max_pending_trials": pending})
        _write(fs, paths["experiment"], json.dumps({**state, "trial_data": trials, "runner_data": runner}).encode())

    generator = cloudpickle.loads(_read(fs, paths["generator"]))
    experiment = generator.get("experiment")  # the spec Tune makes every new trial from
    spec = getattr(experiment, "spec", None)
    if isinstance(spec, dict) and spec.get("max_failures") != max_failures:
        if not retries:
            changes.append(f"retries of a failing trial {spec.get('max_failures')} -> {max_failures}")
        spec["max_failures"] = max_failures
        _write(fs, paths["generator"], cloudpickle.dumps(generator))
    limiter = generator.get("name:ConcurrencyLimiter")
    if max_concurrent and limiter is None:
        limiter = ConcurrencyLimiter(Searcher(metric=metric, mode=mode), max_concurrent=max_concurrent).get_state()
        limiter["live_trials"], limiter["num_unfinished_live_trials"] = set(unfinished), len(unfinished)
        generator["name:ConcurrencyLimiter"] = limiter
        changes.append(f"trials at a time: no limit -> {max_concurrent}")
        _write(fs, paths["generator"], cloudpickle.dumps(generator))
    elif max_concurrent and limiter["max_concurrent"] != max_concurrent:
        changes.append(f"trials at a time {limiter['max_concurrent']} -> {max_concurrent}")
        limiter["max_concurrent"] = max_concurrent
        _write(fs, paths["generator"], cloudpickle.dumps(generator))
    elif not max_concurrent and limiter is not None:
        changes.append(f"trials at a time {limiter['max_concurrent']} -> no limit")  # Tune then adds no limiter
    return changes
