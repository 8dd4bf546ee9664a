"""The command line: ``seghpo`` and its subcommands, the flag groups several commands share
(declared once in trainables/cli.py), and the layers the report sits on (the search and the
ensemble's fit-side steps never import the report; the CLIs call it after them)."""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.cli import MODES, SET_HELP, WANDB_DEFAULT, add_set_flag, parse_sets

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["plan", "tune", "ensemble", "predict", "train", "report", "compare"]
# the script each subcommand also runs as (python <path> --help)
SCRIPTS = {"plan": "tune/plan.py", "tune": "tune/run.py", "ensemble": "ensemble/run.py", "predict": "ensemble/predict.py",
           "train": "trainables/train.py", "report": "tune/report.py", "compare": "tune/compare.py"}


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_seghpo_help_lists_every_subcommand_without_torch_or_ray():
    code = ("import sys\n"
            "from tune.commands import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'wandb', 'optuna') if m in sys.modules)\n"
            "print('loaded:', heavy)\n")
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "loaded: []" in out, out
    from tune.commands import COMMANDS

    assert list(COMMANDS) == SUBCOMMANDS
    lines = out.splitlines()
    for name, (_, summary) in COMMANDS.items():  # one line each
        assert any(line.split() == [name, *summary.split()] for line in lines), (name, out)


@pytest.mark.parametrize("name", ["tune", "ensemble", "predict", "report", "compare"])
def test_a_subcommands_help_starts_without_torch_or_ray(name):
    """``seghpo <command> --help`` answers at once: its module imports the heavy work where it runs
    (``train`` is the training loop itself and needs torch)."""
    code = ("import sys\n"
            "from tune.commands import main\n"
            "try:\n"
            f"    main([{name!r}, '--help'])\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            "print('loaded:', sorted(m for m in ('torch', 'ray') if m in sys.modules))\n")
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded: []" in proc.stdout, proc.stdout[-500:]


def test_python_m_tune_commands_is_seghpo():
    proc = _python("-m", "tune.commands", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: seghpo"), proc.stderr[-2000:]
    proc = _python("-m", "tune.commands", "no-such-command")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_shows_its_flags_as_its_script_does(name):
    """``seghpo X --help`` and ``python <script> --help``: the same flags (the script's usage line,
    under another program name)."""
    via_seghpo = _python("-m", "tune.commands", name, "--help")
    via_script = _python(SCRIPTS[name], "--help")
    assert via_seghpo.returncode == 0, via_seghpo.stderr[-2000:]
    assert via_script.returncode == 0, via_script.stderr[-2000:]
    assert via_seghpo.stdout.startswith(f"usage: seghpo {name} ")

    def flags(text: str) -> set[str]:
        return {w.strip("[],") for w in text.split() if w.startswith(("--", "[--"))}

    assert flags(via_seghpo.stdout) == flags(via_script.stdout) and flags(via_script.stdout)


def test_subcommand_runs_its_module_and_user_errors_are_one_line(tmp_path):
    """``seghpo report`` on a folder that is no experiment: the module's run(args), the one-line error."""
    proc = _python("-m", "tune.commands", "report", "--experiment", str(tmp_path / "missing"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------- shared flag groups


def _parsers() -> dict[str, argparse.ArgumentParser]:
    import tune.compare
    import tune.report
    import tune.run
    import tune.sweep_agent
    from ensemble import run as ensemble_run
    from trainables import train

    return {"tune/run.py": tune.run.build_parser(), "ensemble/run.py": ensemble_run.build_parser(),
            "trainables/train.py": train.build_parser(), "tune/report.py": tune.report.build_parser(),
            "tune/compare.py": tune.compare.build_parser(), "tune/sweep_agent.py": tune.sweep_agent.build_parser()}


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_shared_flags_are_the_same_in_every_parser_that_has_them():
    parsers = _parsers()
    expected = {"--wandb": {"tune/run.py", "ensemble/run.py", "tune/compare.py"},
                "--wandb-project": {"tune/run.py", "ensemble/run.py", "tune/compare.py"},
                "--set": {"tune/run.py", "trainables/train.py", "tune/sweep_agent.py"},
                "--debug": {"tune/run.py", "ensemble/run.py", "trainables/train.py"},
                "--address": {"tune/run.py", "ensemble/run.py"},
                "--cpus-per-actor": {"ensemble/run.py"}}
    for flag, names in expected.items():
        assert {n for n, p in parsers.items() if _option(p, flag)} == names, flag
    for name in expected["--wandb"]:
        wandb = _option(parsers[name], "--wandb")
        assert tuple(wandb.choices) == MODES and wandb.default is None, name  # None: default_mode() decides
        assert wandb.help.endswith(f"[{WANDB_DEFAULT}]"), name
        assert _option(parsers[name], "--wandb-project").default == "segmentation-hpo"
    for name in expected["--set"]:
        option = _option(parsers[name], "--set")
        assert option.help == SET_HELP and option.default == [] and option.nargs == "*", name
    for name in expected["--debug"]:
        assert _option(parsers[name], "--debug").default is False
    actors = parsers["ensemble/run.py"]
    assert [_option(actors, f).default for f in ("--ray", "--actors", "--cpus-per-actor", "--gpus-per-actor")] == \
        [False, None, 1.0, 0.0]


def test_set_is_repeatable():
    p = argparse.ArgumentParser()
    add_set_flag(p)
    args = p.parse_args(["--set", "train.epochs=3", "data.max_size=96", "--set", "train.lr=1e-4"])
    assert parse_sets(args.set) == {"train.epochs": 3, "data.max_size": 96, "train.lr": 1e-4}
    assert p.parse_args([]).set == []
    from tune.run import parse_args

    assert parse_args(["--space", "s.yaml", "--set", "a.b=1", "--set", "c.d=2"]).set == ["a.b=1", "c.d=2"]


def test_actor_flags_need_ray_in_the_ensemble_step():
    from ensemble.run import parse_args
    from trainables.cli import ray_actor_args
    from trainables.errors import ConfigError

    with pytest.raises(ConfigError, match="need --ray or --address"):
        ray_actor_args(parse_args(["--experiment", "x", "--actors", "2"]))
    assert ray_actor_args(parse_args(["--experiment", "x", "--address", "auto", "--actors", "2"])).on_ray


# the shared flags may be declared only in trainables/cli.py
SHARED_FLAGS = {"--wandb", "--wandb-project", "--set", "--debug", "--address", "--ray", "--actors",
                "--cpus-per-actor", "--gpus-per-actor"}


def _declared_flags(path: Path) -> set[str]:
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return flags


def test_shared_flags_are_declared_once():
    offenders = {}
    for path in sorted(ROOT.glob("*/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] not in ("tune", "ensemble", "trainables", "bench") or rel == "trainables/cli.py":
            continue
        again = _declared_flags(path) & SHARED_FLAGS
        if again:
            offenders[rel] = sorted(again)
    assert not offenders, f"declare these with trainables/cli.py's add_..._flags: {offenders}"


# --------------------------------------------------------------------------- who writes the report

REPORT = {"tune.report", "tune.report_ensemble", "tune.report_html", "tune.report_crossfold", "tune.compare",
          "tune.wandb_runs", "ensemble.report"}
ENTRY_POINTS = {"tune.run", "ensemble.run", "tune.commands", "tune.sweep_agent"}
PREDICTION = {f"ensemble.{m}" for m in ("bundle", "predictor", "tiling", "infer", "predict", "onnx_export",
                                        "ray_predict", "submission", "rle", "pseudo")}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in ("trainables", "tune", "ensemble")}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).glob("*.py") if p.stem != "__init__")


def test_the_search_and_the_fit_steps_do_not_import_the_report():
    search = [p for p in _modules("tune") if _module(p) not in REPORT | ENTRY_POINTS]
    fit = [p for p in _modules("ensemble") if _module(p) not in REPORT | ENTRY_POINTS | PREDICTION]
    assert any(_module(p) == "tune.search" for p in search) and any(_module(p) == "ensemble.steps" for p in fit)
    offenders = {_module(p): sorted(_imports(p) & REPORT) for p in search + fit if _imports(p) & REPORT}
    assert not offenders, f"the report is written by the CLIs (tune/run.py, ensemble/run.py): {offenders}"
    search_modules = {_module(p) for p in search} - {"tune.cluster"}  # the Ray connection: prediction uses it too
    offenders = {_module(p): sorted(_imports(p) & search_modules) for p in fit if _imports(p) & search_modules}
    assert not offenders, f"the ensemble's fit side imports the search: {offenders}"


def test_the_clis_write_the_report_after_their_steps():
    assert "tune.report" in _imports(ROOT / "tune/run.py")
    assert {"ensemble.report", "tune.report", "ensemble.steps"} <= _imports(ROOT / "ensemble/run.py")
