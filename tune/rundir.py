"""The run directory's state: what a new run refuses to inherit, and what a ``--resume`` may change.

A new run must not start over what an earlier one left: the scheduler reloads ``asha_state.json``
and the searcher continues the studies in ``studies.db``, so a run in a directory holding either
would be judged against another run's trials. It is refused in one line, or, with ``--overwrite``
(and on every ``--debug``), the earlier run is removed first.

``--resume`` continues an experiment with the searcher and scheduler Tune pickled when it began,
so a changed space, fixed setting, metric, mode or seed would either be ignored or mix two
searches in one study: the resumed run's ``experiment.json`` is compared with the new settings and
a change refused with a one-line diff. What may change: more trials (``--num-samples`` only grows),
resources, retries, the cluster address, the dashboard, W&B (``train.preview_images`` is only for
W&B) and the verbosity; tune/search.py's ``build_tuner`` applies them to the restored run. The
dataset is checked by its fingerprint and the folds by ``folds.json``, so the data's paths may change
too (a moved dataset).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from trainables import config
from trainables.errors import InputError
from trainables.runfiles import RunFiles
from tune.space import SearchSpec

# fixed settings that say where the data is or how a trial runs, not what it trains
UNCOMPARED = {"data.path", "data.images", "data.cache_dir", "train.preview_images", "train.num_workers",
              "train.device", "train.metric", "train.mode"}  # the last two follow search.metric/mode
COMPARED_SEARCH = ("metric", "mode", "seed", "n_startup_trials", "asha", "search_folds", "retrain_top", "racing")
# search.asha settings a run need not record (older experiment.json files, spaces that leave them
# out): the value they then have
ASHA_UNRECORDED = {"recheck": False, "promotion": False}


def earlier_state(run_dir: Path) -> list[str]:
    """The search state (:data:`trainables.runfiles.SEARCH_STATE`) that ``run_dir`` holds."""
    return RunFiles(run_dir).earlier_state()


def clear_earlier_run(run_dir: Path, trial_location: str | None = None) -> None:
    """``--overwrite``: remove the earlier run (its whole directory, as ``--debug`` always did) and
    its experiment in the trials' storage (``trial_location``: a path or a URI), if any."""
    run_dir = Path(run_dir)
    if earlier_state(run_dir):
        shutil.rmtree(run_dir)
    if trial_location:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(trial_location) if "://" in trial_location \
            else (pafs.LocalFileSystem(), str(Path(trial_location).resolve()))
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def space_definition(spec: SearchSpec) -> dict[str, dict]:
    """Each searched parameter's distribution, without its empty fields (recorded in experiment.json)."""
    def compact(param) -> dict:
        out = {}
        for f in dataclasses.fields(param):
            value = getattr(param, f.name)
            if f.name == "key" or value is None or value is False or (isinstance(value, (list, dict)) and not value):
                continue
            out[f.name] = compact(value) if f.name == "inner" else value
        return out

    return json.loads(json.dumps({key: compact(p) for key, p in spec.space.items()}, default=str))


def run_settings(spec: SearchSpec, base: dict, trial_storage: str | None = None) -> dict:
    """The ``settings`` of experiment.json: ``base`` is the resolved fixed config the trials get."""
    return {"space": str(spec.source), "name": spec.name, "fixed": base, "search": spec.search,
            "resources": spec.resources, "space_params": sorted(spec.space),
            "space_definition": space_definition(spec), "trial_storage": trial_storage}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def settings_changes(saved: dict, current: dict) -> list[str]:
    """``key old -> new`` for every setting a resume may not change (see the module doc); settings an
    older experiment.json did not record count as unchanged while they keep their defaults."""
    current = json.loads(json.dumps(current, default=str))  # what experiment.json would hold
    changes = []
    if "fixed" in saved:
        old, new = config.flatten(saved["fixed"]), config.flatten(current["fixed"])
        for key in sorted(set(old) | set(new)):
            if key in UNCOMPARED:
                continue
            section, _, name = key.partition(".")
            default = json.loads(json.dumps(config.DEFAULTS.get(section, {}).get(name)))
            before, after = old.get(key, default), new.get(key, default)
            if before != after:
                changes.append(f"{key} {_show(before)} -> {_show(after)}")
    search_old, search_new = saved.get("search", {}), current["search"]
    for key in COMPARED_SEARCH:
        if key not in search_old:
            continue
        before, after = search_old[key], search_new.get(key)
        if key == "asha" and isinstance(before, dict) and isinstance(after, dict):
            before, after = {**ASHA_UNRECORDED, **before}, {**ASHA_UNRECORDED, **after}
        if before != after:
            changes.append(f"search.{key} {_show(before)} -> {_show(after)}")
    if int(search_old.get("num_samples", 0)) > int(search_new["num_samples"]):
        changes.append(f"search.num_samples {search_old['num_samples']} -> {search_new['num_samples']} "
                       "(it may only grow)")
    if "space_definition" in saved:
        old, new = saved["space_definition"], current["space_definition"]
    else:  # recorded before the definitions were: the parameter names only
        old, new = ({k: "searched" for k in saved.get("space_params", [])},
                    {k: "searched" for k in current["space_params"]}) if "space_params" in saved else ({}, {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before, after = old.get(key, "not searched"), new.get(key, "not searched")
            changes.append(f"space.{key} {_show(before)} -> {_show(after)}")
    return changes


def check_resume_settings(path: Path, saved: dict, current: dict) -> None:
    """Refuse a ``--resume`` whose settings differ from the resumed run's (``path``: its experiment.json)."""
    changes = settings_changes(saved, current)
    if changes:
        raise InputError(path, f"--resume with changed settings: {', '.join(changes)}; start a new run with --name")
