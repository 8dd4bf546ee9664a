"""The planner's decisions (``tune/plan.py``), one step each, in the order ``plan_space`` takes them:
the folds, the input size (two probes measured, the line through them, then bisection), the working
size, the batch size, epochs, trials per fold and ASHA from the time budget (crops weighed against
those epochs: resize and plan them again when crops would cover too little), the machine's
settings, and what the images and masks say. Each step records its ``Decision`` with the reason in the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from trainables.errors import ConfigError
from trainables.inputs import window_starts, working_size
from tune.fingerprint import smallest_objects
from tune.measure import Machine, Measurement
from tune.space import SearchSpec

SIZE_STEP = 32  # network inputs are multiples of 32 (five stride-2 stages)
MIN_SIDE = 64  # the smallest working size tried
SHRINK = 0.8  # each smaller candidate's longer side
MARGIN = 0.9  # share of a trial's memory a batch may use (the rest: fragmentation, the data loader)
SMALL_PIXELS = 4.0  # an object below this many pixels after downscaling is lost: then crops
MIN_PASSES = 10  # crops only when a full trial's crops cover each working-size pixel this often (bench/README.md)
MIN_BATCH, BATCH_SHARE = 2, 0.05  # nnU-Net: at least 2, one batch at most 5% of the training images
TARGET_STEPS = 2000  # optimiser steps of a trial that runs all its epochs
EPOCH_RANGE = (10, 100)
MIN_TRIALS, MAX_TRIALS = 8, 64  # per fold: below 8 TPE has little to learn from (bench/README.md)
RETRAIN_TOP = 3
VAL_COST = 1 / 3  # a validation image costs about a third of a training image (forward only)
OVERHEAD = 1.25  # data loading, metrics and checkpoints on top of the measured steps
GIB = 2 ** 30


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
        """Decide ``key``; a decision taken again keeps its place (the order the plan prints)."""
        new = Decision(key, value, reason)
        keys = [d.key for d in self.decisions]
        if key in keys:
            self.decisions[keys.index(key)] = new
        else:
            self.decisions.append(new)

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


def concurrency(machine: Machine, peak: int) -> int:
    if machine.kind == "cuda":
        return machine.gpus
    return max(1, min(machine.cpus, int(MARGIN * machine.memory // max(peak, 1))))


def trial_memory(machine: Machine, concurrent: int) -> float:
    return machine.memory if machine.kind == "cuda" else machine.memory / concurrent


# ---------------------------------------------------------------- what the steps share


@dataclass(frozen=True)
class Folds:
    """The folds' image counts, ASHA's shape and the cost of the smallest search the plan allows."""
    k: int
    n_train: int
    n_val: int
    rf: float  # ASHA's reduction factor
    grace0: int  # the base space's grace period
    min_epochs: int  # one promotion above the grace period
    min_search: float  # trial-epochs of the smallest search: MIN_TRIALS a fold, or on fold 0 and a retrain

    @classmethod
    def of(cls, k: int, images: int, base: SearchSpec) -> Folds:
        asha = base.search.get("asha")
        rf = float(asha["reduction_factor"]) if asha else 3.0
        grace0 = int(asha["grace_period"]) if asha else 1
        min_epochs = max(2, math.ceil(grace0 * rf))
        min_cost = expected_epochs(min_epochs, max(1, min(grace0, min_epochs // 4)), rf)
        min_search = min(k * MIN_TRIALS * min_cost, MIN_TRIALS * min_cost + (k - 1) * RETRAIN_TOP * min_epochs)
        return cls(k, images - images // k, images // k, rf, grace0, min_epochs, min_search)


@dataclass(frozen=True)
class Meter:
    """``measure(size, batch)`` that records each measurement in the plan and logs it."""
    plan: Plan
    measure: Callable[[tuple[int, int], int], Measurement]
    model: tuple[str, str]
    log: Callable[[str], None]

    def __call__(self, size: tuple[int, int], batch: int) -> Measurement:
        m = self.measure(size, batch)
        self.plan.measurements.append({"size": list(size), "batch": batch, "peak_bytes": m.peak,
                                       "step_s": m.step_s, "fits": m.fits})
        self.log(f"measured {self.model[0]}/{self.model[1]} at {size[0]}x{size[1]}, batch {batch}: "
                 f"{'out of memory' if not m.fits else f'{m.peak / GIB:.2f} GiB peak, {m.step_s:.3f} s/step'}")
        return m


@dataclass(frozen=True)
class Verdict:
    ok: bool
    why: str  # why not: the memory or the time budget
    concurrent: int  # trials at once at this size
    limit: float  # bytes a trial's batch may use


@dataclass(frozen=True)
class InputFit:
    """The input size chosen, its measurement at ``MIN_BATCH`` and what follows from it."""
    side: int  # the longer side
    size: tuple[int, int]
    m: Measurement
    concurrent: int
    limit: float
    reason: str


# ---------------------------------------------------------------- the decisions


def choose_folds(plan: Plan, fp: dict) -> int:
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


class Sizing:
    """The search over candidate input sizes at ``MIN_BATCH``: each measured once, rejections noted,
    and the verdict (fits a trial's memory, a minimal search fits the budget)."""

    def __init__(self, plan: Plan, meter: Meter, machine: Machine, folds: Folds, budget_s: float,
                 sides: list[int], aspect: float):
        self.plan, self.meter, self.machine, self.folds, self.budget_s = plan, meter, machine, folds, budget_s
        self.sides = sides
        self.sizes = [input_size(side, aspect) for side in sides]
        self.pixels = [h * w for h, w in self.sizes]
        self.last = len(sides) - 1
        self.results: dict[int, Measurement] = {}

    def verdict(self, m: Measurement) -> Verdict:
        if not m.fits:
            return Verdict(False, "out of memory", 1, 0.0)
        f = self.folds
        concurrent = concurrency(self.machine, m.peak)
        limit = MARGIN * trial_memory(self.machine, concurrent)
        search_s = f.min_search * m.step_s * (f.n_train + VAL_COST * f.n_val) / MIN_BATCH * OVERHEAD / concurrent
        why = (f"{m.peak / GIB:.2f} GiB > {limit / GIB:.2f} GiB" if m.peak > limit else
               f"the smallest search ({MIN_TRIALS} trials of {f.min_epochs} epochs, ASHA) needs "
               f"{search_s / 3600:.1f} h" if search_s > self.budget_s else "")
        return Verdict(not why, why, concurrent, limit)

    def measure_at(self, i: int) -> None:
        if i not in self.results:
            self.results[i] = self.meter(self.sizes[i], MIN_BATCH)
            v = self.verdict(self.results[i])
            if not v.ok:
                self.plan.notes.append(f"{self.sizes[i][0]}x{self.sizes[i][1]} rejected: {v.why}")

    def line(self, a: int, b: int, i: int) -> Measurement:
        """Memory and time at candidate ``i`` on the line through measured candidates ``a`` and ``b``."""
        pixels = self.pixels

        def at(attr: str) -> float:
            ya, yb = getattr(self.results[a], attr), getattr(self.results[b], attr)
            slope = (yb - ya) / (pixels[b] - pixels[a])
            return yb * pixels[i] / pixels[b] if slope <= 0 else yb + slope * (pixels[i] - pixels[b])
        return Measurement(int(at("peak")), at("step_s"))

    def largest_on_line(self, a: int, b: int) -> int:
        """The largest candidate (smaller sizes have larger indices) the line through ``a`` and ``b`` fits."""
        return next((i for i in range(len(self.sides)) if self.verdict(self.line(a, b, i)).ok), self.last)

    def largest_fitting(self) -> int:
        """The two smallest candidates are measured, the line through them (memory and time grow with
        the pixels) proposes the largest that fits, which is measured; then bisection between the
        largest measured to fit and the smallest larger one measured not to. Its index."""
        probes = [i for i in (self.last, self.last - 1) if i >= 0]
        for i in probes:
            self.measure_at(i)
        if len(probes) == 2 and all(self.results[i].fits for i in probes):
            self.measure_at(self.largest_on_line(*probes))
        while True:
            fitting = [i for i in self.results if self.verdict(self.results[i]).ok]
            if not fitting:
                return self.last
            guess = min(fitting)
            failing = [i for i in self.results if i < guess]
            if guess == 0 or (failing and max(failing) == guess - 1):
                return guess
            if failing:
                self.measure_at((max(failing) + guess) // 2)
            else:  # nothing larger measured yet: where the line through the two largest that fit says, at least one up
                second = sorted(fitting)[1] if len(fitting) > 1 else None
                self.measure_at(min(self.largest_on_line(guess, second), guess - 1) if second is not None
                                else guess - 1)


def choose_input_size(plan: Plan, fp: dict, folds: Folds, machine: Machine, meter: Meter,
                      budget_s: float) -> InputFit:
    """The largest input that fits a batch of ``MIN_BATCH`` in a trial's memory and a minimal search in the budget."""
    (med_h, med_w), aspect = fp["size"]["median"], fp["size"]["median_aspect"]
    sizing = Sizing(plan, meter, machine, folds, budget_s, candidate_sides(max(med_h, med_w)), aspect)
    guess = sizing.largest_fitting()
    side, size, m = sizing.sides[guess], sizing.sizes[guess], sizing.results[guess]
    model = meter.model
    if not m.fits:
        raise ConfigError("command line", "--space", f"{model[0]}/{model[1]} does not fit a batch of "
                          f"{MIN_BATCH} at {size[0]}x{size[1]} on {machine.describe()}")
    v = sizing.verdict(m)
    if not v.ok:
        plan.notes.append(f"even {size[0]}x{size[1]} does not fit the budget's minimal search: planned a short one")
    reason = (f"the largest of {', '.join(str(s) for s in sizing.sides)} (longer side) where "
              f"{model[0]}/{model[1]}, the base space's largest model, fits a batch of {MIN_BATCH} "
              f"(measured {m.peak / GIB:.2f} GiB of {v.limit / GIB:.2f} GiB a trial may use) and a minimal search "
              "fits the time budget")
    return InputFit(side, size, m, v.concurrent, v.limit, reason)


def choose_working_size(plan: Plan, fp: dict, fit: InputFit) -> None:
    """train.image_size, then resize to the input or native-resolution crops when small objects would vanish."""
    (med_h, med_w), aspect = fp["size"]["median"], fp["size"]["median_aspect"]
    native_long, side, size = max(med_h, med_w), fit.side, fit.size
    small = smallest_objects(fp)
    scale = side / native_long
    plan.add("train.image_size", list(size), f"median image {med_h}x{med_w} (aspect {aspect:.2f}) at longer side "
             f"{side}, multiples of {SIZE_STEP}: {fit.reason}")
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
        plan_resize(plan, fp, fit, "resize: small objects survive the downscale")


def plan_resize(plan: Plan, fp: dict, fit: InputFit, why: str) -> None:
    """Whole images downscaled on load to the input's longer side, ``why`` the reason."""
    small, scale = smallest_objects(fp), fit.side / max(fp["size"]["median"])
    plan.add("data.max_size", fit.side, f"downscale on load to the input's longer side (x{scale:.2f}): the smallest "
             f"objects ({small[0] if small else '-'}, 5th percentile {small[1] if small else 0:.0f} px) keep "
             f"{(small[1] if small else 0) * scale ** 2:.1f} px")
    plan.add("augment.random_crop", False, why)


def median_working_size(plan: Plan, fp: dict) -> tuple[int, int]:
    """The median image at the planned working size (``data.max_size`` applied)."""
    return working_size(*fp["size"]["median"], plan.value("data.max_size"))


def crop_passes(plan: Plan, fp: dict) -> float:
    """How often a trial that runs all its epochs covers each pixel of the median working image: one
    random crop an image an epoch covers the crop's share of it; a resized image is covered whole."""
    if not plan.value("augment.random_crop"):
        return float(plan.value("train.epochs"))
    h, w = median_working_size(plan, fp)
    th, tw = plan.value("train.image_size")
    return plan.value("train.epochs") * min(1.0, th / h) * min(1.0, tw / w)


def weigh_crops(plan: Plan, fp: dict, fit: InputFit) -> str | None:
    """Crops keep small objects but show a trial only part of each image an epoch and validate by
    sliding windows. When the planned epochs cover each working pixel fewer than ``MIN_PASSES``
    times, the reason to resize whole images instead; else None (crops stay, their reason now
    says how often the epochs cover each pixel, or crops were not chosen)."""
    if not plan.value("augment.random_crop"):
        return None
    passes, epochs = crop_passes(plan, fp), plan.value("train.epochs")
    h, w = median_working_size(plan, fp)
    crops = f"{fit.size[0]}x{fit.size[1]} crops of the {h}x{w} working image cover each pixel {passes:.1f} times"
    if passes >= MIN_PASSES:
        plan.add("augment.random_crop", True, f"{plan.reason('augment.random_crop')}; {epochs} epochs of "
                 f"{crops} (at least {MIN_PASSES})")
        return None
    small, scale = smallest_objects(fp), fit.side / max(fp["size"]["median"])
    return (f"crops would keep the small {small[0]} objects (a resize leaves them {small[1] * scale ** 2:.1f} px), "
            f"but {crops} in the {epochs} epochs the budget holds (under {MIN_PASSES}) and validate by "
            f"{validation_windows(plan, fp)} windows an image: resize whole images instead (a longer --time-budget "
            "plans crops)")


def choose_batch(plan: Plan, meter: Meter, fit: InputFit, n_train: int) -> tuple[int, Measurement]:
    """The largest batch measured to fit with the margin, at most 5% of the training images, at least 2."""
    cap = max(MIN_BATCH, int(BATCH_SHARE * n_train))
    batch, m_batch = MIN_BATCH, fit.m
    if cap > MIN_BATCH:
        m4 = meter(fit.size, 2 * MIN_BATCH)
        if m4.fits and m4.peak <= fit.limit:
            batch, m_batch = 2 * MIN_BATCH, m4
            per_image = max((m4.peak - fit.m.peak) / MIN_BATCH, 1.0)
            guess = min(cap, MIN_BATCH * 2 + int((fit.limit - m4.peak) // per_image))
            while guess > batch:
                m = meter(fit.size, guess)
                if m.fits and m.peak <= fit.limit:
                    batch, m_batch = guess, m
                    break
                guess = batch + (guess - batch) // 2
    capped = " (the 5% cap)" if batch == cap else ""
    plan.add("train.batch_size", batch, f"the largest measured to fit: {m_batch.peak / GIB:.2f} GiB of "
             f"{fit.limit / GIB:.2f} GiB ({MARGIN:.0%} of a trial's memory); cap {cap}{capped}: at most "
             f"{BATCH_SHARE:.0%} of the {n_train} training images a fold, at least {MIN_BATCH}")
    return batch, m_batch


def trials_at(folds: Folds, capacity: float, epochs: int, folds_searched: int, retrain: int) -> tuple[int, int]:
    """Trials a searched fold gets at ``epochs`` from ``capacity`` trial-epochs, and ASHA's grace period."""
    grace = max(1, min(folds.grace0, epochs // 4))
    cost = expected_epochs(epochs, grace, folds.rf)
    return int((capacity - retrain * epochs) // (folds_searched * cost)), grace


def longest(folds: Folds, capacity: float, wanted: int, folds_searched: int, retrain: int) -> tuple[int, int, int]:
    """The most epochs (from ``wanted`` down by a fifth at a time) at which MIN_TRIALS fit."""
    epochs = wanted
    trials, grace = trials_at(folds, capacity, epochs, folds_searched, retrain)
    while trials < MIN_TRIALS and epochs > folds.min_epochs:
        epochs = max(folds.min_epochs, int(epochs * 0.8))
        trials, grace = trials_at(folds, capacity, epochs, folds_searched, retrain)
    return epochs, trials, grace


def startup_trials(base: SearchSpec, trials: int, folds_searched: int) -> tuple[int, str]:
    """Random trials before TPE: the base space's count, at most a third of the trials one model sees
    (every searched fold's when the folds share one model, ``search.share_folds``; else one fold's)."""
    shared = bool(base.search.get("share_folds", True)) and folds_searched > 1
    seen = trials * folds_searched if shared else trials
    n = max(1, min(int(base.search["n_startup_trials"]), seen // 3))
    over = f"the {seen} trials of the {folds_searched} folds that share one model" if shared else \
        f"the {seen} trials of a fold"
    asked = int(base.search["n_startup_trials"])
    kept = f"the base space's {asked}" if n == asked else f"a third; the base space asks {asked}"
    return n, f"random trials before TPE: {n} of {over} ({kept}), so TPE chooses the other {seen - n}"


def validation_windows(plan: Plan, fp: dict) -> int:
    """Network passes one validation image costs: 1 when it is resized to the input; with crops, the
    sliding windows (overlap 0.5, as :mod:`trainables.inputs` tiles) over the median image at its
    working size (``data.max_size`` applied)."""
    if not plan.value("augment.random_crop"):
        return 1
    h, w = median_working_size(plan, fp)
    th, tw = plan.value("train.image_size")
    return len(window_starts(max(h, th), th)) * len(window_starts(max(w, tw), tw))


def choose_epochs_and_trials(plan: Plan, base: SearchSpec, folds: Folds, concurrent: int, batch: int,
                             m_batch: Measurement, budget_s: float, budget_text: str, val_windows: int = 1) -> None:
    """Epochs, trials per fold, ASHA and the folds searched, from the time budget. A validation image
    costs ``VAL_COST`` of a training image per network pass, ``val_windows`` passes."""
    k, rf = folds.k, folds.rf
    epoch_s = m_batch.step_s * (folds.n_train + VAL_COST * val_windows * folds.n_val) / batch * OVERHEAD
    capacity = budget_s * concurrent / epoch_s  # trial-epochs the budget holds
    steps = math.ceil(folds.n_train / batch)
    wanted = int(min(max(round(TARGET_STEPS / steps), EPOCH_RANGE[0]), EPOCH_RANGE[1]))
    search_folds = None
    epochs, trials, grace = longest(folds, capacity, wanted, k, 0)
    if trials < MIN_TRIALS:  # search fold 0 only, then retrain its best configs on the others
        one = longest(folds, capacity, wanted, 1, (k - 1) * RETRAIN_TOP)
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
             f"epochs on average (the base space's grace {folds.grace0}, at most a quarter of the epochs)")
    plan.add("search.num_samples", trials, f"one epoch takes {epoch_s:.0f} s (measured {m_batch.step_s:.3f} s/step "
             f"x {steps} steps + validation" + (f" by {val_windows} windows an image" if val_windows > 1 else "")
             + f", x{OVERHEAD} for loading); {budget_text} x {concurrent} trials at once "
             f"hold {capacity:.0f} trial-epochs: {trials} trials a fold use {spent:.0f}"
             + ("" if trials < MAX_TRIALS else f" (capped at {MAX_TRIALS})"))
    plan.add("search.n_startup_trials", *startup_trials(base, trials, k if search_folds is None else 1))
    plan.add("search.search_folds", search_folds, "every fold is searched" if search_folds is None else
             f"the budget cannot search {k} folds with {MIN_TRIALS} trials each: search fold 0, then retrain its "
             f"best {RETRAIN_TOP} configs on the other folds")
    if search_folds is not None:
        plan.add("search.retrain_top", RETRAIN_TOP, "configs of fold 0 retrained on the others")
    plan.add("search.time_budget", budget_text, "the search stops starting trials that would not end in time")


def machine_settings(plan: Plan, machine: Machine, concurrent: int, m_batch: Measurement) -> None:
    """Concurrency, AMP, channels_last, loader workers."""
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
                 f"{m_batch.peak / GIB:.2f} GiB a trial fits {MARGIN:.0%} of {machine.memory / GIB:.0f} GiB "
                 f"{int(MARGIN * machine.memory // max(m_batch.peak, 1))} times")
        plan.add("train.amp", "off", "CPU: autocast is slower than fp32 here")
        plan.add("train.channels_last", False, "CPU: no gain (the setting is CUDA only)")
        plan.add("train.num_workers", 0, "the trial's one core decodes the images too")


def data_settings(plan: Plan, fp: dict, base: SearchSpec) -> None:
    """What the images and masks say about augmentation and ignored regions."""
    if fp["channels"] == 1:
        plan.add("augment.color", 0.0, "grayscale images (equal channels): no colour jitter; the RGB encoders get "
                 "the gray channel three times")
    if fp["crowd_regions"]:
        plan.add("data.crowd", base.base_config()["data"]["crowd"], f"{fp['crowd_regions']} COCO crowd regions: "
                 "kept as the base space says (ignore: left out of loss and metrics)")
