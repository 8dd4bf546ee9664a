"""The project installs as a package (pyproject.toml; requirements.txt ends with ``-e .``) and every
script imports it as installed: no source file edits the import path, each console script and each
script run by its path (``python tune/run.py ...``) starts, and no module of a script's folder (which
Python puts first on the path, and Ray passes on to its workers) hides a module of the same name."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from tune.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# what a user runs by its path; its folder comes first on sys.path
SCRIPT_FILES = ["tune/plan.py", "tune/run.py", "tune/report.py", "tune/compare.py", "tune/sweep_agent.py", "tune/commands.py",
                "ensemble/run.py", "ensemble/predict.py", "trainables/train.py", "bench/run.py",
                "data/make_camvid_sample.py"]
SKIP_DIRS = {".git", "runs", "build", "dist", "__pycache__", ".venv", "venv"}


def source_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def path_edits(source: str) -> list[int]:
    """Line numbers that touch ``sys.path`` (assign, insert, append, ...) or call ``site.addsitedir``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in {("sys", "path"), ("site", "addsitedir")}:
                lines.append(node.lineno)
    return sorted(lines)


def test_path_edit_detector_sees_the_usual_forms():
    src = "import sys\nsys.path.insert(0, 'x')\nsys.path[0] = 'y'\nimport site\nsite.addsitedir('z')\nx = 'sys.path'\n"
    assert path_edits(src) == [2, 3, 5]


def test_no_source_file_edits_sys_path():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in source_files() for n in path_edits(p.read_text())]
    assert not offenders, f"import the installed package instead of editing sys.path: {offenders}"


def test_pyproject_names_what_requirements_pins():
    """requirements.txt pins the versions, pyproject.toml declares the same packages (names only)."""
    def name(req: str) -> str:
        return re.split(r"[\[=<>!~; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [line for line in lines if line and not line.startswith("#")]
    assert reqs[-1] == "-e .", "requirements.txt must end by installing the project (-e .)"
    pinned = {name(r) for r in reqs[:-1]} - {"pytest"}
    declared = {name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert pinned == declared, f"only pinned: {sorted(pinned - declared)}, only declared: {sorted(declared - pinned)}"


def test_the_installed_package_is_this_checkout():
    try:
        dist = distribution(PYPROJECT["project"]["name"])
    except PackageNotFoundError:
        pytest.fail("the project is not installed: pip install -r requirements.txt (or pip install -e .)")
    import ensemble
    import trainables
    import tune

    for pkg in (tune, trainables, ensemble):
        assert Path(pkg.__file__).resolve().parent.parent == REPO, pkg.__file__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == SCRIPTS, "reinstall (pip install -e .): the installed entry points are stale"


def _run(cmd: list[str], cwd: Path) -> tuple[list[str], int, str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    return cmd, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_console_scripts_and_scripts_start(tmp_path):
    """``--help`` of every console script (and of each ``seghpo`` subcommand), and of every script run
    by its path, from outside the checkout."""
    missing = [s for s in SCRIPTS if shutil.which(s) is None]
    assert not missing, f"console scripts not installed: {missing} (pip install -e .)"
    cmds = [[shutil.which(s), "--help"] for s in SCRIPTS]
    cmds += [[shutil.which("seghpo"), name, "--help"] for name in COMMANDS]
    cmds += [[sys.executable, str(REPO / f), "--help"] for f in SCRIPT_FILES]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: _run(c, tmp_path), cmds))
    failed = [f"{' '.join(c)} -> {rc}: {out.strip().splitlines()[-1:] }" for c, rc, out in results
              if rc != 0 or "usage:" not in out]
    assert not failed, "\n".join(failed)
    assert SCRIPTS["seghpo"] == "tune.commands:main"


def test_no_script_folder_module_hides_another_module(tmp_path):
    """A script's folder is first on sys.path (and Ray puts the driver script's folder on its workers'
    paths), so e.g. tune/report.py must not share a name with a stdlib or installed top-level module."""
    folders = sorted({Path(f).parent.as_posix() for f in SCRIPT_FILES})
    names = sorted({p.stem for d in folders for p in (REPO / d).glob("*.py") if p.stem != "__init__"})
    # modules the interpreter loads before it reads the script's folder (trainables/io.py vs io) are safe
    probe = ("import sys, importlib.util\n"
             f"names = {names!r}\n"
             "loaded = set(sys.modules)\n"
             "for n in names:\n"
             "    if n in loaded: continue\n"
             "    if n in sys.stdlib_module_names or importlib.util.find_spec(n) is not None: print(n)\n")
    _, rc, out = _run([sys.executable, "-I", "-c", probe], tmp_path)
    assert rc == 0, out
    assert not out.split(), f"script-folder modules hiding a module of the same name: {out.split()}"
