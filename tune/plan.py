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
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]

from trainables.cli import command_parser, exit_on_user_error, parse_duration  # noqa: E402
from trainables.config import DEFAULTS  # noqa: E402
from trainables.errors import ConfigError, InputError  # noqa: E402
from trainables.io import atomic_write_json, atomic_write_text  # noqa: E402
from tune.fingerprint import smallest_objects  # noqa: E402
from tune.measure import Machine, Measurement  # noqa: E402
from tune.space import SearchSpec, load_space, model_pairs  # noqa: E402

SIZE_STEP = 32  # network inputs are multiples of 32 (five stride-2 stages)
MIN_SIDE = 64  # the smallest working size tried
SHRINK = 0.8  # each smaller candidate's longer side
MARGIN = 0.9  # share of a trial's memory a batch may use (the rest: fragmentation, the data loader)
SMALL_PIXELS = 4.0  # an object below this many pixels after downscaling is lost: then crops
MIN_BATCH, BATCH_SHARE = 2, 0.05  # nnU-Net: at least 2, one batch at most 5% of the training images
TARGET_STEPS = 2000  # optimiser steps of a trial that runs all its epochs
EPOCH_RANGE = (10, 100)
MIN_TRIALS, MAX_TRIALS = 8, 64  # per fold: below 8 TPE has little to learn from (bench/README.md)
RETRAIN_TOP = 3
VAL_COST = 1 / 3  # a validation image costs about a third of a training image (forward only)
OVERHEAD = 1.25  # data loading, metrics and checkpoints on top of the measured steps
DEFAULT_BUDGET = "8h"


@dataclass
class Decision:
    key: str  # a dotted trial setting (train.batch_size) or search.* / resources.*
    value: Any
    reason: str


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    measurements: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, reason: str) -> None:
        self.decisions = [d for d in self.decisions if d.key != key] + [Decision(key, value, reason)]

    def value(self, key: str) -> Any:
        return next(d.value for d in self.decisions if d.key == key)

    def reason(self, key: str) -> str:
        return next(d.reason for d in self.decisions if d.key == key)


# ---------------------------------------------------------------- the arithmetic


def round32(x: float) -> int:
    return max(SIZE_STEP, int(round(x / SIZE_STEP)) * SIZE_STEP)


def input_size(long_side: int, aspect: float) -> tuple[int, int]:
    """[height, width], multiples of 32, with ``long_side`` on the longer side at ``aspect`` = w / h."""
    return (round32(long_side / aspect), long_side) if aspect >= 1 else (long_side, round32(long_side * aspect))


def candidate_sides(native_long: int) -> list[int]:
    """Longer sides to try, largest first: the median image's, then shrunk by ``SHRINK`` to ``MIN_SIDE``."""
    sides, side = [], float(native_long)
    while True:
        s = round32(side)
        if not sides or s < sides[-1]:
            sides.append(s)
        if s <= MIN_SIDE:
            return sides
        side *= SHRINK


def asha_rungs(epochs: int, grace: int, rf: float) -> list[int]:
    rungs, r = [], float(grace)
    while r < epochs:
        rungs.append(math.ceil(r))
        r *= rf
    return rungs


def expected_epochs(epochs: int, grace: int, rf: float) -> float:
    """ASHA's expected epochs of a trial: all reach the first rung, 1/rf of them the next, ..."""
    total, last = 0.0, 0
    for i, rung in enumerate(asha_rungs(epochs, grace, rf) + [epochs]):
        total += (rung - last) / rf ** i
        last = rung
    return total


# ---------------------------------------------------------------- the decisions


def _folds(plan: Plan, fp: dict) -> int:
    n, groups = fp["images"], fp["groups"]
    k = max(2, min(5, n // 10))
    if groups and groups["groups"] >= 5:
        plan.add("folds.strategy", "group", f"file names look like frames or slices: {groups['groups']} groups "
                 f"(e.g. {', '.join(groups['examples'][:3])}), the largest {groups['largest']} images; near-duplicate "
                 "neighbours in train and validation would flatter the score, so a group stays in one fold")
        plan.add("folds.group_regex", groups["regex"], "the group key is the file name's prefix before the running "
                 "number (first capture group)")
        plan.add("folds.k", 5, "five folds of whole groups")
        return 5
    too_few = (f"; the names look like frames of only {groups['groups']} sequences, too few for {k} group folds, "
               "so neighbouring frames may sit in train and validation (an optimistic score)") if groups else ""
    if fp["task"] == "multilabel" or fp["classes_per_image"] > 1.5:
        why = ("multilabel task" if fp["task"] == "multilabel"
               else f"{fp['classes_per_image']:.1f} classes per image")
        plan.add("folds.strategy", "multilabel", f"{why}: iterative stratification over per-image class "
                 f"presence spreads every class over the folds{too_few}")
    else:
        plan.add("folds.strategy", "stratified", f"about one class per image: stratified on each image's rarest "
                 f"class{too_few}")
    plan.add("folds.k", k, f"{n} images: {k} folds (about 10 or more validation images a fold, at most 5)")
    return k


def _concurrency(machine: Machine, peak: int) -> int:
    if machine.kind == "cuda":
        return machine.gpus
    return max(1, min(machine.cpus, int(MARGIN * machine.memory // max(peak, 1))))


def _trial_memory(machine: Machine, concurrent: int) -> float:
    return machine.memory if machine.kind == "cuda" else machine.memory / concurrent


def plan_space(fp: dict, base: SearchSpec, machine: Machine, measure: Callable[[tuple[int, int], int], Measurement],
               budget_s: float, budget_text: str, model: tuple[str, str], log: Callable[[str], None] = print) -> Plan:
    """Every decision of the fixed half, from the fingerprint ``fp`` and ``measure(size, batch)``."""
    plan = Plan()
    gib = 2 ** 30

    def measured(size: tuple[int, int], batch: int) -> Measurement:
        m = measure(size, batch)
        plan.measurements.append({"size": list(size), "batch": batch, "peak_bytes": m.peak, "step_s": m.step_s,
                                  "fits": m.fits})
        log(f"measured {model[0]}/{model[1]} at {size[0]}x{size[1]}, batch {batch}: "
            f"{'out of memory' if not m.fits else f'{m.peak / gib:.2f} GiB peak, {m.step_s:.3f} s/step'}")
        return m

    k = _folds(plan, fp)
    n = fp["images"]
    n_train, n_val = n - n // k, n // k
    (med_h, med_w), aspect = fp["size"]["median"], fp["size"]["median_aspect"]
    native_long = max(med_h, med_w)
    asha = base.search.get("asha")
    rf = float(asha["reduction_factor"]) if asha else 3.0
    grace0 = int(asha["grace_period"]) if asha else 1
    min_epochs = max(2, math.ceil(grace0 * rf))  # one promotion above the grace period
    min_cost = expected_epochs(min_epochs, max(1, min(grace0, min_epochs // 4)), rf)
    # trial-epochs of the smallest search planned: MIN_TRIALS a fold on every fold, or on fold 0 and a retrain
    folds_cost = min(k * MIN_TRIALS * min_cost, MIN_TRIALS * min_cost + (k - 1) * RETRAIN_TOP * min_epochs)

    # 1. the largest input that fits a batch of 2 in a trial's memory and a minimal search in the budget:
    # the two smallest candidates are measured, the line through them (memory and time grow with the
    # pixels) proposes the largest that fits, which is measured; then bisection between the largest
    # measured to fit and the smallest larger one measured not to
    sides = candidate_sides(native_long)
    sizes = [input_size(side, aspect) for side in sides]
    results: dict[int, Measurement] = {}

    def verdict(i: int, m: Measurement) -> tuple[bool, str, int, float]:
        if not m.fits:
            return False, "out of memory", 1, 0.0
        concurrent = _concurrency(machine, m.peak)
        limit = MARGIN * _trial_memory(machine, concurrent)
        search_s = folds_cost * m.step_s * (n_train + VAL_COST * n_val) / MIN_BATCH * OVERHEAD / concurrent
        why = (f"{m.peak / gib:.2f} GiB > {limit / gib:.2f} GiB" if m.peak > limit else
               f"the smallest search ({MIN_TRIALS} trials of {min_epochs} epochs, ASHA) needs "
               f"{search_s / 3600:.1f} h" if search_s > budget_s else "")
        return not why, why, concurrent, limit

    def measure_at(i: int) -> bool:
        if i not in results:
            results[i] = measured(sizes[i], MIN_BATCH)
            ok, why, _, _ = verdict(i, results[i])
            if not ok:
                plan.notes.append(f"{sizes[i][0]}x{sizes[i][1]} rejected: {why}")
        return verdict(i, results[i])[0]

    last = len(sides) - 1
    pixels = [h * w for h, w in sizes]

    def line(a: int, b: int, i: int) -> Measurement:
        """Memory and time at candidate ``i`` on the line through measured candidates ``a`` and ``b``."""
        def at(attr: str) -> float:
            ya, yb = getattr(results[a], attr), getattr(results[b], attr)
            slope = (yb - ya) / (pixels[b] - pixels[a])
            return yb * pixels[i] / pixels[b] if slope <= 0 else yb + slope * (pixels[i] - pixels[b])
        return Measurement(int(at("peak")), at("step_s"))

    def largest_on_line(a: int, b: int, below: int) -> int:
        """The largest candidate above index ``below`` (smaller sizes have larger indices) the line fits."""
        return next((i for i in range(below + 1, len(sides)) if verdict(i, line(a, b, i))[0]), last)

    probes = [i for i in (last, last - 1) if i >= 0]
    for i in probes:
        measure_at(i)
    if len(probes) == 2 and all(results[i].fits for i in probes):
        measure_at(largest_on_line(*probes, -1))
    while True:  # bisect between the largest size that fits and the smallest larger one that does not
        fitting = [i for i in results if verdict(i, results[i])[0]]
        if not fitting:
            guess = last
            break
        guess = min(fitting)
        failing = [i for i in results if i < guess]
        if guess == 0 or (failing and max(failing) == guess - 1):
            break
        if failing:
            measure_at((max(failing) + guess) // 2)
        else:  # nothing larger measured yet: where the line through the two largest that fit says, at least one up
            second = sorted(fitting)[1] if len(fitting) > 1 else None
            measure_at(min(largest_on_line(guess, second, -1), guess - 1) if second is not None else guess - 1)
    side, size = sides[guess], sizes[guess]
    m = results[guess]
    if not m.fits:
        raise ConfigError("command line", "--space", f"{model[0]}/{model[1]} does not fit a batch of "
                          f"{MIN_BATCH} at {size[0]}x{size[1]} on {machine.describe()}")
    ok, _, concurrent, limit = verdict(guess, m)
    if not ok:
        plan.notes.append(f"even {size[0]}x{size[1]} does not fit the budget's minimal search: planned a short one")
    m2 = m
    fit_reason = (f"the largest of {', '.join(str(s) for s in candidate_sides(native_long))} (longer side) where "
                  f"{model[0]}/{model[1]}, the base space's largest model, fits a batch of {MIN_BATCH} "
                  f"(measured {m2.peak / gib:.2f} GiB of {limit / gib:.2f} GiB a trial may use) and a minimal search "
                  "fits the time budget")

    # 2. working size: resize to the input, or native-resolution crops when small objects would vanish
    small = smallest_objects(fp)
    scale = side / native_long
    plan.add("train.image_size", list(size), f"median image {med_h}x{med_w} (aspect {aspect:.2f}) at longer side "
             f"{side}, multiples of {SIZE_STEP}: {fit_reason}")
    if scale >= 1:
        plan.add("data.max_size", None, f"the median image ({med_h}x{med_w}) fits: no downscale on load")
        plan.add("augment.random_crop", False, "the whole image is the network input (resized to image_size)")
    elif small and small[1] * scale ** 2 < SMALL_PIXELS:
        keep = min(1.0, math.sqrt(SMALL_PIXELS / small[1]))
        working = None if keep >= 1 else math.ceil(native_long * keep)
        plan.add("augment.random_crop", True, f"shrinking {native_long} to {side} (x{scale:.2f}) would leave the "
                 f"small {small[0]} objects (5th percentile {small[1]:.0f} px) {small[1] * scale ** 2:.1f} px, under "
                 f"{SMALL_PIXELS:g}: train on {size[0]}x{size[1]} crops instead, predict by sliding windows")
        plan.add("data.max_size", working, "native resolution" if working is None else
                 f"the smallest working size that keeps those objects at {SMALL_PIXELS:g} px (x{keep:.2f})")
    else:
        plan.add("data.max_size", side, f"downscale on load to the input's longer side (x{scale:.2f}): the smallest "
                 f"objects ({small[0] if small else '-'}, 5th percentile "
                 f"{small[1] if small else 0:.0f} px) keep {(small[1] if small else 0) * scale ** 2:.0f} px")
        plan.add("augment.random_crop", False, "resize: small objects survive the downscale")

    # 3. batch: the largest measured to fit with the margin, at most 5% of the training images, at least 2
    cap = max(MIN_BATCH, int(BATCH_SHARE * n_train))
    batch, m_batch = MIN_BATCH, m2
    if cap > MIN_BATCH:
        m4 = measured(size, 2 * MIN_BATCH)
        if m4.fits and m4.peak <= limit:
            batch, m_batch = 2 * MIN_BATCH, m4
            per_image = max((m4.peak - m2.peak) / MIN_BATCH, 1.0)
            guess = min(cap, MIN_BATCH * 2 + int((limit - m4.peak) // per_image))
            while guess > batch:
                m = measured(size, guess)
                if m.fits and m.peak <= limit:
                    batch, m_batch = guess, m
                    break
                guess = batch + (guess - batch) // 2
    capped = " (the 5% cap)" if batch == cap else ""
    plan.add("train.batch_size", batch, f"the largest measured to fit: {m_batch.peak / gib:.2f} GiB of "
             f"{limit / gib:.2f} GiB ({MARGIN:.0%} of a trial's memory); cap {cap}{capped}: at most "
             f"{BATCH_SHARE:.0%} of the {n_train} training images a fold, at least {MIN_BATCH}")

    # 4. epochs, trials per fold and the rest of the search from the time budget
    epoch_s = m_batch.step_s * (n_train + VAL_COST * n_val) / batch * OVERHEAD
    capacity = budget_s * concurrent / epoch_s  # trial-epochs the budget holds
    steps = math.ceil(n_train / batch)
    wanted = int(min(max(round(TARGET_STEPS / steps), EPOCH_RANGE[0]), EPOCH_RANGE[1]))

    def fit(epochs: int, folds_searched: int, retrain: int) -> tuple[int, int]:
        grace = max(1, min(grace0, epochs // 4))
        cost = expected_epochs(epochs, grace, rf)
        return int((capacity - retrain * epochs) // (folds_searched * cost)), grace

    def longest(folds_searched: int, retrain: int) -> tuple[int, int, int]:
        """The most epochs (from ``wanted`` down by a fifth at a time) at which MIN_TRIALS fit."""
        epochs = wanted
        trials, grace = fit(epochs, folds_searched, retrain)
        while trials < MIN_TRIALS and epochs > min_epochs:
            epochs = max(min_epochs, int(epochs * 0.8))
            trials, grace = fit(epochs, folds_searched, retrain)
        return epochs, trials, grace

    search_folds = None
    epochs, trials, grace = longest(k, 0)
    if trials < MIN_TRIALS:  # search fold 0 only, then retrain its best configs on the others
        one = longest(1, (k - 1) * RETRAIN_TOP)
        if one[1] > trials:
            (epochs, trials, grace), search_folds = one, [0]
    if trials < MIN_TRIALS:
        plan.notes.append(f"the budget holds fewer than {MIN_TRIALS} trials a fold: a short search "
                          "(raise --time-budget, or plan a smaller base space)")
    trials = max(2, min(trials, MAX_TRIALS))
    spent = (k if search_folds is None else 1) * trials * expected_epochs(epochs, grace, rf) + \
        (0 if search_folds is None else (k - 1) * RETRAIN_TOP * epochs)
    plan.add("train.epochs", epochs, f"{steps} steps an epoch at batch {batch}; {TARGET_STEPS} steps a full trial "
             f"wants {wanted} epochs (kept in {EPOCH_RANGE[0]}-{EPOCH_RANGE[1]})"
             + ("" if epochs == wanted else f", cut to {epochs} so that {MIN_TRIALS} trials a fold fit the budget"))
    plan.add("search.asha", {"grace_period": grace, "reduction_factor": rf if rf % 1 else int(rf), "brackets": 1},
             f"rungs at epochs {asha_rungs(epochs, grace, rf)}: a trial runs {expected_epochs(epochs, grace, rf):.1f} "
             f"epochs on average (the base space's grace {grace0}, at most a quarter of the epochs)")
    plan.add("search.num_samples", trials, f"one epoch takes {epoch_s:.0f} s (measured {m_batch.step_s:.3f} s/step "
             f"x {steps} steps + validation, x{OVERHEAD} for loading); {budget_text} x {concurrent} trials at once "
             f"hold {capacity:.0f} trial-epochs: {trials} trials a fold use {spent:.0f}"
             + ("" if trials < MAX_TRIALS else f" (capped at {MAX_TRIALS})"))
    plan.add("search.n_startup_trials", max(1, min(int(base.search["n_startup_trials"]), trials // 3)),
             f"random trials before TPE: a third of the {trials} trials, so TPE chooses the other two thirds")
    plan.add("search.search_folds", search_folds, "every fold is searched" if search_folds is None else
             f"the budget cannot search {k} folds with {MIN_TRIALS} trials each: search fold 0, then retrain its "
             f"best {RETRAIN_TOP} configs on the other folds")
    if search_folds is not None:
        plan.add("search.retrain_top", RETRAIN_TOP, "configs of fold 0 retrained on the others")
    plan.add("search.time_budget", budget_text, "the search stops starting trials that would not end in time")

    # 5. the machine: concurrency, AMP, channels_last, loader workers
    if machine.kind == "cuda":
        cpus = max(1, machine.cpus // concurrent)
        plan.add("resources.gpus_per_trial", 1, f"one trial a GPU: its batch fills the GPU ({machine.describe()})")
        plan.add("resources.cpus_per_trial", cpus, f"{machine.cpus} CPUs over {concurrent} trials")
        plan.add("resources.max_concurrent", concurrent, f"{concurrent} GPU(s)")
        plan.add("train.amp", "auto", f"CUDA: autocast in {machine.amp}")
        plan.add("train.channels_last", True, "CUDA: channels-last convolutions are faster under AMP")
        plan.add("train.num_workers", min(8, max(0, cpus - 1)), "one loader process per CPU of the trial but one "
                 "(the training loop's), at most 8")
    else:
        plan.add("resources.gpus_per_trial", 0, "no GPU")
        plan.add("resources.cpus_per_trial", max(1, machine.cpus // concurrent),
                 "one core a trial: trials side by side use a CPU better than threads inside one")
        plan.add("resources.max_concurrent", concurrent, f"{machine.cpus} cores; the measured "
                 f"{m_batch.peak / gib:.2f} GiB a trial fits {MARGIN:.0%} of {machine.memory / gib:.0f} GiB "
                 f"{int(MARGIN * machine.memory // max(m_batch.peak, 1))} times")
        plan.add("train.amp", "off", "CPU: autocast is slower than fp32 here")
        plan.add("train.channels_last", False, "CPU: no gain (the setting is CUDA only)")
        plan.add("train.num_workers", 0, "the trial's one core decodes the images too")

    # 6. what the images and masks say about augmentation and ignored regions
    if fp["channels"] == 1:
        plan.add("augment.color", 0.0, "grayscale images (equal channels): no colour jitter; the RGB encoders get "
                 "the gray channel three times")
    if fp["crowd_regions"]:
        plan.add("data.crowd", base.base_config()["data"]["crowd"], f"{fp['crowd_regions']} COCO crowd regions: "
                 "kept as the base space says (ignore: left out of loss and metrics)")
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
