"""Prediction imports no tuner, no search, and (for ``--runtime onnx``) no torch.

Fit, then apply: the prediction side (the bundle, the predictors, the rules, the outputs) may
import the bottom of ``trainables/``, the training side and itself only; the tuners, the
out-of-fold pass and the search import it, never the other way. Checked two ways: the modules a
fresh interpreter holds after importing the prediction entry points, and every import statement
(lazy ones included) of the prediction files.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREDICTION = ("bundle", "predictor", "rules", "crf_apply", "member", "voting", "onnx_runtime", "scoring", "tiling",
              "infer", "predict", "onnx_export", "ray_predict", "submission", "rle", "pseudo")
FIT = ("thresholds", "image_thresholds", "crf", "crossfit", "oof", "holdout", "combine", "selection", "latency",
       "members", "run", "compare", "report", "cam")
TORCH_FREE = ("bundle", "rules", "crf_apply", "member", "voting", "onnx_runtime", "tiling", "infer", "predict",
              "ray_predict", "submission", "rle", "pseudo")
HEAVY = ("torch", "torchvision", "timm", "segmentation_models_pytorch", "transformers", "ray", "optuna",
         "albumentations")


def _modules_after(imports: list[str]) -> list[str]:
    code = f"import json, sys\nfor m in {imports!r}:\n    __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("entry", ["ensemble.predict", "ensemble.bundle", "ensemble.predictor", "ensemble.infer"])
def test_prediction_entry_points_import_no_tuner_and_no_search(entry):
    modules = _modules_after([entry])
    fit = [m for m in modules if m in {f"ensemble.{f}" for f in FIT}]
    search = [m for m in modules if m == "tune" or m.startswith("tune.") or m.split(".")[0] in ("optuna", "ray")]
    assert fit == [] and search == [], (fit, search)


def test_prediction_modules_import_no_torch_where_the_onnx_runtime_runs():
    modules = _modules_after([f"ensemble.{name}" for name in TORCH_FREE])
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("name", PREDICTION)
def test_prediction_files_import_no_fit_module(name):
    """Not even lazily: ``tune.cluster`` (the Ray connection) is the one module of tune/ allowed."""
    path = ROOT / "ensemble" / f"{name}.py"
    bad = [(line, m) for line, m in _imports(path)
           if m in {f"ensemble.{f}" for f in FIT} or (m.startswith("tune") and m != "tune.cluster")]
    assert bad == [], f"{path.name} imports {bad}"
