"""A latency budget for prediction: which members and TTA views fit ``--max-ms-per-image``.

Prediction runs every fold's members on every image, each once per TTA view, so its cost per
image is the sum of (member, view) forward passes. Each member's cost per view is measured on the
device prediction will use (one out-of-fold image, batch of 1, median of a few runs after a warm-up;
a flipped view costs what its unflipped one does). Then, greedily (as Caruana's selection, by gain
per millisecond rather than by gain):

* start from the best member of every fold (by validation score) without TTA: the ensemble must
  keep a member per fold, so a budget below that is refused;
* add the member, or the TTA component (``hflip``, or one more of the asked ``scales``; a
  component applies to every chosen member), with the largest out-of-fold gain per added
  millisecond that still fits the budget; stop when nothing that fits gains.

The out-of-fold score is the one greedy member selection uses (``ensemble/selection.py``): the
search's metric where sampled pixels compute it, on a fixed random subset of pixels of every
image, each image predicted by its own fold's chosen members, at default decisions. The choice is
made on those pixels, so its score there is in-sample; the thresholds ``ensemble/run.py`` then
tunes for the chosen set are cross-fitted as always.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ensemble.predictor import TTA, Ensemble, best_member_index
from ensemble.selection import _metrics, new_metrics, sample_pixels, selection_metric
from trainables.dataset import SegDataset
from trainables.errors import ConfigError
from trainables.folds import train_val_indices

logger = logging.getLogger(__name__)

View = tuple[float, bool]  # (scale, horizontal flip)


class OneView(TTA):
    """A TTA of exactly one view, to predict and time (member, view) pairs one at a time."""

    def __init__(self, view: View):
        super().__init__(hflip=view[1], scales=(view[0],))
        self.view = view

    def views(self) -> list[View]:
        return [self.view]


@dataclass
class FoldPool:
    """One fold's candidates: sampled out-of-fold probabilities per (member, view) and their cost."""
    names: list[str]
    probs: np.ndarray  # (M, V, C, P) float16
    target: np.ndarray  # (P,) labels or (P, C) multilabel targets
    owner: np.ndarray  # (P,) the image of each pixel
    ms: np.ndarray  # (M, V) milliseconds per image
    first: int = 0  # the member kept whatever the budget (best validation score)


@dataclass
class Choice:
    members: dict[int, list[int]]  # fold -> chosen member indices
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    steps: list[dict] = field(default_factory=list)

    def views(self) -> list[View]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    def tta_text(self) -> str:
        parts = (["hflip"] if self.flip else []) + ([f"scales={':'.join(f'{s:g}' for s in self.scales)}"]
                                                    if self.scales != (1.0,) else [])
        return ",".join(parts) or "none"


def view_index(views: list[View]) -> dict[View, int]:
    return {v: i for i, v in enumerate(views)}


def cost(pools: dict[int, FoldPool], choice: Choice, views: list[View]) -> float:
    index = view_index(views)
    cols = [index[v] for v in choice.views()]
    return float(sum(pools[f].ms[np.ix_(chosen, cols)].sum() for f, chosen in choice.members.items()))


def score(pools: dict[int, FoldPool], choice: Choice, views: list[View], data, key: str, empty: float) -> float:
    """The out-of-fold ``key`` of ``choice`` on the sampled pixels of every fold, pooled."""
    index = view_index(views)
    cols = [index[v] for v in choice.views()]
    metrics = new_metrics(data, key, empty)
    for f, chosen in choice.members.items():
        pool = pools[f]
        avg = pool.probs[np.ix_(chosen, cols)].astype(np.float32).mean((0, 1))
        _metrics(avg, pool.target, data, metrics, pool.owner)
    return float(metrics.compute()[key])


def check_minimum(base_ms: float, budget_ms: float, folds: int) -> None:
    if base_ms > budget_ms:
        raise ConfigError("command line", "--max-ms-per-image",
                          f"{budget_ms:g} ms is below the smallest ensemble (the best member of each of the "
                          f"{folds} folds, no TTA), which takes {base_ms:.1f} ms per image here")


def candidates(choice: Choice, pools: dict[int, FoldPool], tta: TTA) -> list[tuple[str, Choice]]:
    out = []
    for f, chosen in choice.members.items():
        for m in range(len(pools[f].names)):
            if m not in chosen:
                out.append((f"member {pools[f].names[m]} (fold {f})",
                            Choice({**choice.members, f: [*chosen, m]}, choice.flip, choice.scales)))
    if tta.hflip and not choice.flip:
        out.append(("TTA hflip", Choice(dict(choice.members), True, choice.scales)))
    for s in tta.scales:
        if s not in choice.scales:
            out.append((f"TTA scale {s:g}", Choice(dict(choice.members), choice.flip, tuple(sorted((*choice.scales, s))))))
    return out


def greedy_budget(pools: dict[int, FoldPool], views: list[View], tta: TTA, budget_ms: float, data, key: str,
                  mode: str, empty: float = 1.0) -> Choice:
    """The greedy choice (module doc) over precomputed pools; ``views``: the columns of every pool."""
    sign = 1.0 if mode == "max" else -1.0
    choice = Choice({f: [pool.first] for f, pool in pools.items()})
    base_ms = cost(pools, choice, views)
    check_minimum(base_ms, budget_ms, len(pools))
    current = score(pools, choice, views, data, key, empty)
    choice.steps.append({"add": "best member of each fold", "ms": base_ms, "score": current})
    while True:
        best = None
        spent = cost(pools, choice, views)
        for label, cand in candidates(choice, pools, tta):
            ms = cost(pools, cand, views)
            if ms > budget_ms:
                continue
            gain = sign * (score(pools, cand, views, data, key, empty) - current)
            if gain <= 0:
                continue
            per_ms = gain / max(ms - spent, 1e-9)
            if best is None or per_ms > best[0]:
                best = (per_ms, label, cand, ms, current + sign * gain)
        if best is None:
            break
        per_ms, label, cand, ms, current = best
        cand.steps = [*choice.steps, {"add": label, "ms": ms, "score": current, "gain_per_ms": per_ms}]
        choice = cand
    return choice


# ----------------------------------------------------------------------------- measurement


def time_ms(ens: Ensemble, image: np.ndarray, reps: int = 5) -> float:
    """Median wall milliseconds of one image through ``ens`` (after a warm-up)."""
    ens.predict_batch([image])
    times = []
    for _ in range(reps):
        if ens.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ens.predict_batch([image])
        if ens.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def single_views(ens: Ensemble, views: list[View]) -> list[list[Ensemble]]:
    """One one-member, one-view ensemble per (member, view) of ``ens``."""
    return [[Ensemble([m], OneView(v), ens.voting, ens.device, tile=ens.tile) for v in views] for m in ens.members]


def member_costs(singles: list[list[Ensemble]], views: list[View], image: np.ndarray, reps: int) -> np.ndarray:
    """(M, V) milliseconds per image; a flipped view costs its unflipped view's forward pass (TTA views
    are a product of scales and flips, so every scale has an unflipped view)."""
    out = np.zeros((len(singles), len(views)))
    for m, row in enumerate(singles):
        timed: dict[float, float] = {}
        for v, (scale, _) in enumerate(views):
            if scale not in timed:
                timed[scale] = time_ms(row[views.index((scale, False))], image, reps)
            out[m, v] = timed[scale]
    return out


def sampled_probs(singles: list[list[Ensemble]], ds: SegDataset, val_idx: list[int], pixels: int, seed: int):
    """(M, V, C, P) float16 probabilities of every (member, view), targets and pixel owners (sample_pixels)."""
    def predict(image):
        return np.stack([np.stack([one.predict_batch([image])[0] for one in row]) for row in singles])

    return sample_pixels(predict, ds, val_idx, pixels, seed)


@dataclass
class Measured:
    """Every fold's candidates timed (``FoldPool`` costs; probabilities once sampled), the one-view
    ensembles, images and the image timed: what :func:`budget_members` measures before choosing."""
    pools: dict[int, FoldPool]
    sets: dict[int, tuple]
    image: np.ndarray


def measure_costs(ensembles: dict[int, Ensemble], data, folds, max_size, mode: str, reps: int = 5,
                  max_images: int | None = None) -> Measured:
    """Each fold's (member, view) costs per image on the ensembles' device (module doc)."""
    views = next(iter(ensembles.values())).tta.views()
    pools, sets, image = {}, {}, None
    for fold, ens in sorted(ensembles.items()):
        _, val_idx = train_val_indices(folds, fold, data.ids)
        ds = SegDataset(data, val_idx[:max_images], transform=None, max_size=max_size, cache=False)
        image = data.read_image(val_idx[0]) if image is None else image  # as --predict sees it: full size
        sets[fold] = (single_views(ens, views), ds, val_idx[:max_images])
        pools[fold] = FoldPool([m.name for m in ens.members], np.zeros(0), np.zeros(0), np.zeros(0),
                               member_costs(sets[fold][0], views, image, reps), best_member_index(ens.members, mode))
    return Measured(pools, sets, image)


def budget_members(ensembles: dict[int, Ensemble], data, *, folds, max_size, budget_ms: float, metric: str, mode: str,
                   pixels_per_image: int = 4096, empty: float = 1.0, reps: int = 5,
                   max_images: int | None = None, measured: Measured | None = None
                   ) -> tuple[dict[int, Ensemble], str, dict]:
    """The members and TTA within ``budget_ms`` per image (module doc): the budgeted ensembles, their TTA
    as ``--tta`` text, and the report: cost and score of the budgeted and the unconstrained ensemble.
    ``measured``: costs (and sampled probabilities) of an earlier :func:`measure_costs` of these
    ensembles, to choose for another budget without timing again."""
    tta = next(iter(ensembles.values())).tta
    views = tta.views()
    key, key_mode, note = selection_metric(metric, mode, data.task)
    if note:
        logger.warning(note)
    # costs first: a budget below the smallest ensemble fails fast
    measured = measured or measure_costs(ensembles, data, folds, max_size, mode, reps, max_images)
    pools, sets, image = measured.pools, measured.sets, measured.image
    base = Choice({f: [pool.first] for f, pool in pools.items()})
    check_minimum(cost(pools, base, views), budget_ms, len(pools))
    for fold, (singles, ds, val_idx) in sets.items():
        if not pools[fold].probs.size:
            pools[fold].probs, pools[fold].target, pools[fold].owner = sampled_probs(singles, ds, val_idx,
                                                                                     pixels_per_image, fold)
    choice = greedy_budget(pools, views, tta, budget_ms, data, key, key_mode, empty)
    full = Choice({f: list(range(len(p.names))) for f, p in pools.items()}, tta.hflip, tuple(sorted(tta.scales)))
    budgeted = {f: Ensemble([ensembles[f].members[m] for m in chosen], TTA.parse(choice.tta_text()),
                            ensembles[f].voting, ensembles[f].device, tile=ensembles[f].tile)
                for f, chosen in choice.members.items()}
    report = {
        "max_ms_per_image": budget_ms, "device": str(next(iter(ensembles.values())).device), "metric": key,
        "note": note, "tta": choice.tta_text(), "steps": choice.steps,
        "members": {str(f): [pools[f].names[m] for m in chosen] for f, chosen in choice.members.items()},
        "ms_per_member_view": {str(f): {name: dict(zip([f"{s:g}{'+flip' if fl else ''}" for s, fl in views],
                                                       p.ms[m].tolist())) for m, name in enumerate(p.names)}
                               for f, p in pools.items()},
        "budgeted": {"members": sum(len(c) for c in choice.members.values()), "views": len(choice.views()),
                     "planned_ms": cost(pools, choice, views),
                     "score_in_sample": score(pools, choice, views, data, key, empty)},
        "unconstrained": {"members": sum(len(p.names) for p in pools.values()), "views": len(views),
                          "planned_ms": cost(pools, full, views),
                          "score": score(pools, full, views, data, key, empty)},
        "pixels_per_image": pixels_per_image,
    }
    one = next(iter(budgeted.values()))
    everything = Ensemble([m for e in budgeted.values() for m in e.members], one.tta, one.voting, one.device,
                          tile=one.tile)
    report["budgeted"]["measured_ms"] = time_ms(everything, image, reps)  # the chosen set as --predict runs it
    return budgeted, choice.tta_text(), report


def summary_line(report: dict) -> str:
    b, u = report["budgeted"], report["unconstrained"]
    return (f"latency budget {report['max_ms_per_image']:g} ms/image on {report['device']}: {b['members']} members x "
            f"{b['views']} views ({report['tta']}), {b['planned_ms']:.1f} ms planned, {b['measured_ms']:.1f} ms "
            f"measured; out-of-fold {report['metric']} on sampled pixels {b['score_in_sample']:.4f} (in-sample: the "
            f"choice was made there) vs {u['score']:.4f} unconstrained ({u['members']} members x {u['views']} views, "
            f"{u['planned_ms']:.1f} ms)"
            + ("; the measured time is above the budget: timings varied while measuring (a busy machine?), "
               "rerun on an idle one" if b["measured_ms"] > report["max_ms_per_image"] else ""))
