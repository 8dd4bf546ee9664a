"""The ensemble bundle: what it records, its checksums, and that it predicts as its members did."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.bundle import load_bundle, write_bundle
from ensemble.predictor import TTA, Ensemble, load_member
from tests.conftest import tiny_config
from trainables.checkpoint import make_checkpoint, save_checkpoint
from trainables.errors import InputError
from trainables.models import build_model

NAMES = ["background", "a", "b"]
RULE = {"thresholds": {"thresholds": [0.0, 0.4, 0.6], "fallback": 0, "min_area": [0, 5, 0]},
        "crf": None, "max_size": 96}


def _checkpoint(tmp: Path, name: str, seed: int, score: float, **overrides) -> Path:
    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    m = cfg["model"]
    model = build_model(m["arch"], m["encoder"], len(NAMES), weights=None, kwargs=m["kwargs"])
    return save_checkpoint(make_checkpoint(model.state_dict(), cfg, NAMES, "multiclass", "val_miou", score, 3, 0),
                           tmp / name / "model.pt")


@pytest.fixture
def members(tmp_path):
    cpu = torch.device("cpu")
    paths = [_checkpoint(tmp_path, "m0", 0, 0.4), _checkpoint(tmp_path, "m1", 1, 0.6, **{"augment.random_crop": True})]
    return [load_member(p, p.parent.name, cpu) for p in paths]


def test_bundle_records_everything_and_predicts_as_its_members(members, tmp_path):
    out = write_bundle(tmp_path / "bundle", members, tta="hflip", voting="soft", rule=RULE, metric="val_miou",
                       mode="max", source={"experiment": "x"})
    info = json.loads((out / "bundle.json").read_text())
    assert info["task"] == "multiclass" and info["class_names"] == NAMES and info["tta"] == "hflip"
    assert info["rule"] == RULE and info["mode"] == "max"
    assert [m["input"] for m in info["members"]] == ["resize", "tiles"]  # the second trained on native crops
    assert [m["image_size"] for m in info["members"]] == [[64, 96], [64, 96]]
    assert info["members"][0]["mean"] == pytest.approx([123.675, 116.28, 103.53], abs=1e-3)
    assert info["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files and "bundle.json" in files
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest

    # moved elsewhere, the source checkpoints deleted: the bundle alone predicts the same
    moved = tmp_path / "elsewhere" / "b"
    out.rename(moved.parent.mkdir(parents=True) or moved)
    for m in members:
        Path(m.meta["path"]).unlink()
    bundle = load_bundle(moved)
    assert bundle.best_member() == 1 and bundle.thresholds == {**RULE["thresholds"], "max_size": 96} and bundle.refiner() is None
    images = [np.random.default_rng(0).integers(0, 255, (130, 170, 3), dtype=np.uint8)]
    want = Ensemble(members, TTA.parse("hflip"), device="cpu").predict_batch(images)[0]
    got = bundle.ensemble("cpu").predict_batch(images)[0]
    np.testing.assert_array_equal(got, want)


def test_rewriting_replaces_and_checks_refuse_damage(members, tmp_path):
    out = write_bundle(tmp_path / "bundle", members[:1], tta="none", voting="soft", rule={"thresholds": None},
                       metric="val_miou", mode="max")
    out = write_bundle(out, members, tta="none", voting="hard", rule={"thresholds": None}, metric="val_miou",
                       mode="max")
    assert len(load_bundle(out).members) == 2 and load_bundle(out).thresholds is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "m0", "m1"]  # no temporary folder left
    member = out / json.loads((out / "bundle.json").read_text())["members"][1]["file"]
    data = member.read_bytes()
    member.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(InputError, match="damaged") as err:
        load_bundle(out)
    assert err.value.path == str(member)
    member.unlink()
    with pytest.raises(InputError, match="missing"):
        load_bundle(out)
    with pytest.raises(InputError, match="not found"):
        load_bundle(tmp_path / "nothing")
    (out / "manifest.json").write_text("{")
    with pytest.raises(InputError, match="damaged"):
        load_bundle(out)


def test_shipped_refits_read_alike_from_members_and_from_bundle_entries(members, tmp_path):
    """test_metrics.json's ``refits`` is the same list whether prediction holds loaded members
    (ensemble/infer.py) or only bundle.json's entries (ensemble/ray_predict.py)."""
    from ensemble.bundle import shipped_refits
    members[1].meta["refit"] = True
    out = write_bundle(tmp_path / "bundle", members, tta="none", voting="soft", rule={"thresholds": None},
                       metric="val_miou", mode="max")
    entries = json.loads((out / "bundle.json").read_text())["members"]
    assert "refit" not in entries[0] and entries[1]["refit"] is True
    assert shipped_refits(entries) == shipped_refits(load_bundle(out).members) == [members[1].name]
    members[1].weight = 0.0  # a dropped refit is no part of the rows
    assert shipped_refits(members) == [] and shipped_refits([{**entries[1], "weight": 0}]) == []
