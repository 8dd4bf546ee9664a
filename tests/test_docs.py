"""The docs are true to the code: every command in a fenced block of README.md, docs/**/*.md and
bench/README.md names a script that exists and passes its argument parser, every relative link and
every project file a page names in backticks exists, and docs/reference/cli.md is what
``python -m tune.cli_doc`` generates.

Commands are parsed, never run: placeholders (``<name>``, ``...``) become ``0`` and the files an
option names are checked by the command when it runs. Commands that are not this project's (pip,
ray, git, wandb, ...) are checked only for the project files they name (cluster.yaml,
requirements.txt, search_spaces/*.yaml).

The README's two fresh-machine commands run for real elsewhere: ``.ci/run`` runs the test command
(``python -m pytest -q`` after ``pip install -r requirements.txt``), and
tests/tune/test_debug.py::test_search_and_ensemble_debug_on_the_shipped_sample runs ``tune/run.py
--space segformer.yaml`` on the shipped sample (with ``--debug``) and then ``ensemble/run.py`` on
the experiment it writes.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from trainables import config
from trainables.cli import parse_sets
from tune import cli_doc

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")])
SHELL_FENCES = {"bash", "sh", "shell", "console"}  # untagged and ```text blocks are not commands
README_COMMANDS = [
    "pip install -r requirements.txt && python tune/run.py --space segformer.yaml "
    "&& python ensemble/run.py --experiment runs/segformer-demo",
    "pip install -r requirements.txt && python -m pytest -q",
]
SCRIPTS = {  # installed console scripts (pyproject.toml [project.scripts]) -> module
    "seghpo-tune": "tune.run", "seghpo-ensemble": "ensemble.run", "seghpo-train": "trainables.train",
    "seghpo-predict": "ensemble.predict",
}
PYTHON = {"python", "python3"}
SEPARATORS = {"&&", "||", ";", "|"}


def tracked_top_level() -> set[str]:
    """The repository's top-level files and folders (git's view: runs/ and caches are not)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
    return {line.split("/")[0] for line in files.splitlines() if line}


TOP = tracked_top_level()


FENCE = re.compile(r"^[ \t]*```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)


def fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def commands(line: str) -> list[list[str]]:
    """A line's simple commands as token lists, placeholders replaced by ``0``, environment
    assignments in front dropped."""
    line = re.sub(r"<[^<>\n]*>", "0", line)
    tokens = ["0" if t == "..." else t for t in shlex.split(line, comments=True)]
    out, current = [], []
    for token in tokens + [";"]:
        if token in SEPARATORS:
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current = current[1:]
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens) of every command in every page's shell blocks."""
    found = []
    for page in PAGES:
        for lang, body in fences(page.read_text()):
            if lang in SHELL_FENCES:
                for line in shell_lines(body):
                    found += [(f"{page.relative_to(ROOT)}: {line}", c) for c in commands(line)]
    return found


def project_command(tokens: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(command or module, script path, arguments) of a command that runs this project's code, or
    (None, None, []): a command of ``cli_doc.COMMANDS`` as named there (``seghpo <command>`` once listed),
    ``python <path>.py``, ``python -m <module>``, an installed ``seghpo-*`` script, or any of them
    after a ``--`` (``ray job submit ... -- python tune/run.py ...``)."""
    if "--" in tokens and tokens[0] not in PYTHON | set(SCRIPTS) | {"seghpo"}:
        return project_command(tokens[tokens.index("--") + 1:])
    for name, module, _ in sorted(cli_doc.COMMANDS, key=lambda c: -len(c[0].split())):
        words = name.split()
        if tokens[:len(words)] == words:
            return name, module.replace(".", "/") + ".py", tokens[len(words):]
    if tokens[0] == "seghpo":  # a seghpo command not (yet) in cli_doc.COMMANDS
        return "seghpo " + (tokens[1] if len(tokens) > 1 else ""), "(not in tune/cli_doc.py COMMANDS)", tokens[2:]
    if tokens[0] in SCRIPTS:
        return SCRIPTS[tokens[0]], SCRIPTS[tokens[0]].replace(".", "/") + ".py", tokens[1:]
    if tokens[0] in PYTHON and len(tokens) > 1:
        if tokens[1].endswith(".py"):
            return tokens[1][:-3].replace("/", "."), tokens[1], tokens[2:]
        if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] in TOP:
            module = tokens[2]
            return module, module.replace(".", "/") + ".py", tokens[3:]
    return None, None, []


def project_files(tokens: list[str]) -> list[str]:
    """Relative paths in a command that lie in a tracked top-level folder or are a tracked
    top-level file (``cluster.yaml``, ``requirements.txt``, ``search_spaces/smp.yaml``)."""
    paths = []
    for token in tokens:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if any(c in value for c in "*{}$[]'\"") or value.startswith(("/", "~", "-")):
            continue
        first = value.split("/")[0]
        if (first in TOP and "/" in value.rstrip("/")) or (value in TOP and "." in value):
            paths.append(value)
    return paths


ALL = doc_commands()


def test_the_docs_have_commands_and_project_commands():
    assert len(ALL) > 30
    assert sum(project_command(tokens)[0] is not None for _, tokens in ALL) > 20


@pytest.mark.parametrize("where,tokens", ALL, ids=[w[:90] for w, _ in ALL])
def test_command_exists_and_its_parser_accepts_it(where, tokens):
    for path in project_files(tokens):
        assert (ROOT / path).exists(), f"{where}: {path} does not exist"
    key, script, args = project_command(tokens)
    if key is None:
        return
    assert (ROOT / script).is_file(), f"{where}: no {script}"
    names = {name for name, _, _ in cli_doc.COMMANDS}
    command = key if key in names else cli_doc.modules().get(key)
    if command is None:  # a script without an entry in COMMANDS (bench/<name>.py, data/...): exists
        return
    if "-h" in args or "--help" in args:
        return
    parser = cli_doc.parser_of(command)
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: {command} refuses {shlex.join(args)} (exit {exc.code}; the error is above)")
    unknown = set(parse_sets(getattr(parsed, "set", None) or [])) - set(config.known_keys())
    assert not unknown, f"{where}: --set of settings that do not exist: {sorted(unknown)}"


def test_a_wrong_option_is_caught():
    name = cli_doc.modules()["tune.run"]
    _, tokens = next((w, t) for w, t in ALL if project_command(t)[0] in (name, "tune.run"))
    parser = cli_doc.parser_of(name)
    with pytest.raises(SystemExit):
        parser.parse_args(project_command(tokens)[2] + ["--no-such-option"])


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`([\w.-]+/[\w./-]*\.(?:py|ya?ml|md|txt|json|toml|cfg))`")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_and_named_files_exist(page):
    text = page.read_text()
    prose = FENCE.sub("", text)
    missing = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(f"link {target}")
    for path in CODE_PATH.findall(prose):
        if path.split("/")[0] in TOP and not (ROOT / path).exists():
            missing.append(f"`{path}`")
    assert not missing, f"{page.relative_to(ROOT)}: {missing}"


def test_readme_keeps_the_two_fresh_machine_commands_and_its_size():
    text = (ROOT / "README.md").read_text()
    blocks = [body.strip() for lang, body in fences(text) if lang in SHELL_FENCES]
    for command in README_COMMANDS:
        assert command in blocks, command
    assert "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert len(text.splitlines()) <= 200


def test_cli_reference_is_current():
    assert cli_doc.DOC.read_text() == cli_doc.page(), "docs/reference/cli.md is not current: run python -m tune.cli_doc"


def test_stale_cli_reference_is_detected(tmp_path, monkeypatch):
    doc = tmp_path / "cli.md"
    doc.write_text(cli_doc.DOC.read_text().replace("--max-failures", "--max-fails"))
    monkeypatch.setattr(cli_doc, "DOC", doc)
    with pytest.raises(SystemExit, match="not current"):
        cli_doc.main(["--check"])
    cli_doc.main(["--write"])
    cli_doc.main(["--check"])
