"""ray_predict: what does Ray Data prediction (``ensemble/predict.py --address``) gain over the local
predictor? Images/s of ``ensemble.ray_predict.predict_on_ray`` on a local 3-node cluster against
``ensemble.predict.predict_with_bundle`` in one process, and the per-process ratio.

Cluster: ``ray.cluster_utils.Cluster`` on this machine, a head without CPUs and 3 worker nodes of
1 CPU each (separate raylets), one actor per node (``--actors 3``, 1 CPU and one torch thread
each). Members: the untrained tiny Unets of bench/ensemble_inference.py (96x128 input; 2 folds
x 2 = 4 members, quick: 2 x 1 = 2), no TTA, in a bundle. Images: the 24 validation images of the
shipped sample (120x160), copied under new names to 192 (quick: 48), batches of 8. Both sides
write the same outputs (masks, ``submission.csv``) into a fresh folder.

* **wall**: images / wall seconds of the whole call; the Ray side includes starting the actors
  and each loading the bundle (Ray Data starts a new pool per job), the cost a job pays;
* **pool**: images / the busiest actor's seconds inside ``__call__`` (reading, predicting,
  writing): the pool's rate once started, what a long job approaches;
* **per image on an actor**: those seconds per image against the local path's: the cost that
  scales (and the base of a paper estimate for larger jobs);
* **per-process ratio**: (Ray images/s / actors) / local images/s; 1.0 would be perfect scaling.
  On a machine with fewer free cores than actors it is bounded by cores / actors.

Target: informational (the ratio and where the time goes are the result).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import common  # noqa: E402
from bench.ensemble_inference import VAL_IMAGES, cpu_members

NAME = "ray_predict"
TARGET = "informational: Ray Data images/s on 3 one-CPU nodes vs the local predictor (per-process ratio)"
NODES = 3
BATCH = 8


@contextlib.contextmanager
def local_cluster(nodes: int):
    """A head (no CPUs) and ``nodes`` 1-CPU worker nodes under a private RAY_TMPDIR; yields the address."""
    ray_dir = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths are limited
    for key in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_JOB_SUBMISSION_ID"):
        os.environ.pop(key, None)
    os.environ["RAY_TMPDIR"] = str(ray_dir)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def image_folder(folder: Path, n: int) -> Path:
    sources = sorted(VAL_IMAGES.iterdir())
    folder.mkdir(parents=True)
    for k in range(n):
        src = sources[k % len(sources)]
        shutil.copyfile(src, folder / f"{k:05d}-{src.name}")
    return folder


def run(quick: bool) -> dict:
    from ensemble.bundle import load_bundle, write_bundle
    from ensemble.predict import predict_with_bundle
    from ensemble.ray_predict import predict_on_ray

    common.set_threads()
    n_images, reps = (48, 1) if quick else (192, 3)
    folds, per_fold = (2, 1) if quick else (2, 2)
    with common.scratch("raypred") as tmp:
        members = cpu_members(tmp, folds, per_fold)
        bundle_dir = write_bundle(tmp / "bundle", members, tta="none", voting="soft", rule={"thresholds": None},
                                  metric="val_miou", mode="max")
        images = image_folder(tmp / "images", n_images)
        local, ray_wall, ray_pool, ray_busy, local_per_image = [], [], [], [], []
        nodes_used = []
        with local_cluster(NODES) as address:
            for rep in range(reps):
                for side in (("local", "ray") if rep % 2 == 0 else ("ray", "local")):
                    out = tmp / f"out-{side}-{rep}"
                    start = time.perf_counter()
                    if side == "local":
                        bundle = load_bundle(bundle_dir, "cpu")
                        predict_with_bundle(bundle, images, out=out, batch_size=BATCH, device="cpu")
                        seconds = time.perf_counter() - start
                        local.append(n_images / seconds)
                        local_per_image.append(seconds / n_images)
                    else:
                        res = predict_on_ray(bundle_dir, images, out, address=address, actors=NODES,
                                             batch_size=BATCH, device="cpu")
                        ray_wall.append(n_images / (time.perf_counter() - start))
                        ray_busy.append(sum(a["busy_s"] for a in res["actors"]) / n_images)
                        ray_pool.append(n_images / max(a["busy_s"] for a in res["actors"]))
                        nodes_used.append(len({a["node"] for a in res["actors"]}))
                    shutil.rmtree(out)
                common.log(f"  rep {rep}: local {local[-1]:.2f} img/s, ray {ray_wall[-1]:.2f} img/s wall, "
                           f"{ray_pool[-1]:.2f} img/s pool "
                           f"({ray_busy[-1] * 1000:.0f} ms/img on an actor, {nodes_used[-1]} nodes)")
    per_process = common.safe_ratio(common.median(ray_wall) / NODES, common.median(local))
    rows = [
        common.row(f"images/s, {len(members)} members, {n_images} images", common.side(
            f"Ray Data, {NODES} actors", ray_wall, "img/s"), common.side("local predictor", local, "img/s"),
            common.safe_ratio(common.median(ray_wall), common.median(local)), "info"),
        common.row("images/s per process (wall)", common.side("Ray / actor", [v / NODES for v in ray_wall], "img/s"),
                   common.side("local", local, "img/s"), per_process, "info"),
        common.row("images/s per process (pool, started)", common.side("Ray pool / actor",
                                                                       [v / NODES for v in ray_pool], "img/s"),
                   common.side("local", local, "img/s"),
                   common.safe_ratio(common.median(ray_pool) / NODES, common.median(local)), "info"),
        common.row("seconds per image", common.side("inside an actor", ray_busy, "s"),
                   common.side("local (whole call)", local_per_image, "s"),
                   common.safe_ratio(common.median(ray_busy), common.median(local_per_image)), "info"),
    ]
    details = {"members": len(members), "images": n_images, "batch": BATCH, "nodes": NODES,
               "threads": common.THREADS,
               "cpus": os.cpu_count(), "load_avg": list(os.getloadavg()), "local_ips": local,
               "ray_ips": ray_wall, "ray_pool_ips": ray_pool,
               "ray_s_per_image_on_actor": ray_busy, "local_s_per_image": local_per_image, "nodes_used": nodes_used}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
