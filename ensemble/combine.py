"""How the bundle combines its members, decided on the holdout: weights that never lose to the best member.

Out-of-fold rows cannot see the average of every fold's members that the bundle ships (each
out-of-fold image is predicted by one fold's members only), so whether that average beats its
own best member is unknown there. The holdout (``folds.holdout``) is predicted by every member,
and three candidates are scored on it, on the same sampled pixels of each member's
probabilities (as greedy selection samples them, ``ensemble/selection.py``: memory bounded),
with the search's metric where sampled pixels can compute it:

* ``uniform``: the plain average of all members (nothing fitted: its score is honest);
* ``best_member``: the member with the best validation score (nothing fitted either);
* ``fitted``: keep/drop per member by greedy forward selection without replacement (add the
  member that most improves the average's score; stop when none does). It is fitted on the
  holdout, so its score is **cross-fitted**: the holdout's images are split in two halves by a
  seeded split, the selection made on one half is scored on the other and vice versa, and the
  two halves' pixels are pooled into one score.

The fitted combination is shipped only if its cross-fitted score beats both the uniform average
and the best member; otherwise the better of those two (the uniform average on a tie). The
shipped keep/drop is then fitted on the whole holdout. The result is a weight per member (1 kept,
0 dropped); prediction only reads weights (``Member.weight``, ``bundle.json``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np

from ensemble.selection import _metrics, new_metrics, selection_metric

logger = logging.getLogger(__name__)

CANDIDATES = ("uniform", "best_member", "fitted")


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image positions ``0..n-1`` in two halves of a seeded random permutation (the first holds the
    extra image when ``n`` is odd), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = (n + 1) // 2
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def sample_member_probs(ens, data, indices: list[int], pixels_per_image: int = 4096, seed: int = 0):
    """(M, C, P) float16 probabilities of every member of ``ens`` on a fixed random subset of each
    image's pixels, at the image's stored size (as prediction sees it), with (P,) or (P, C) targets
    and the (P,) position in ``indices`` of each pixel's image. One member's probability map is held
    at a time."""
    import torch

    rng = np.random.default_rng(seed)
    probs, targets, owner = [], [], []
    for k, i in enumerate(indices):
        image, mask = data.read_image(i), data.read_mask(i)
        n = image.shape[0] * image.shape[1]
        pick = np.sort(rng.choice(n, size=min(pixels_per_image, n), replace=False))
        index = torch.from_numpy(pick)
        per = []
        for member in ens.members:
            p = ens.member_probs(member, image[None])[0]
            per.append(p.reshape(p.shape[0], -1)[:, index.to(p.device)].cpu().numpy().astype(np.float16))
        probs.append(np.stack(per))
        targets.append(mask.reshape(-1, *mask.shape[2:])[pick])
        owner.append(np.full(len(pick), k))
    return np.concatenate(probs, -1), np.concatenate(targets, 0), np.concatenate(owner)


def weighted_mean(probs: np.ndarray, weights, rows) -> np.ndarray:
    """(C, P') weighted mean over members of ``probs[:, :, rows]``."""
    w = np.asarray(weights, dtype=np.float64)
    keep = np.flatnonzero(w > 0)
    part = probs[keep][:, :, rows].astype(np.float32)
    return np.tensordot((w[keep] / w[keep].sum()).astype(np.float32), part, axes=1)


def greedy_keep(score: Callable[[list[float]], float], m: int, mode: str = "max") -> list[float]:
    """Keep/drop weights (1.0 / 0.0) of ``m`` members by forward selection without replacement: add the
    member that most improves ``score(weights)``; stop when none does (ties: the earlier member)."""
    sign = 1.0 if mode == "max" else -1.0
    chosen: list[int] = []
    best = -math.inf

    def signed(c: list[int]) -> float:
        value = score([1.0 if k in c else 0.0 for k in range(m)])
        return -math.inf if math.isnan(value) else sign * value

    while len(chosen) < m:
        value, pick = max(((signed(chosen + [c]), c) for c in range(m) if c not in chosen), key=lambda t: t[0])
        if not value > best:
            break
        chosen.append(pick)
        best = value
    return [1.0 if k in chosen else 0.0 for k in range(m)]


def decide_combination(probs: np.ndarray, target: np.ndarray, *, owner: np.ndarray, data, key: str, mode: str,
                       best: int, names: list[str], seed: int = 0, empty: float = 1.0,
                       fit: Callable | None = None) -> tuple[list[float], dict]:
    """(weights of the shipped combination, record) from sampled member probabilities ``probs`` (M, C, P).

    ``data``: task, num_classes, ignore_index; ``key``: the SegMetrics key scored in ``mode``;
    ``best``: index of the best member by validation score; ``owner``: each pixel's image, split
    into halves by :func:`split_halves` with ``seed``. ``fit(score, m, mode)`` -> weights (default
    :func:`greedy_keep`)."""
    fit = fit or greedy_keep
    m = probs.shape[0]
    sign = 1.0 if mode == "max" else -1.0

    def metrics_of(weights, rows, into=None):
        return _metrics(weighted_mean(probs, weights, rows), target[rows], data,
                        into if into is not None else new_metrics(data, key, empty), owner[rows])

    def score_on(rows):
        return lambda weights: metrics_of(weights, rows).compute()[key]

    everything = np.arange(len(owner))
    uniform = [1.0] * m
    single = [1.0 if k == best else 0.0 for k in range(m)]
    scores = {"uniform": score_on(everything)(uniform), "best_member": score_on(everything)(single)}
    images = np.unique(owner)
    halves = [images[h] for h in split_halves(len(images), seed)]
    record = {"metric": key, "mode": mode, "images": int(len(images)), "pixels": int(len(owner)), "seed": seed,
              "members": list(names), "best_member": names[best]}
    half_weights = []
    if m > 1 and all(len(h) for h in halves):
        pooled = new_metrics(data, key, empty)
        rows = [np.flatnonzero(np.isin(owner, h)) for h in halves]
        for fit_rows, score_rows in ((rows[0], rows[1]), (rows[1], rows[0])):
            w = fit(score_on(fit_rows), m, mode)
            half_weights.append(w)
            metrics_of(w, score_rows, pooled)
        scores["fitted"] = pooled.compute()[key]
        final = fit(score_on(everything), m, mode)
        record["fitted_in_sample"] = score_on(everything)(final)
    else:
        scores["fitted"], final = math.nan, uniform
    record["scores"] = scores
    record["half_weights"] = half_weights
    record["fitted_weights"] = final

    def beats(a: str, b: str) -> bool:
        return not math.isnan(scores[a]) and (math.isnan(scores[b]) or sign * (scores[a] - scores[b]) > 0)

    if m == 1:
        shipped, reason = "uniform", "one member: nothing to combine"
    elif math.isnan(scores["fitted"]):
        shipped = "best_member" if beats("best_member", "uniform") else "uniform"
        other = "uniform" if shipped == "best_member" else "best_member"
        reason = (f"the holdout's {len(images)} image(s) cannot be split in two halves: nothing fitted; the "
                  f"{describe(shipped)} ({scores[shipped]:.4f}) {'beats' if shipped == 'best_member' else 'is not worse than'}"
                  f" the {describe(other)} ({scores[other]:.4f})")
    elif beats("fitted", "uniform") and beats("fitted", "best_member"):
        shipped = "fitted"
        reason = (f"cross-fitted {key} {scores['fitted']:.4f} beats the uniform average ({scores['uniform']:.4f}) "
                  f"and the best member ({scores['best_member']:.4f})")
    else:
        shipped = "best_member" if beats("best_member", "uniform") else "uniform"
        lost = [c for c in ("uniform", "best_member") if not beats("fitted", c)]
        reason = (f"the fitted combination ({scores['fitted']:.4f} cross-fitted) does not beat "
                  + " nor ".join(f"the {describe(c)} ({scores[c]:.4f})" for c in lost)
                  + f"; the {describe(shipped)} "
                  + (f"beats the uniform average ({scores['uniform']:.4f})" if shipped == "best_member"
                     else f"is not worse than the best member ({scores['best_member']:.4f})"))
    weights = {"uniform": uniform, "best_member": single, "fitted": final}[shipped]
    record.update(shipped=shipped, reason=reason, weights=weights)
    return weights, record


def describe(candidate: str) -> str:
    return {"uniform": "uniform average", "best_member": "best member", "fitted": "fitted combination"}[candidate]


def combine_on_holdout(ens, data, *, indices: list[int], metric: str, mode: str, best: int, empty: float = 1.0,
                       pixels_per_image: int = 4096, seed: int = 0) -> tuple[list[float], dict]:
    """:func:`decide_combination` of the members of ``ens`` (every fold's) on holdout images ``indices`` of
    ``data``, scored with the search's metric where sampled pixels can compute it
    (:func:`ensemble.selection.selection_metric`)."""
    key, mode, note = selection_metric(metric, mode, data.task)
    probs, target, owner = sample_member_probs(ens, data, indices, pixels_per_image, seed)
    weights, record = decide_combination(probs, target, owner=owner, data=data, key=key, mode=mode, best=best,
                                         names=[m.name for m in ens.members],
                                         seed=seed, empty=empty)
    record["note"] = note.replace("greedy selection", "the combination") if note else None
    record["pixels_per_image"] = pixels_per_image
    return weights, record


def shipped_members(members: list, weights: list[float] | None) -> list:
    """The members the bundle holds: those of positive weight, each with its weight (a member of
    weight 1 is the same object; None: every member, weight 1)."""
    if weights is None:
        return list(members)
    return [m if w == m.weight else dataclasses.replace(m, weight=float(w))
            for m, w in zip(members, weights, strict=True) if w > 0]


def no_holdout_record() -> dict:
    """What is recorded without a holdout: the ensemble-vs-best-member comparison is unknown."""
    return {"shipped": "uniform", "weights": None,
            "reason": ("no holdout: whether the average of every fold's members beats its best member is unknown "
                       "(out-of-fold rows cannot see that average); the uniform average is shipped. Keep images "
                       "aside to measure and decide it: --set folds.holdout=0.1")}


def summary(record: dict) -> str:
    """The decision in a few lines, for the ensemble step's output."""
    if record.get("weights") is None:
        return f"combination: {record['reason']}"
    s = record["scores"]
    lines = [f"combination on the holdout ({record['images']} images, {record['metric']} on sampled pixels): "
             f"uniform average {s['uniform']:.4f}, best member {record['best_member']} {s['best_member']:.4f}, "
             + (f"fitted keep/drop {s['fitted']:.4f} cross-fitted on two halves" if not math.isnan(s["fitted"])
                else "fitted keep/drop not fitted")
             + (f" ({record['fitted_in_sample']:.4f} in-sample)" if "fitted_in_sample" in record else "")]
    kept = [n for n, w in zip(record["members"], record["weights"]) if w > 0]
    lines.append(f"shipped: {describe(record['shipped'])} ({len(kept)} of {len(record['members'])} members): "
                 f"{record['reason']}")
    if record.get("note"):
        lines.append(record["note"])
    return "\n".join(lines)
