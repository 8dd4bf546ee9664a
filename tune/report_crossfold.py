"""The report's cross-fold view: which settings won on every fold, and which only on one.

Each fold is searched separately, so a setting the best trials of every fold share is a finding
about the data, while one that wins a single fold may be luck of that split. Two tables, from
``trials.csv`` alone: the ``top`` best trials of each fold with their parameters, and one row per
parameter saying where each value ranked. A racing run (tune/racing.py) adds a third: each
configuration's score on every fold it ran and its mean.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from trainables.runfiles import FINISHED, PARAM_PREFIX, race_configs, score_column
from tune.report_html import Text, as_number, fmt, table


def _score(row: dict, metric: str) -> float:
    value = as_number(row.get(score_column(metric), ""))
    return math.nan if value is None else float(value)


def top_per_fold(rows: list[dict], metric: str, mode: str, top: int = 3) -> dict[int, list[dict]]:
    """The ``top`` finished trials of each fold, best first (ties: fewer epochs)."""
    sign = -1.0 if mode == "max" else 1.0
    out: dict[int, list[dict]] = {}
    for row in rows:
        if row.get("status") in FINISHED and not math.isnan(_score(row, metric)):
            out.setdefault(int(row["fold"]), []).append(row)
    return {f: sorted(r, key=lambda r: (sign * _score(r, metric), as_number(r.get("epochs")) or 0))[:top]
            for f, r in sorted(out.items())}


def param_columns(rows: Iterable[dict]) -> list[str]:
    """The ``param:`` columns some trial set (a conditional parameter is empty where inactive)."""
    cols: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(PARAM_PREFIX) and value not in ("", None):
                cols[key] = None
    return list(cols)


def is_numeric(values: list) -> bool:
    """A parameter is continuous when every value is a number and it took more than 4 values
    (a choice of 3 batch sizes is read as categories)."""
    numbers = [as_number(v) for v in values if v not in ("", None)]
    return bool(numbers) and all(n is not None for n in numbers) and len(set(numbers)) > 4


def _folds_text(folds: list[int], k: int) -> str:
    if len(folds) == k and k > 1:
        return "every fold"
    names = ", ".join(str(f) for f in folds)
    return f"fold {names} only" if len(folds) == 1 else f"folds {names}"


def parameter_summary(top: dict[int, list[dict]], all_rows: list[dict]) -> list[list[str]]:
    """Per parameter: the best trial's value on each fold, and a verdict. Categorical: each value
    that was best somewhere, and where it was best / in the top. Continuous: the range of the top
    trials on each fold, and whether those ranges overlap across folds."""
    folds = sorted(top)
    k = len(folds)
    rows = []
    for col in param_columns([r for trials in top.values() for r in trials]):
        best = {f: top[f][0].get(col, "") for f in folds}
        if is_numeric([r.get(col, "") for r in all_rows]):
            ranges = {}
            for f in folds:
                values = [as_number(r.get(col)) for r in top[f] if as_number(r.get(col)) is not None]
                if values:
                    ranges[f] = (min(values), max(values))
            overlap = bool(ranges) and max(lo for lo, _ in ranges.values()) <= min(hi for _, hi in ranges.values())
            verdict = ("top trials overlap on every fold: " if overlap and k > 1 else "top trials per fold: ") + \
                "; ".join(f"fold {f} {fmt(lo)}–{fmt(hi)}" for f, (lo, hi) in ranges.items())
        else:
            values = sorted({str(v) for v in best.values() if v not in ("", None)})
            parts = []
            for value in values:
                won = [f for f in folds if str(best[f]) == value]
                near = [f for f in folds if any(str(r.get(col, "")) == value for r in top[f])]
                part = f"{fmt(value)}: best on {_folds_text(won, k)}"
                if near != won:
                    part += f", in the top {len(top[folds[0]])} on {_folds_text(near, k)}"
                parts.append(part)
            if len(values) == 1 and len([f for f in folds if best[f] not in ("", None)]) == k:
                parts = [f"{fmt(values[0])} on every fold" if k > 1 else fmt(values[0])]
            verdict = "; ".join(parts) or "inactive in the best trials"
        rows.append([col[len(PARAM_PREFIX):], *(fmt(best[f]) for f in folds), verdict])
    return rows


def race_table_rows(rows: list[dict], metric: str, mode: str, top: int = 20) -> tuple[list, list[list]]:
    """(header, rows) of the racing table: per configuration (best first, :func:`race_configs`) its score on
    each fold (``stopped 0.41``: stopped early there, out of the race; a dash: not run), the folds it
    completed and its mean over them, and its parameters."""
    configs = race_configs(rows, metric, mode)[:top]
    folds = sorted({int(r["fold"]) for r in rows if r.get("fold") not in (None, "")})
    cols = param_columns([r for c in configs for r in c["rows"].values()])
    out = []
    for i, c in enumerate(configs):
        cells = []
        for f in folds:
            row = c["rows"].get(f)
            score = _score(row, metric) if row else math.nan
            cells.append(score if f in c["scores"] else f"stopped {fmt(score)}" if row else "")
        first = c["rows"][min(c["rows"])]
        out.append([i + 1, Text(c["config_id"]), *cells, len(c["scores"]), c["mean"],
                    *(first.get(col, "") for col in cols)])
    header = ["rank", "config", *(f"fold {f}" for f in folds), "folds", f"mean {metric}",
              *(c[len(PARAM_PREFIX):] for c in cols)]
    return header, out


def racing_html(rows: list[dict], metric: str, mode: str, top: int = 20) -> str:
    """The racing section (empty for a run without racing)."""
    header, body = race_table_rows(rows, metric, mode, top)
    if not body:
        return ""
    return (f"<h3>Racing: configurations across folds</h3><p class='note'>Each configuration trained on fold 0 "
            f"and earned the next fold while its mean {metric} over the folds it ran ranked in the top 1/eta of "
            f"those that had run as many (tune/racing.py). Ranked by folds completed, then mean; the best "
            f"{len(body)} shown.</p>{table(header, body)}")


def crossfold_html(rows: list[dict], metric: str, mode: str, top: int = 3) -> str:
    """The cross-fold section: per-parameter summary, then the top configurations of each fold."""
    ranked = top_per_fold(rows, metric, mode, top)
    if not ranked:
        return ""
    folds = sorted(ranked)
    cols = param_columns([r for trials in ranked.values() for r in trials])
    summary = table(["parameter", *(f"fold {f} best" for f in folds), "across folds"],
                    parameter_summary(ranked, rows))
    configs = table(["fold", "rank", "trial", metric, "epochs", *(c[len(PARAM_PREFIX):] for c in cols)],
                    [[f, i + 1, Text(r["trial_id"]), _score(r, metric), r.get("epochs", ""),
                      *(r.get(c, "") for c in cols)] for f in folds for i, r in enumerate(ranked[f])])
    return (f"<h2>Across folds</h2><p class='note'>Each fold is searched on its own: a setting the best trials "
            f"of every fold share is a property of the data, one that wins a single fold may be the luck of that "
            f"split. Top {top} finished trials per fold by {metric} ({mode}).</p>"
            f"{summary}<h3>Top {top} configurations per fold</h3>{configs}{racing_html(rows, metric, mode)}")
