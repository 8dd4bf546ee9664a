"""``ensemble/predict.py --address`` on a local 3-node cluster (a head without CPUs and three
1-CPU worker nodes, ``ray start`` each, as in tests/tune/test_distributed.py): the files are those of
the local path byte for byte, the batches ran on several nodes, an actor killed mid-batch has its
batch retried, and every output file is moved into place once, with nothing half-written left.

The bundle: two untrained tiny Unets (64x96 input) for the shipped sample's 12 classes, with
class-wise thresholds and hflip TTA; the 24 annotated validation images (120x160), so
``test_metrics.json`` is compared too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_config
from tests.tune.test_distributed import LocalCluster
from tests.ensemble.test_ensemble import experiment  # noqa: F401 (fixture: a tiny 2-fold run directory)
from tests.tune.test_tune import clean_up_ray, private_ray_dir, scratch_dir, tail

ROOT = Path(__file__).resolve().parents[2]
VAL = ROOT / "data" / "camvid-sample" / "val" / "annotations.json"
PREDICT = ROOT / "ensemble" / "predict.py"
NAMES = ["background", "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
         "Pedestrian", "Bicyclist"]
# thresholds near 1/12 (untrained members are nearly uniform): masks with many classes, void (255) nowhere
RULE = {"thresholds": {"thresholds": [0.0] + [0.083] * 11, "fallback": 0, "min_area": [0] * 12},
        "crf": None, "max_size": None}

# The driver of the kill test: predict_on_ray with an audit hook counting every os.replace /
# os.rename into the output folder (the driver moves the staged files there), then the result.
DRIVER = """
import json, sys
from pathlib import Path
report, bundle, images, out, address = sys.argv[1:]
moves = []
def watch(event, args):
    if event in ("os.rename", "os.replace") and str(args[1]).startswith(out):
        moves.append(str(args[1]))
sys.addaudithook(watch)
from ensemble.ray_predict import predict_on_ray
res = predict_on_ray(Path(bundle), Path(images), Path(out), address=address, actors=3, batch_size=2,
                     save_probs=True)
with open(report, "w") as fh:
    json.dump({"actors": res["actors"], "moves": moves}, fh)
"""


def _bundle(tmp: Path) -> Path:
    from ensemble.bundle import write_bundle
    from ensemble.predictor import load_member
    from trainables.checkpoint import make_checkpoint, save_checkpoint
    from trainables.models import build_model

    members = []
    for k, score in enumerate((0.3, 0.5)):
        cfg = tiny_config(**{"train.seed": k})
        torch.manual_seed(k)
        m = cfg["model"]
        model = build_model(m["arch"], m["encoder"], len(NAMES), weights=None, kwargs=m["kwargs"])
        path = save_checkpoint(make_checkpoint(model.state_dict(), cfg, NAMES, "multiclass", "val_miou", score, 1, k),
                               tmp / f"m{k}" / "model.pt")
        members.append(load_member(path, f"m{k}", torch.device("cpu")))
    return write_bundle(tmp / "bundle", members, tta="hflip", voting="soft", rule=RULE, metric="val_miou", mode="max",
                        data={"unannotated": "background", "has_background": True})


@pytest.fixture(scope="module")
def setup():
    """The bundle, the local path's predictions of it (in this process: no Ray) and the cluster."""
    from ensemble.bundle import load_bundle
    from ensemble.predict import predict_with_bundle

    tmp, cache, ray_dir = scratch_dir("raypred"), scratch_dir("cache"), private_ray_dir()
    bundle = _bundle(tmp)
    predict_with_bundle(load_bundle(bundle), VAL, out=tmp / "local", batch_size=8, save_probs=True, cache_dir=cache)
    cluster = LocalCluster(ray_dir, cache)
    try:
        cluster.start(("w1", "w2", "w3"))
        yield SimpleNamespace(tmp=tmp, bundle=bundle, local=tmp / "local", cluster=cluster, cache=cache)
    finally:
        clean_up_ray(ray_dir)
        import shutil

        for path in (tmp, cache):
            shutil.rmtree(path, ignore_errors=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_outputs(got: Path, ref: Path) -> None:
    a, b = _files(got), _files(ref)
    assert sorted(a) == sorted(b)  # also: no temp file, no staging folder left
    assert len([k for k in a if k.startswith("masks/")]) == 24 and len([k for k in a if k.startswith("probs/")]) == 24
    for name in a:
        if name == "test_metrics.json":  # floats through json: the same numbers
            assert json.loads(a[name]) == json.loads(b[name])
        else:
            assert a[name] == b[name], name
    assert not [p for p in got.rglob("*") if p.name.startswith(".")]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_on_a_cluster_writes_the_local_files_from_several_nodes(setup):
    out = setup.tmp / "ray-cli"
    proc = subprocess.run([sys.executable, str(PREDICT), "--bundle", setup.bundle, "--images", VAL, "--out", out,
                           "--save-probs", "--address", f"127.0.0.1:{setup.cluster.port}", "--actors", "3",
                           "--batch-size", "2"], cwd=ROOT, env=setup.cluster.env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    _same_outputs(out, setup.local)
    assert "predicted 24 images with 2 members" in proc.stdout and "(a) best single" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("on Ray:"))
    nodes = int(line.split(" on ")[-1].split()[0])
    assert nodes >= 2, line  # three 1-CPU actors cannot share a node


def _actor_lines(out: Path) -> list[dict]:
    lines = []
    for path in out.glob(".ray-staging-*/actors/*.jsonl"):
        try:
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        except (OSError, json.JSONDecodeError):  # being written, or the job just ended
            pass
    return lines


@pytest.mark.ray
@pytest.mark.slow
def test_an_actor_killed_mid_batch_is_retried_and_nothing_is_written_twice(setup):
    out, report = setup.tmp / "ray-kill", setup.tmp / "kill.json"
    driver = setup.tmp / "_driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(report), str(setup.bundle), str(VAL), str(out),
                             f"127.0.0.1:{setup.cluster.port}"], cwd=ROOT, env=setup.cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        lines = _actor_lines(out)
        ended = {(x["pid"], tuple(x["indices"])) for x in lines if x["event"] == "end"}
        running = [x for x in lines if x["event"] == "begin" and (x["pid"], tuple(x["indices"])) not in ended]
        if ended and running:  # mid-run: one batch done, this one in flight
            killed = running[0]
            os.kill(killed["pid"], signal.SIGKILL)
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, tail(output)
    assert killed is not None, "the job ended before a batch could be killed"
    res = json.loads(report.read_text())
    # the killed batch's images came back from another process (the restarted actor or another one)
    by_index = {i: a["pid"] for a in res["actors"] for i in a["indices"]}
    assert sorted(by_index) == list(range(24))
    assert all(by_index[i] != killed["pid"] for i in killed["indices"]), (killed, res["actors"])
    assert len({a["node"] for a in res["actors"]}) >= 2
    _same_outputs(out, setup.local)
    # each file of the output folder was moved into place exactly once, all of them by the driver
    final = [str(out / name) for name in _files(out)]
    assert sorted(res["moves"]) == sorted(final) and len(res["moves"]) == len(set(res["moves"]))


@pytest.mark.ray
@pytest.mark.slow
def test_run_pseudo_label_per_fold_on_a_cluster_writes_the_local_labels(setup, experiment):  # noqa: F811
    """``ensemble/run.py --pseudo-label --pseudo-per-fold`` locally, then with ``--address``: the same
    label folders (each fold's members only: the actors take them from the bundle by position)."""
    unlabelled = setup.tmp / "unlabelled"
    unlabelled.mkdir()
    for p in sorted((VAL.parent / "images").iterdir())[:8]:
        (unlabelled / p.name).write_bytes(p.read_bytes())
    base = [sys.executable, "ensemble/run.py", "--experiment", experiment.run_dir, "--top-k", 2, "--wandb", "disabled",
            "--tta", "hflip", "--pseudo-label", unlabelled, "--pseudo-confidence", 0.1, "--pseudo-per-fold"]
    env = {**setup.cluster.env, "SEGHPO_CACHE": str(experiment.cache), "WANDB_MODE": "disabled"}
    runs = {"local": [], "ray": ["--address", f"127.0.0.1:{setup.cluster.port}", "--actors", 3, "--batch-size", 2]}
    for name, extra in runs.items():
        proc = subprocess.run([str(a) for a in base + ["--pseudo-out", setup.tmp / f"pseudo-{name}", *extra]], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    local, ray = _files(setup.tmp / "pseudo-local"), _files(setup.tmp / "pseudo-ray")
    assert sorted(local) == sorted(ray)
    assert {k.split("/")[0] for k in local} == {"fold0", "fold1"} and len(local) == 2 * (2 * 8 + 2)
    for name in local:
        assert local[name] == ray[name], name
    summaries = [json.loads(local[f"fold{f}/pseudo.json"]) for f in (0, 1)]
    assert summaries[0]["members"] != summaries[1]["members"]  # per fold: different members, different labels
    assert local["fold0/masks/" + sorted(unlabelled.iterdir())[0].stem + ".png"] != \
        local["fold1/masks/" + sorted(unlabelled.iterdir())[0].stem + ".png"]


# --------------------------------------------------------------------------- without Ray


def test_merged_counts_of_image_shares_score_as_one_pass():
    """What the driver does with the actors' per-image counts: merged in any order, the scores of
    one pass over all images (boundary IoU included), and pixel accuracy against a brute force."""
    import numpy as np

    from trainables.metrics import SegMetrics

    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 4, (20, 30)).astype(np.int64) for _ in range(5)]
    preds = [np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 4, t.shape)) for t in truths]
    for t in truths:
        t[0, :5] = 255  # ignored pixels
    whole, parts = SegMetrics(4, boundary=True), []
    for p, t in zip(preds, truths):
        whole.update(torch.from_numpy(p)[None], torch.from_numpy(t)[None])
        part = SegMetrics(4, boundary=True)
        part.update(torch.from_numpy(p)[None], torch.from_numpy(t)[None])
        parts.append(part)
    merged = SegMetrics(4, boundary=True)
    for part in reversed(parts):
        merged.merge(part)
    assert json.dumps(merged.compute(), sort_keys=True) == json.dumps(whole.compute(), sort_keys=True)
    keep = np.concatenate([t.ravel() for t in truths]) != 255
    brute = (np.concatenate([p.ravel() for p in preds]) == np.concatenate([t.ravel() for t in truths]))[keep].mean()
    assert abs(merged.compute()["pixel_acc"] - brute) < 1e-12


@pytest.mark.slow
def test_ray_flags_without_ray_are_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(PREDICT), "--bundle", tmp_path, "--images", tmp_path, "--out",
                           tmp_path / "out", "--actors", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "need --ray or --address" in proc.stderr
    assert not (tmp_path / "out").exists()
