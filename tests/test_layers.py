"""The stages import one way, read from the code (AST), as nnU-Net v2 keeps training from importing
inference.

Layers, bottom up (``LAYERS``):

* **base**: errors, io, the run-files format, CLI plumbing, row labels, device and AMP resolution;
* **train**: the rest of ``trainables/`` (data, folds, model, loss, loop, metrics; no Ray);
* **cluster**: the Ray connection (``tune/cluster.py``), which both the search and Ray prediction use;
* **search**: the space, per-fold Optuna + ASHA, the Ray Tune experiment;
* **predict**: the deployable side: bundle, predictor, the rules it applies, tiling, submission,
  ONNX, Ray Data;
* **fit**: members, out-of-fold, the tuners, cross-fitting, holdout, combination;
* **report**: reads ``runs/``: HTML report, sweep comparison;
* **entry**: the command-line entry points, which call the stages and then the report.

``MAY_IMPORT`` says which layers each may import. Three more rules: no two files import each other
through any path (a file cycle), a project import inside a function states why on its line or the
line above (``# lazy: <reason>``: start-up time, an optional dependency), and every module has a
layer. Each rule is checked on a planted violation too, so a rule that cannot fail is caught.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainables", "tune", "ensemble")

BASE = {"trainables/errors.py", "trainables/io.py", "trainables/runfiles.py", "trainables/cli.py",
        "trainables/rows.py", "trainables/device.py"}
LAYERS = {
    "base": BASE,
    "train": {"trainables/*"},
    "cluster": {"tune/cluster.py"},
    "search": {"tune/*"},
    "predict": {"ensemble/bundle.py", "ensemble/member.py", "ensemble/voting.py", "ensemble/predictor.py",
                "ensemble/onnx_runtime.py", "ensemble/rules.py", "ensemble/crf_apply.py", "ensemble/tiling.py",
                "ensemble/infer.py", "ensemble/scoring.py", "ensemble/predict.py", "ensemble/onnx_export.py",
                "ensemble/ray_predict.py", "ensemble/submission.py", "ensemble/rle.py", "ensemble/pseudo.py"},
    "fit": {"ensemble/*"},
    "report": {"tune/report.py", "tune/report_ensemble.py", "tune/report_html.py", "tune/report_crossfold.py",
               "tune/compare.py", "tune/wandb_runs.py", "ensemble/report.py"},
    "entry": {"tune/run.py", "ensemble/run.py", "tune/commands.py", "tune/sweep_agent.py", "trainables/train.py"},
}
MAY_IMPORT = {
    "base": {"base"},
    "train": {"base", "train"},
    "cluster": set(),
    "search": {"base", "train", "cluster", "search"},
    "predict": {"base", "train", "cluster", "predict"},
    "fit": {"base", "train", "predict", "fit"},
    "report": {"base", "train", "report"},  # train: the images an overlay shows
    "entry": set(LAYERS),
}
# what a layer's modules may import beyond MAY_IMPORT, each with its reason
EXCEPTIONS: dict[tuple[str, str], str] = {}
LAZY = re.compile(r"#\s*lazy:\s*\S")


def layer_of(path: str) -> str | None:
    """Exact names win over a package's ``*``; ``entry`` over everything."""
    for name in ("entry", "base", "cluster", "report", "predict"):
        if path in LAYERS[name]:
            return name
    for name in ("train", "search", "fit"):
        if f"{path.split('/')[0]}/*" in LAYERS[name]:
            return name
    return None


def module_file(root: Path, module: str) -> str | None:
    """``tune.cluster`` -> ``tune/cluster.py`` when that file exists under ``root``."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    for n in range(len(parts), 1, -1):
        rel = "/".join(parts[:n]) + ".py"
        if (root / rel).is_file():
            return rel
    return None


def imports(root: Path, rel: str) -> list[tuple[str, int, bool]]:
    """(imported project file, line, inside a function) for every import in ``rel``;
    ``from tune import cluster`` counts as an import of ``tune/cluster.py``."""
    tree = ast.parse((root / rel).read_text(), rel)
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                targets = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            else:
                visit(child, inner)
                continue
            files = {f for f in (module_file(root, t) for t in targets) if f and f != rel}
            out.extend((f, child.lineno, in_function) for f in sorted(files))

    visit(tree, False)
    return out


def sources(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for pkg in PACKAGES for p in (root / pkg).glob("*.py")
                  if p.name != "__init__.py")


def upward_imports(root: Path) -> list[str]:
    found = []
    for rel in sources(root):
        mine = layer_of(rel)
        for target, line, _ in imports(root, rel):
            theirs = layer_of(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine] and (rel, target) not in EXCEPTIONS:
                found.append(f"{rel}:{line}: {mine} imports {theirs} ({target})")
    return found


def unplaced(root: Path) -> list[str]:
    return [rel for rel in sources(root) if layer_of(rel) is None]


def file_cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of two or more files (Tarjan), imports inside functions included."""
    graph = {rel: sorted({t for t, _, _ in imports(root, rel)}) for rel in sources(root)}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def _says_why(lines: list[str], line: int) -> bool:
    """``# lazy: ...`` on the import's line, or on the line above the run of import lines it ends."""
    if LAZY.search(lines[line - 1]):
        return True
    i = line - 2
    while i >= 0 and lines[i].lstrip().startswith(("from ", "import ")):
        if LAZY.search(lines[i]):
            return True
        i -= 1
    return i >= 0 and bool(LAZY.search(lines[i]))


def unexplained_lazy_imports(root: Path) -> list[str]:
    found = []
    for rel in sources(root):
        lines = (root / rel).read_text().splitlines()
        for _, line, in_function in imports(root, rel):
            if in_function and not _says_why(lines, line):
                found.append(f"{rel}:{line}: {lines[line - 1].strip()}")
    return sorted(set(found))


def test_every_module_has_a_layer():
    assert not unplaced(ROOT), "give these a layer in tests/test_layers.py: " + ", ".join(unplaced(ROOT))


def test_no_upward_import():
    assert not upward_imports(ROOT), "\n".join(upward_imports(ROOT))


def test_no_file_cycle():
    assert not file_cycles(ROOT), file_cycles(ROOT)


def test_a_project_import_inside_a_function_says_why():
    found = unexplained_lazy_imports(ROOT)
    assert not found, "move to the top, or say why on the line (# lazy: start-up time / optional ...):\n" + \
        "\n".join(found)


def _copy(tmp: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def _plant(root: Path, rel: str, line: str, where: str = "top") -> None:
    path = root / rel
    text = path.read_text()
    if where == "top":
        head, sep, rest = text.partition("from __future__ import annotations\n")
        path.write_text(head + sep + line + "\n" + rest)
    else:
        path.write_text(text + f"\n\ndef _planted():\n    {line}\n")


def test_the_rules_catch_planted_violations(tmp_path):
    """Each check fails on a violation planted into a copy of the code."""
    root = _copy(tmp_path)
    assert not upward_imports(root) and not file_cycles(root) and not unexplained_lazy_imports(root)
    _plant(root, "ensemble/predictor.py", "from ensemble.oof import oof_evaluate")  # prediction -> fit
    _plant(root, "trainables/loop.py", "import tune.search")  # training -> search
    _plant(root, "tune/report.py", "from ensemble.members import top_k")  # report -> fit
    _plant(root, "trainables/io.py", "from trainables.cli import parse_sets")  # base -> base, fine
    up = upward_imports(root)
    assert any(u.startswith("ensemble/predictor.py:") and "predict imports fit" in u for u in up), up
    assert any(u.startswith("trainables/loop.py:") and "train imports search" in u for u in up), up
    assert any(u.startswith("tune/report.py:") and "report imports fit" in u for u in up), up
    assert not any(u.startswith("trainables/io.py:") for u in up)
    # a cycle: trainables/cli.py imports trainables/io.py? plant the way back
    _plant(root, "trainables/errors.py", "from trainables.rows import ROWS")
    _plant(root, "trainables/rows.py", "from trainables.errors import ConfigError")
    assert ["trainables/errors.py", "trainables/rows.py"] in file_cycles(root)
    _plant(root, "trainables/metrics.py", "from trainables.io import atomic_path", where="function")
    assert any(u.startswith("trainables/metrics.py:") for u in unexplained_lazy_imports(root))
    _plant(root, "trainables/metrics.py", "from trainables.io import atomic_write_json  # lazy: start-up time",
           where="function")
    assert sum(u.startswith("trainables/metrics.py:") for u in unexplained_lazy_imports(root)) == 1
    (root / "ensemble" / "newcomer.py").write_text("x = 1\n")
    assert unplaced(root) == []  # ensemble/* is fit by default
    (root / "trainables" / "newcomer.py").write_text("import ensemble.predictor\n")
    assert any(u.startswith("trainables/newcomer.py:") for u in upward_imports(root))


def test_prediction_loads_no_tuner_search_or_ray():
    """In a fresh interpreter: the deployable side imports no tuner, no search module and no Ray."""
    code = ("import sys\nimport ensemble.predict, ensemble.bundle, ensemble.predictor, ensemble.infer, "
            "ensemble.submission\n"
            "bad = sorted(m for m in sys.modules if m in ('ray', 'optuna') or m.startswith('tune.') and m != "
            "'tune.cluster' or m in ('ensemble.thresholds', 'ensemble.image_thresholds', 'ensemble.oof', "
            "'ensemble.crossfit', 'ensemble.members', 'ensemble.selection', 'ensemble.holdout'))\n"
            "print(bad)\nassert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_package_lists_its_modules():
    """Each package's ``__init__`` docstring is its map: every module is named there."""
    missing = []
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text())) or ""
        named = set(re.findall(r"\b(\w+)\b", doc))
        missing += [f"{pkg}/{p.name}" for p in sorted((ROOT / pkg).glob("*.py"))
                    if p.name != "__init__.py" and p.stem not in named]
    assert not missing, "name these in their package's __init__.py: " + ", ".join(missing)
