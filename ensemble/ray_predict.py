"""The bundle's predictions over many processes or machines: Ray Data's actor pool.

``ensemble/predict.py --ray`` (a Ray on this machine) or ``--address ADDR`` (a running cluster;
``auto`` inside a Jobs API driver) and ``ensemble/run.py --pseudo-label ... --ray/--address``
come here; the local path never imports Ray.

The image list goes into Ray Data as ``ray.data.from_items`` of (index, path, id) records, one
block per batch, and each actor reads its images itself: ``read_images`` would decode and resize
them into one tensor column, losing the original sizes and file names the masks are written at
(and moving every image through the object store when the actors can read the files). Each actor
of the pool (``map_batches`` with a callable class, ``ActorPoolStrategy(size=N)``, N from
``--actors`` or what the cluster offers) loads the bundle once in ``__init__`` and runs the same
per-image code as the local path (:func:`ensemble.infer.write_image_outputs`,
:func:`ensemble.pseudo.pseudo_image`), so files are the same bytes.

Nothing is written twice or half-written, even when an actor dies and Ray retries its batches
(``max_restarts`` / ``max_task_retries``): actors write into a staging folder of this job,
``<out>/.ray-staging-<id>/``, each file atomically, then one small record per image (its
submission rows, its test-row counts, the files written) last. A retried batch reuses the
records it finds and predicts only the images without one. When every batch is back, the driver
moves each staged file into ``<out>`` once (``os.replace``), assembles ``submission.csv`` /
``test_metrics.json`` / ``pseudo.json`` in the local path's image order and writes them
atomically, and removes the staging folder. A job that fails leaves ``<out>`` as it was (and its
staging folder, for a look). ``<out>`` must be on storage the driver and every actor's node see.

Actors append ``begin`` / ``end`` lines (batch indices, node id, pid) to
``<staging>/actors/<pid>.jsonl`` while the job runs, and every batch reports its node and pid
back: the result lists them (``actors``: per actor process its node, pid, image indices and seconds
spent in ``__call__``), so a caller sees where the work ran and what it cost.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from ensemble.bundle import load_bundle, shipped_refits, verify
from ensemble.infer import RowScorer, check_prediction, decisions, list_inputs, submission_skip, write_image_outputs
from ensemble.member import best_member_index
from ensemble.pseudo import pseudo_image, pseudo_inputs, write_pseudo_summary
from ensemble.submission import Submission
from trainables.data import read_image
from trainables.errors import ConfigError, InputError
from trainables.io import atomic_path, atomic_write_json
from trainables.rows import ROWS
from trainables.runfiles import TEST_METRICS_JSON

logger = logging.getLogger(__name__)

# an actor that dies (node lost, OOM-killed) is restarted and its batch retried this many times;
# bounded, so that an image that kills every actor fails the job instead of looping
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
STAGING_PREFIX = ".ray-staging-"


class BundlePredictor:
    """One Ray Data actor: the bundle's ensemble, loaded once; ``__call__`` predicts a batch of
    (index, path, id) records and returns one row per image (index, pickled record, node, pid, seconds).

    ``job``: what to do per image: ``{"kind": "predict", "save_probs", "boundary", "tile",
    "sample_submission", "rle_order", "images", "cache_dir", "options"}`` or ``{"kind": "pseudo",
    "confidence", "members"}`` (``members``: indices of the bundle's members to use, None = all)."""

    def __init__(self, bundle_dir: str, staging: str, device: str, runtime: str, threads: int, job: dict):
        import ray  # lazy: Ray is imported only when asked for (--ray, --address)

        if runtime != "onnx":
            import torch  # lazy: the onnx runtime runs without torch

            torch.set_num_threads(max(1, threads))
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        self.staging, self.job = Path(staging), job
        bundle = load_bundle(Path(bundle_dir), device, runtime, threads=max(1, threads))
        if job.get("members") is not None:
            bundle.members = [bundle.members[k] for k in job["members"]]
        self.bundle = bundle
        self.ens = bundle.ensemble(device, tile=job.get("tile"))
        self.thresholds, self.refine = bundle.thresholds, bundle.refiner()
        self.data = None
        if job["kind"] == "predict":
            self.submission = Submission(bundle.class_names, bundle.task, submission_skip(
                self.thresholds, job["has_background"]), job["rle_order"], job["sample_submission"])
            if job["annotated"]:
                _, _, self.data = list_inputs(Path(job["images"]), bundle.task, job["unannotated"], job["cache_dir"],
                                              job["options"])
            self.best = bundle.best_member() if self.data is not None else None

    def _log(self, event: str, indices: list[int]) -> None:
        path = self.staging / "actors" / f"{self.pid}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"event": event, "indices": indices, "node": self.node, "pid": self.pid}) + "\n")

    def _record_path(self, index: int) -> Path:
        return self.staging / "records" / f"{index}.pkl"

    def _predict_one(self, index: int, path: str, image_id: str, image, probs, member) -> dict:
        if self.job["kind"] == "pseudo":
            kept, counts, files = pseudo_image(self.ens, self.thresholds, out=self.staging, path=Path(path),
                                               image_id=image_id, image=image,
                                               probs=probs, confidence=self.job["confidence"], refine=self.refine,
                                               num_classes=len(self.bundle.class_names))
            return {"kept": kept, "counts": counts, "files": files}
        rows = decisions(self.ens, probs, member, image, self.thresholds, self.refine)
        files = write_image_outputs(self.staging, Path(image_id).stem, self.bundle.task, self.bundle.class_names,
                                    rows["tuned"], probs if self.job["save_probs"] else None)
        scorer = None
        if self.data is not None:
            scorer = RowScorer(len(self.bundle.class_names), self.bundle.task, 255, boundary=self.job["boundary"])
            scorer.add(self.data.read_mask(index), rows)
        return {"rows": self.submission.rows_of(image_id, rows["tuned"]), "scorer": scorer, "files": files}

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        indices = [int(i) for i in batch["index"]]
        self._log("begin", indices)
        records = {}
        for i in indices:  # a retried batch: the images an earlier attempt finished
            if self._record_path(i).exists():
                records[i] = self._record_path(i).read_bytes()
        todo = [(i, str(p), str(n)) for i, p, n in zip(indices, batch["path"], batch["id"]) if i not in records]
        if todo:
            images = [read_image(Path(p)) for _, p, _ in todo]
            if self.job["kind"] == "predict" and self.best is not None:
                outs = self.ens.predict_batch_and_member(images, self.best)
            else:
                outs = [(p, None) for p in self.ens.predict_batch(images)]
            for (i, path, image_id), image, (probs, member) in zip(todo, images, outs):
                blob = pickle.dumps(self._predict_one(i, path, image_id, image, probs, member))
                with atomic_path(self._record_path(i)) as tmp:  # last: the image's files are all staged
                    tmp.write_bytes(blob)
                records[i] = blob
        self._log("end", indices)
        busy = (time.perf_counter() - start) / len(indices)  # this attempt's seconds per image
        return {"index": np.array(indices, dtype=np.int64),
                "record": np.array([records[i] for i in indices], dtype=object),
                "node": np.array([self.node] * len(indices)), "pid": np.array([self.pid] * len(indices)),
                "busy_s": np.full(len(indices), busy)}


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (``auto``: the one this process runs in), or start a Ray here."""
    from tune.cluster import init_ray  # lazy: the Ray connection, only when Ray is asked for

    init_ray(address, False)


def pool_size(actors: int | None, cpus_per_actor: float, gpus_per_actor: float, batches: int) -> int:
    """``actors``, or as many as the cluster's CPUs (GPUs when actors take GPUs) hold; never more than batches."""
    import ray  # lazy: Ray is imported only when asked for (--ray, --address)

    if actors is not None:
        if actors < 1:
            raise ConfigError("command line", "--actors", f"must be at least 1, got {actors=}")
        return min(actors, batches)
    total = ray.cluster_resources()
    fit = (total.get("GPU", 0) / gpus_per_actor if gpus_per_actor else total.get("CPU", 0) / max(cpus_per_actor, 1e-9))
    if fit < 1:
        raise ConfigError("command line", "--gpus-per-actor" if gpus_per_actor else "--cpus-per-actor",
                          f"the cluster has {total.get('GPU' if gpus_per_actor else 'CPU', 0)} "
                          f"{'GPUs' if gpus_per_actor else 'CPUs'}: not one actor fits")
    return max(1, min(int(fit), batches))


def run_actor_pool(bundle_dir: Path, paths: list[Path], ids: list[str], out: Path, job: dict, *, batch_size: int,
                   actors: int | None, cpus_per_actor: float, gpus_per_actor: float, device: str, runtime: str,
                   desc: str) -> tuple[dict[int, dict], list[dict], Path]:
    """Records of every image (index -> record), the actor processes (node, pid, indices, busy seconds)
    that returned them and the staging folder."""
    import ray  # lazy: Ray is imported only when asked for (--ray, --address)
    from ray.data import ActorPoolStrategy, DataContext

    if batch_size < 1:
        raise ConfigError("command line", "--batch-size", f"must be at least 1, got {batch_size=}")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    DataContext.get_current().enable_progress_bars = False  # the bar below counts images
    batches = math.ceil(len(paths) / batch_size)
    size = pool_size(actors, cpus_per_actor, gpus_per_actor, batches)
    items = [{"index": i, "path": str(Path(p).resolve()), "id": n} for i, (p, n) in enumerate(zip(paths, ids))]
    ds = ray.data.from_items(items, override_num_blocks=batches)  # one block per batch: spread over the pool
    with warnings.catch_warnings():
        # Ray 2.60 sets an actor pool's max_restarts / max_task_retries only through the extra remote
        # arguments (its actor_pool_map_operator says so) and warns that these are deprecated
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(BundlePredictor, batch_size=batch_size, batch_format="numpy",
                            compute=ActorPoolStrategy(size=size),
                            fn_constructor_kwargs={"bundle_dir": str(Path(bundle_dir).resolve()),
                                                   "staging": str(staging), "device": device, "runtime": runtime,
                                                   "threads": max(1, int(cpus_per_actor)), "job": job},
                            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
    logger.info("%d images in %d batches of %d on %d actors (%s CPUs, %s GPUs each)", len(paths), batches, batch_size,
                size, cpus_per_actor, gpus_per_actor)
    records: dict[int, dict] = {}
    seen: dict[tuple, list[int]] = {}
    busy: dict[tuple, float] = {}
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, rec, node, pid, sec in zip(batch["index"], batch["record"], batch["node"], batch["pid"],
                                              batch["busy_s"]):
                records[int(i)] = pickle.loads(rec)
                seen.setdefault((str(node), int(pid)), []).append(int(i))
                busy[(str(node), int(pid))] = busy.get((str(node), int(pid)), 0.0) + float(sec)
            bar.update(len(batch["index"]))
    missing = sorted(set(range(len(paths))) - set(records))
    if missing:  # Ray Data returns every row or raises; a hole here would be a bug, never a silent gap
        raise RuntimeError(f"{len(missing)} images came back without a prediction, e.g. {ids[missing[0]]}")
    used = [{"node": node, "pid": pid, "indices": sorted(idx), "busy_s": busy[(node, pid)]}
            for (node, pid), idx in seen.items()]
    return records, used, staging


def commit(staging: Path, out: Path, records: dict[int, dict]) -> None:
    """Move every staged file into ``out`` (once each), then drop the staging folder."""
    for index in sorted(records):
        for rel in records[index]["files"]:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
    shutil.rmtree(staging)


def predict_on_ray(bundle_dir: Path, images: Path, out: Path, *, address: str | None = None,
                   actors: int | None = None, batch_size: int = 8, cpus_per_actor: float = 1.0,
                   gpus_per_actor: float = 0.0, save_probs: bool = False, device: str = "auto", tile=None,
                   sample_submission: Path | None = None, rle_order: str = "column", cache_dir=None,
                   boundary: bool = False, runtime: str = "torch") -> dict:
    """:func:`ensemble.predict.predict_with_bundle` on a Ray actor pool: the same files, the same
    ``submission.csv`` and ``test_metrics.json``; the result adds ``actors``."""
    info = verify(Path(bundle_dir))
    task, class_names = info["task"], info["class_names"]
    thresholds = info["rule"].get("thresholds") or None
    data_info = info.get("data", {})
    has_background = data_info.get("has_background")
    unannotated = data_info.get("unannotated", info.get("unannotated", "background"))
    options = {k: data_info[k] for k in ("crowd", "background") if k in data_info}
    submission = Submission(class_names, task, submission_skip(thresholds, has_background), rle_order,
                            sample_submission)
    paths, ids, data = list_inputs(Path(images), task, unannotated, cache_dir, options)  # the mask cache, once
    if data is not None and data.class_names != class_names:
        raise InputError(images, f"classes {data.class_names} differ from the experiment's {class_names}")
    check_prediction(Path(images), ids, Path(out), batch_size, submission)  # before Ray starts or anything is written
    job = {"kind": "predict", "save_probs": save_probs, "boundary": boundary, "tile": tile, "rle_order": rle_order,
           "sample_submission": str(sample_submission) if sample_submission else None, "images": str(images),
           "cache_dir": str(cache_dir) if cache_dir else None, "options": options, "unannotated": unannotated,
           "has_background": has_background, "annotated": data is not None}
    connect(address)
    records, used, staging = run_actor_pool(bundle_dir, paths, ids, Path(out), job, batch_size=batch_size,
                                            actors=actors, cpus_per_actor=cpus_per_actor,
                                            gpus_per_actor=gpus_per_actor, device=device, runtime=runtime,
                                            desc="predicting")
    scorer = RowScorer(len(class_names), task, 255, boundary=boundary) if data is not None else None
    for i in range(len(paths)):  # the local path's order
        submission.add_rows(ids[i], records[i]["rows"])
        if scorer is not None:
            scorer.merge(records[i]["scorer"])
    commit(staging, Path(out), records)
    submission.write(Path(out) / "submission.csv")
    result = {"images": len(paths), "out": str(out), "actors": used, "members": len(info["members"]),
              "class_names": class_names}
    if scorer is not None:
        entries = [SimpleNamespace(score=float("nan") if e["score"] is None else float(e["score"]))
                   for e in info["members"]]
        keep = best_member_index(entries, info.get("mode", "max"))  # what Bundle.best_member picks
        rows = scorer.compute()
        result["test_rows"] = rows
        result["test_metrics"] = {**rows["tuned"], "images": len(paths), "rows": rows,
                                  "labels": {k: ROWS[k] for k in rows}, "best_single": info["members"][keep]["name"],
                                  "refits": shipped_refits(info["members"])}
        atomic_write_json(Path(out) / TEST_METRICS_JSON, result["test_metrics"])
    return result


def pseudo_label_on_ray(bundle_dir: Path, inputs: Path, out: Path, members: list[int] | None, confidence: float,
                        provenance: dict | None = None, *, address: str | None = None, actors: int | None = None,
                        batch_size: int = 8, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                        device: str = "auto", cache_dir=None) -> dict:
    """:func:`ensemble.pseudo.write_pseudo_labels` of the bundle's ``members`` on a Ray actor pool:
    the same label folder and ``pseudo.json``."""
    info = verify(Path(bundle_dir))
    paths, ids = pseudo_inputs(info["task"], Path(inputs), confidence, cache_dir)
    connect(address)
    records, used, staging = run_actor_pool(bundle_dir, paths, ids, Path(out), {
        "kind": "pseudo", "confidence": confidence, "members": members}, batch_size=batch_size, actors=actors,
        cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, device=device, runtime="torch",
        desc="pseudo-labels")
    class_names = info["class_names"]
    counts = np.zeros(len(class_names), np.int64)
    kept = {}
    for i in range(len(paths)):
        kept[ids[i]] = records[i]["kept"]
        counts += records[i]["counts"]
    commit(staging, Path(out), records)
    summary = write_pseudo_summary(Path(out), class_names, inputs, confidence, info["rule"].get("thresholds") or None,
                                   bool(info["rule"].get("crf")), kept, counts, provenance)
    return {**summary, "actors": used}
