"""Plan a search from a dataset alone: the fixed half of a space decided from the dataset's
fingerprint and measured memory and step time; the searched half from a base space.

    seghpo plan --data path/to/annotations.json --out my.yaml          # then: seghpo tune --space my.yaml
    python tune/plan.py --data masks_folder/ --space segformer --time-budget 2h --gpus 1 --out my.yaml

Each decision is printed and written into the space with its reason as a comment: the working
size (data.max_size) and resize or native-resolution crops (augment.random_crop), train.image_size,
the batch size, epochs, trials per fold and concurrency from --time-budget, the fold strategy and
k, AMP and channels_last, loader workers. The fingerprint and the measurements go to a JSON file
beside the space (<out>.fingerprint.json). The search settings the plan fixes (the batch size,
say) leave the searched half. Measuring runs a few training steps of the base space's largest
model at candidate sizes: seconds on a GPU, a minute or more on a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import textwrap
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]

from trainables.cli import command_parser, exit_on_user_error, parse_duration  # noqa: E402
from trainables.config import DEFAULTS  # noqa: E402
from trainables.errors import ConfigError, InputError  # noqa: E402
from trainables.io import atomic_write_json, atomic_write_text  # noqa: E402
from tune.measure import Machine, Measurement  # noqa: E402
from tune.plan_decisions import (Folds, Meter, Plan, choose_batch, choose_epochs_and_trials,  # noqa: E402
                                 choose_folds, choose_input_size, choose_working_size, data_settings,
                                 machine_settings, plan_resize, validation_windows, weigh_crops)
from tune.plan_decisions import Decision, asha_rungs, candidate_sides, expected_epochs, input_size  # noqa: E402, F401
from tune.space import SearchSpec, load_space, model_pairs  # noqa: E402

DEFAULT_BUDGET = "8h"


# ---------------------------------------------------------------- the plan: tune/plan_decisions.py's steps in order
# (Decision, Plan and the arithmetic are imported above so that ``tune.plan`` still names them)


def plan_space(fp: dict, base: SearchSpec, machine: Machine, measure: Callable[[tuple[int, int], int], Measurement],
               budget_s: float, budget_text: str, model: tuple[str, str], log: Callable[[str], None] = print) -> Plan:
    """Every decision of the fixed half, from the fingerprint ``fp`` and ``measure(size, batch)``, in
    order: folds, input size, working size, batch, epochs and trials (crops that those epochs would
    cover too little: resize, and the epochs and trials again), the machine, the data."""
    plan = Plan()
    meter = Meter(plan, measure, model, log)
    folds = Folds.of(choose_folds(plan, fp), fp["images"], base)
    fit = choose_input_size(plan, fp, folds, machine, meter, budget_s)
    choose_working_size(plan, fp, fit)
    batch, m_batch = choose_batch(plan, meter, fit, folds.n_train)
    before = (list(plan.decisions), list(plan.notes))
    choose_epochs_and_trials(plan, base, folds, fit.concurrent, batch, m_batch, budget_s, budget_text,
                             val_windows=validation_windows(plan, fp))
    why = weigh_crops(plan, fp, fit)
    if why:  # crops the budget cannot train: whole images, their epochs and trials planned again
        plan.decisions, plan.notes = before
        plan_resize(plan, fp, fit, why)
        choose_epochs_and_trials(plan, base, folds, fit.concurrent, batch, m_batch, budget_s, budget_text)
    machine_settings(plan, machine, fit.concurrent, m_batch)
    data_settings(plan, fp, base)
    return plan


# ---------------------------------------------------------------- the largest model


def largest_model(spec: SearchSpec, num_classes: int) -> tuple[str, str]:
    """The (arch, encoder) of the space with the most parameters (random init: nothing downloaded)."""
    from trainables.models import build_model  # lazy: start-up time (--help without torch)

    base = spec.base_config()["model"]
    best, most = None, -1
    for arch, encoder in sorted(model_pairs(spec.space, base)):
        n = sum(p.numel() for p in build_model(arch, encoder, num_classes, weights=None,
                                               kwargs=base["kwargs"]).parameters())
        if n > most:
            best, most = (arch, encoder), n
    return best


# ---------------------------------------------------------------- writing the space


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 100 - len(indent) - 2)]


def space_yaml(plan: Plan, base: SearchSpec, raw_base: dict, fp: dict, data: dict, machine: Machine,
               fingerprint_file: str) -> str:
    """The planned space: the base's fixed settings updated by the decisions, the base's searched
    parameters less the ones the plan fixes, every decision with its reason as a comment."""
    decided = {d.key for d in plan.decisions}
    space = {k: v for k, v in (raw_base.get("space") or {}).items() if k not in decided}
    dropped = [k for k in (raw_base.get("space") or {}) if k in decided]
    lines = [f"# Planned by `seghpo plan` on {datetime.date.today().isoformat()} from {fp['source']}",
             f"# ({fp['images']} images, median {fp['size']['median'][0]}x{fp['size']['median'][1]}, "
             f"{'grayscale' if fp['channels'] == 1 else 'RGB'}, {fp['task']}, {len(fp['classes'])} classes) and "
             f"{base.source.name}'s searched half;",
             f"# measured on {machine.describe()}. Fingerprint and measurements: {fingerprint_file}"]
    lines += [f"# {note}" for note in plan.notes]
    if dropped:
        lines.append(f"# fixed by the plan, no longer searched: {', '.join(dropped)}")
    lines += [f"name: {base.name}-plan", "fixed:"]
    fixed: dict[str, Any] = {f"{s}.{k}": v for s, values in base.fixed.items() for k, v in values.items()}
    fixed.update({f"data.{k}": v for k, v in data.items() if v is not None})
    reasons = {d.key: d.reason for d in plan.decisions}
    fixed.update({d.key: d.value for d in plan.decisions if d.key.partition(".")[0] in DEFAULTS})
    for key in sorted(fixed, key=lambda k: (list(DEFAULTS).index(k.partition(".")[0]), k)):
        if key in reasons:
            lines += _comment(reasons[key], "  ")
        lines.append(f"  {key}: {_flow(fixed[key])}")
    for section in ("search", "resources"):
        lines.append(f"{section}:")
        values = {**(base.search if section == "search" else base.resources)}
        values.update({d.key.partition(".")[2]: d.value for d in plan.decisions if d.key.startswith(section + ".")})
        for key, value in values.items():
            if f"{section}.{key}" in reasons:
                lines += _comment(reasons[f"{section}.{key}"], "  ")
            lines.append(f"  {key}: {_flow(value)}")
    lines.append("space:")
    body = yaml.safe_dump(space, sort_keys=False, default_flow_style=None, width=100)
    lines += ["  " + line for line in body.splitlines()] if space else ["  {}"]
    if not space:
        lines[-2:] = ["space: {}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="COCO json or image/mask folder")
    p.add_argument("--images", help="image root of a COCO json (default: <json dir>/images)")
    p.add_argument("--task", choices=["multiclass", "multilabel"], help="[the base space's data.task]")
    p.add_argument("--space", default="smp.yaml", help="base space whose searched half is kept: search_spaces/<name>"
                                                       ".yaml, a name, or a path [smp.yaml]")
    p.add_argument("--time-budget", default=DEFAULT_BUDGET, metavar="DURATION",
                   help=f"wall-clock time of the whole search: 8h, 90m, 3600s [{DEFAULT_BUDGET}]")
    p.add_argument("--gpus", type=int, help="GPUs the search may use [all of this machine's; 0: CPU only]")
    p.add_argument("--out", type=Path, default=Path("planned.yaml"),
                   help="the planned space; the fingerprint goes beside it as <out>.fingerprint.json [planned.yaml]")
    p.add_argument("--cache-dir", help="mask cache [$SEGHPO_CACHE or ~/.cache/seghpo]")


def fingerprint_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".yaml").removesuffix(".yml") + ".fingerprint.json")


def make_plan(args: argparse.Namespace, log: Callable[[str], None] = print, machine: Machine | None = None,
              measure: Callable[[tuple[int, int], int], Measurement] | None = None,
              model: tuple[str, str] | None = None) -> Path:
    """Fingerprint, measure, decide, write; returns the planned space's path. ``machine``, ``measure``
    and ``model`` replace this machine, its measurements and the space's largest model (tests)."""
    from trainables.data import load_dataset  # lazy: start-up time (--help without torch)
    from tune.fingerprint import fingerprint  # lazy: start-up time (--help without torch)
    from tune.measure import StepMeter, this_machine  # lazy: start-up time (--help without torch)

    budget_s = parse_duration(args.time_budget)
    if args.gpus is not None and args.gpus < 0:
        raise ConfigError("command line", "--gpus", f"expected 0 or more GPUs, got {args.gpus}")
    if not Path(args.data).exists():
        raise InputError(args.data, "dataset not found (give a COCO json or a folder with images/ and masks/)")
    base = load_space(args.space, ROOT / "search_spaces")
    raw_base = yaml.safe_load(base.source.read_text())
    d = base.base_config()["data"]
    task = args.task or d["task"]
    data = load_dataset(args.data, args.images, task, d["unannotated"], args.cache_dir, crowd=d["crowd"],
                        background=d["background"])
    log(f"fingerprint of {data.source}: {len(data)} images, {data.num_classes} classes")
    fp = fingerprint(data)
    machine = machine or this_machine(args.gpus)
    model = model or largest_model(base, data.num_classes)
    log(f"machine: {machine.describe()}; measuring {model[0]}/{model[1]} (the base space's largest model)")
    measure = measure or StepMeter(model[0], model[1], data.num_classes, machine, task,
                                   base.base_config()["model"]["kwargs"], threads=1 if machine.kind == "cpu" else None)
    plan = plan_space(fp, base, machine, measure, budget_s, str(args.time_budget), model, log)
    out = Path(args.out)
    fp_path = fingerprint_path(out)
    data_keys = {"path": str(Path(args.data).resolve()), "images": str(Path(args.images).resolve()) if args.images
                 else None, "task": task}
    text = space_yaml(plan, base, raw_base, fp, data_keys, machine, fp_path.name)
    atomic_write_json(fp_path, {"fingerprint": fp, "machine": machine.__dict__, "model": list(model),
                                "measurements": plan.measurements, "notes": plan.notes,
                                "decisions": [d.__dict__ for d in plan.decisions]})
    atomic_write_text(out, text)
    load_space(str(out), ROOT / "search_spaces")  # what tune/run.py will read: fail here, not there
    for decision in plan.decisions:
        log(f"{decision.key} = {_flow(decision.value)}: {decision.reason}")
    log(f"planned space: {out} (fingerprint: {fp_path})\nnext: seghpo tune --space {out}")
    return out


def run(args: argparse.Namespace) -> None:
    make_plan(args)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
