"""The ensemble as a folder that predicts anywhere: ``runs/<name>/ensemble/bundle/``.

Fit, then apply: everything ``ensemble/predict.py`` needs, nothing of the experiment::

    bundle.json     members (file, fold, validation score, weight in the average, input size,
                    normalisation, whether trained on resized images or native-resolution crops,
                    data.max_size), the
                    decision rule ({"thresholds": <tuner fit or null>, "crf": <params or null>,
                    "max_size": ...}), TTA, voting, class names, task, metric/mode, package versions
    members/*.pt    each member's self-describing checkpoint (trainables/checkpoint.py), copied
    onnx/*.onnx     after ``predict.py --export onnx``
    manifest.json   sha256 of every other file

A bundle whose files do not match the manifest (damaged, incomplete, edited) is refused in one
line (:class:`trainables.errors.InputError`).

Loading with ``runtime="onnx"`` imports no torch: the members are onnxruntime sessions in a
:class:`ensemble.voting.NumpyEnsemble`, the rule is :class:`ensemble.rules.DecisionRule`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ensemble.member import TTA, Member, best_member_index, check_weights
from ensemble.onnx_runtime import OnnxModel, onnx_file
from ensemble.rules import DecisionRule
from ensemble.voting import NumpyEnsemble, Voting
from trainables.data import file_digest
from trainables.errors import InputError
from trainables.io import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = "seghpo-bundle/1"
PACKAGES = ("torch", "segmentation-models-pytorch", "timm", "transformers", "numpy", "albumentations", "onnxruntime")


def sha256(path: Path) -> str:
    return file_digest(path)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {"format": FORMAT, "files": {p.relative_to(root).as_posix(): sha256(p) for p in files}}
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def _member_entry(member, file: str) -> dict:
    cfg = member.meta.get("config") or {}
    return {"file": file, "name": member.name, "fold": member.fold, "score": member.score,
            "weight": float(member.weight), "epoch": member.meta.get("epoch"), "arch": cfg.get("model", {}).get("arch"),
            "encoder": cfg.get("model", {}).get("encoder"), "image_size": list(member.image_size),
            "input": member.input, "max_size": member.max_size, "mean": list(member.mean), "std": list(member.std),
            # a refit (ensemble/refit.py) trained on every training image: test rows say they include it
            **({"refit": True} if member.meta.get("refit") else {})}


def shipped_refits(members: list) -> list[str]:
    """Names of the refits (:mod:`ensemble.refit`, trained on every training image) that take part in
    the prediction, in order: of loaded members (``meta["refit"]``, ``weight``) or of ``bundle.json``
    entries (``"refit"``, ``"weight"``). ``test_metrics.json`` says rows (b)-(d) include these."""
    out = []
    for m in members:
        entry = m if isinstance(m, dict) else {"name": m.name, "refit": m.meta.get("refit"), "weight": m.weight}
        if entry.get("refit") and float(entry["weight"]) > 0:
            out.append(entry["name"])
    return out


def write_bundle(out: Path, members: list, *, tta: str, voting: str, rule: dict, metric: str, mode: str,
                 source: dict | None = None, data: dict | None = None) -> Path:
    """Write the bundle of ``members`` (:class:`ensemble.predictor.Member` with ``meta["path"]``,
    the checkpoint they were loaded from) to ``out``, replacing an older one only when complete.
    Each member's ``weight`` is recorded; members of weight 0 are not written. ``data``: the training data's reading options and ``has_background``."""
    members = [m for m in members if m.weight != 0]  # a member of weight 0 is no part of the prediction
    if not members:
        raise ValueError("a bundle needs at least one member")
    check_weights([m.weight for m in members])
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "members").mkdir(parents=True)
    entries = []
    for k, m in enumerate(members):
        file = f"members/{k:02d}-{m.name}.pt"
        shutil.copyfile(m.meta["path"], tmp / file)
        entries.append(_member_entry(m, file))
    info = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "task": members[0].task, "class_names": list(members[0].class_names), "tta": tta, "voting": voting,
            "metric": metric, "mode": mode,
            # how an annotated test set's unannotated pixels count, as in training (data.unannotated)
            "unannotated": ((members[0].meta.get("config") or {}).get("data") or {}).get("unannotated", "background"),
            # how the training data was read (unannotated, crowd, background, has_background): the
            # same for annotated test sets, and whether class 0 is left out of the submission
            "data": data or {},
            "rule": {"thresholds": rule.get("thresholds"), "crf": rule.get("crf"), "max_size": rule.get("max_size")},
            "members": entries, "versions": versions(), "source": source or {}}
    atomic_write_json(tmp / "bundle.json", info)
    write_manifest(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("bundle of %d members -> %s", len(members), out)
    return out


def verify(root: Path) -> dict:
    """bundle.json's content once every file matches manifest.json; InputError otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "bundle folder not found")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise InputError(root / "manifest.json", "missing: incomplete bundle (write it with ensemble/run.py)") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(root / "manifest.json", "damaged: not a bundle manifest") from None
    if manifest.get("format") != FORMAT or "bundle.json" not in files:
        raise InputError(root / "manifest.json", f"not a {FORMAT} manifest")
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise InputError(path, "missing: incomplete bundle")
        if sha256(path) != digest:
            raise InputError(path, "damaged: checksum differs from manifest.json")
    info = json.loads((root / "bundle.json").read_text())
    unlisted = [m["file"] for m in info["members"] if m["file"] not in files]
    if unlisted:
        raise InputError(root / unlisted[0], "not in manifest.json: incomplete bundle")
    here = versions()
    changed = {k: (v, here.get(k)) for k, v in info.get("versions", {}).items() if v and here.get(k) != v}
    if changed:
        logger.warning("package versions differ from the bundle's: %s",
                       ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return info


def rule_thresholds(rule: dict) -> dict | None:
    """The thresholds of a decision rule (``bundle.json``'s ``rule``: ``{"thresholds", "crf",
    "max_size"}``) as :meth:`ensemble.voting.Voting.decide` applies them: None = argmax / 0.5;
    else with the resolution their pixel areas were tuned at (the rule's ``max_size``), so the areas
    are scaled to each image's size (:func:`ensemble.rules.areas_at`). Prediction and every
    score of "what prediction applies" (the holdout) go through here."""
    if not rule.get("thresholds"):
        return None
    return {**rule["thresholds"], "max_size": rule.get("max_size")}


def rule_refiner(rule: dict, refine=None):
    """``refine(probs, image)`` of the rule's CRF (its parameters at the rule's ``max_size``), or None
    without one. ``refine(probs, image, params)``: the CRF itself (default :func:`ensemble.crf_apply.refine`)."""
    return DecisionRule.from_dict(rule).refiner(refine)


@dataclass
class Bundle:
    path: Path
    info: dict
    members: list
    runtime: str = "torch"

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def class_names(self) -> list[str]:
        return self.info["class_names"]

    @property
    def rule(self) -> DecisionRule:
        """The decision rule (thresholds, CRF and the resolution they were tuned at)."""
        return DecisionRule.from_dict(self.info["rule"])

    @property
    def thresholds(self) -> dict | None:
        """What :meth:`ensemble.voting.Voting.decide` takes (:func:`rule_thresholds`)."""
        return rule_thresholds(self.info["rule"])

    def refiner(self):
        """``refine(probs, image)`` of the kept CRF, or None (:func:`rule_refiner`)."""
        return rule_refiner(self.info["rule"])

    def best_member(self) -> int:
        """Index of the member with the best validation score (the search's mode)."""
        return best_member_index(self.members, self.info.get("mode", "max"))

    def ensemble(self, device="auto", tile=None, overlap: float = 0.5) -> Voting:
        """The members as one predictor: :class:`ensemble.predictor.Ensemble` (PyTorch) or, for the
        onnx runtime, :class:`ensemble.voting.NumpyEnsemble` (no torch)."""
        tta = TTA.parse(self.info["tta"])
        if self.runtime == "onnx":
            return NumpyEnsemble(self.members, tta, self.info["voting"], tile=tile, overlap=overlap)
        from ensemble.predictor import Ensemble  # lazy: torch, which the onnx runtime does without

        return Ensemble(self.members, tta, self.info["voting"], device, tile=tile, overlap=overlap)


def member_weight(entry: dict, root: Path) -> float:
    """A member's weight in ``bundle.json`` (1 in bundles written before weights): a number > 0."""
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise InputError(root / "bundle.json", f"member {entry.get('name')!r} has weight {weight!r}: "
                                               "expected a number > 0")
    return float(weight)


def _onnx_member(root: Path, k: int, entry: dict, info: dict, files: dict, device: str, threads: int | None
                 ) -> Member:
    path = root / onnx_file(k)
    if onnx_file(k) not in files:
        raise InputError(path, "missing: export the members first with --export onnx")
    return Member(entry["name"], entry["fold"], OnnxModel(path, device, threads), tuple(entry["image_size"]),
                  info["task"], info["class_names"], entry["score"], {"epoch": entry.get("epoch")})


def load_bundle(root: Path, device="cpu", runtime: str = "torch", threads: int | None = None) -> Bundle:
    """Verify and load a bundle; ``runtime="onnx"`` runs the members' ``onnx/*.onnx`` with
    onnxruntime (``threads`` intra-op threads each; None: its default) instead of rebuilding the
    networks, and imports no torch."""
    root = Path(root)
    info = verify(root)
    if runtime == "onnx":
        files = json.loads((root / "manifest.json").read_text())["files"]

        def make(k: int, entry: dict) -> Member:
            return _onnx_member(root, k, entry, info, files, str(device), threads)
    else:
        # lazy: torch and the networks' libraries, which the onnx runtime does without
        from ensemble.predictor import load_member

        def make(k: int, entry: dict) -> Member:
            return load_member(root / entry["file"], entry["name"], device)
    members = []
    for k, entry in enumerate(info["members"]):
        member = make(k, entry)
        member.input, member.max_size = entry["input"], entry["max_size"]
        member.mean, member.std = tuple(entry["mean"]), tuple(entry["std"])
        member.score = float("nan") if entry["score"] is None else float(entry["score"])
        member.weight = member_weight(entry, root)
        member.meta["path"] = str(root / entry["file"])
        if entry.get("refit"):
            member.meta["refit"] = True
        members.append(member)
    logger.info("bundle %s: %d members, %s, %s runtime, python %s", root, len(members), info["task"], runtime,
                sys.version.split()[0])
    return Bundle(root, info, members, runtime)
