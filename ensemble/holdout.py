"""The ensemble scored on annotated images no decision was fitted on: the holdout (``folds.holdout``).

Out-of-fold rows cannot show what averaging every fold's members does: each out-of-fold image is
predicted by one fold's members only, while prediction averages all of them, and the thresholds
were tuned on per-fold ensembles. On the holdout every image goes through exactly what
``--predict`` runs (every fold's members, TTA, original resolution), and the rows are:

(a) the best single member by validation score, (b) the ensemble the bundle ships (the
combination of members decided on the holdout, :mod:`ensemble.combine`: uniform average, best
member or fitted keep/drop) at default decisions, (c) with the tuned thresholds (and minimum
areas) fitted on all out-of-fold predictions, (d) with the CRF when one was fitted. ``applied``
names the row prediction applies (the steps that were kept), so the holdout also measures whether
thresholds tuned on per-fold ensembles transfer to the average of all folds' members.
"""
from __future__ import annotations

import dataclasses
import logging

from ensemble.bundle import rule_refiner, rule_thresholds
from ensemble.crossfit import kept_rule, prediction_rule
from ensemble.infer import score_rows
from ensemble.predictor import Ensemble, best_member_index
from trainables.data import SegData

logger = logging.getLogger(__name__)


def applied_row(post: dict, steps: dict) -> str:
    """Which row prediction applies, from the keep decisions."""
    crf = post.get("crf")
    if crf and crf["kept"]:
        return "crf"
    return "tuned" if steps.get("thresholds", {}).get("kept") else "ensemble"


def holdout_rules(thresholds: dict, post: dict, steps: dict, max_size: int | None) -> dict:
    """Row key -> decision rule (``{"thresholds", "crf", "max_size"}``, as the bundle records one) of rows
    (c) and (d). The row prediction applies gets exactly the bundle's rule
    (:func:`ensemble.crossfit.prediction_rule`); a step not kept is scored as fitted, to show why."""
    applied = applied_row(post, steps)
    rules = {"tuned": {"thresholds": kept_rule(thresholds, steps) or thresholds, "crf": None, "max_size": max_size}}
    crf = post.get("crf")
    if crf:
        rules["crf"] = {"thresholds": crf["thresholds"], "crf": crf["params"], "max_size": max_size}
    if applied != "ensemble":
        rules[applied] = prediction_rule(thresholds, {**post, "steps": steps}, max_size)
    return rules


def everyone(ensembles: dict[int, Ensemble], weights: list[float] | None = None) -> Ensemble:
    """Every fold's members in one ensemble (the bundle's order), weighted by ``weights`` (None: 1 each;
    a member of weight 0 stays, so that row (a) can still be any member, but is not averaged)."""
    first = next(iter(ensembles.values()))
    members = [m for e in ensembles.values() for m in e.members]
    if weights is not None:
        members = [dataclasses.replace(m, weight=float(w)) for m, w in zip(members, weights, strict=True)]
    return Ensemble(members, first.tta, first.voting, first.device)


def holdout_indices(data: SegData, holdout: list[str]) -> list[int]:
    aside = set(holdout)
    return [i for i, image_id in enumerate(data.ids) if image_id in aside]


def holdout_step(ensembles: dict[int, Ensemble], data: SegData, *, holdout: list[str], thresholds: dict, post: dict,
                 steps: dict, mode: str, max_size: int | None, batch_size: int = 8, refine=None,
                 weights: list[float] | None = None, combination: str = "uniform") -> dict:
    """Score the holdout images with every fold's members: rows (a)-(d) and the row prediction applies.
    Rows (b)-(d) average the members with ``weights`` (the shipped combination, named ``combination``;
    None: the uniform average). Each rule is applied as prediction applies it
    (:func:`ensemble.bundle.rule_thresholds`, areas scaled from ``max_size`` to each image).
    ``refine(probs, image, params)``: the CRF (default :func:`ensemble.crf.refine`)."""
    ens = everyone(ensembles, weights)
    rules = holdout_rules(thresholds, post, steps, max_size)
    index = holdout_indices(data, holdout)
    best = best_member_index(ens.members, mode)
    rows = score_rows(ens, data, index, rule_thresholds(rules["tuned"]), None, best, batch_size)
    if "crf" in rules:
        rows["crf"] = score_rows(ens, data, index, rule_thresholds(rules["crf"]),
                                 rule_refiner(rules["crf"], refine), None, batch_size)["tuned"]
    rows["images"] = len(index)
    rows["single_member"] = ens.members[best].name
    rows["applied"] = applied_row(post, steps)
    rows["combination"] = combination  # what rows (b)-(d) average: what the bundle ships
    return rows
