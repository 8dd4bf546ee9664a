"""thresholds: the streaming histogram threshold tuners against brute force, in time and peak memory.

Synthetic out-of-fold predictions (fixed seed): 12 classes, N images of 96x128 (N = 40 full, 10
quick); multiclass truth from smooth random fields (regions), softmax probabilities from noisy
logits favouring the truth with per-class biases (so some classes are over-predicted and tuned
thresholds matter); multilabel truth from thresholded fields (overlapping classes), sigmoid
probabilities likewise. Both sides use the same candidate grid, 101 thresholds (k/100; tuner
``bins=100``):

* **multilabel**: ``MultilabelThresholdTuner.update`` per image + ``fit`` vs
  ``brute_force_multilabel`` (all pixels stored, every threshold applied to all of them);
* **multiclass**: ``MulticlassThresholdTuner.update`` per image + ``fit`` (coordinate ascent over
  classes until stable) vs ONE coordinate sweep of ``brute_force_multiclass_class`` over the 11
  non-background classes with the other thresholds at the tuner's answer (``apply_multiclass`` on
  every image for every candidate). A full brute-force ascent needs at least one such sweep, so
  the speed-up shown is a lower bound. Each class's brute-force optimum is checked against the
  tuner's threshold (``agree``).

Peak memory is Python's tracemalloc peak (numpy reports its buffers to it) during update+fit, or
during the brute force, with the data itself allocated beforehand; the tuners' peak is also
measured with N/4 images to show it does not grow with the pixels. Timing runs are separate from
the traced runs and alternate between the two sides.

In full mode the multilabel pair is also timed once at the tuners' default grid (1001 thresholds,
``bins=1000``), for information.

Targets: tuner >= 20x faster than brute force (grid 101); tuner peak memory at N vs N/4 images <= 1.1x.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np

from bench import common  # noqa: E402

NAME = "thresholds"
TARGET = "tuner >= 20x faster than brute force; tuner memory flat in pixels"
CLASSES, HEIGHT, WIDTH, BINS = 12, 96, 128, 100
DEFAULT_BINS = 1000  # MulticlassThresholdTuner / MultilabelThresholdTuner default
SPEEDUP = 20.0
FLAT = 1.1


def synthetic(n: int, seed: int = 0) -> dict:
    """Multiclass (probs (C,H,W) float32, labels (H,W)) and multilabel (probs, {0,1} targets) images."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    bias = rng.normal(0, 0.6, CLASSES)[:, None, None]
    mc_probs, mc_truth, ml_probs, ml_truth = [], [], [], []
    for _ in range(n):
        field = ndimage.gaussian_filter(rng.normal(size=(CLASSES, HEIGHT // 8, WIDTH // 8)), (0, 1, 1))
        field = np.kron(field, np.ones((1, 8, 8)))
        truth = field.argmax(0)
        logits = 2.0 * (np.arange(CLASSES)[:, None, None] == truth) + bias + rng.normal(0, 1.0, field.shape)
        e = np.exp(logits - logits.max(0, keepdims=True))
        mc_probs.append((e / e.sum(0, keepdims=True)).astype(np.float32))
        mc_truth.append(truth.astype(np.int64))
        target = field > np.quantile(field, 0.7, axis=(1, 2), keepdims=True)
        z = 1.5 * (2 * target - 1) + bias + rng.normal(0, 1.2, field.shape)
        ml_probs.append((1 / (1 + np.exp(-z))).astype(np.float32))
        ml_truth.append(target.astype(np.uint8))
    return {"mc": (mc_probs, mc_truth), "ml": (ml_probs, ml_truth)}


def tune_multilabel(probs, truth, bins: int = BINS) -> dict:
    from ensemble.thresholds import MultilabelThresholdTuner

    tuner = MultilabelThresholdTuner(CLASSES, bins=bins, metric="dice")
    for p, t in zip(probs, truth):
        tuner.update(p, t)
    return tuner.fit()


def tune_multiclass(probs, truth) -> dict:
    from ensemble.thresholds import MulticlassThresholdTuner

    tuner = MulticlassThresholdTuner(CLASSES, fallback=0, bins=BINS)
    for p, t in zip(probs, truth):
        tuner.update(p, t)
    return tuner.fit()


def brute_multilabel(probs, truth, bins: int = BINS):
    from ensemble.thresholds import brute_force_multilabel, threshold_grid

    return brute_force_multilabel(probs, truth, threshold_grid(bins), metric="dice")


def brute_multiclass_sweep(probs, truth, thresholds: list[float]) -> list[tuple[float, float]]:
    from ensemble.thresholds import brute_force_multiclass_class, threshold_grid

    grid = threshold_grid(BINS)
    return [brute_force_multiclass_class(probs, truth, c, grid, thresholds, fallback=0) for c in range(1, CLASSES)]


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def peak_mb(fn, *args) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(quick: bool) -> dict:
    n = 10 if quick else 40
    small = max(2, n // 4)
    reps, brute_mc_reps = (2, 1) if quick else (3, 1)
    data = synthetic(n)
    ml_p, ml_t = data["ml"]
    mc_p, mc_t = data["mc"]
    common.log(f"{NAME}: {n} images of {CLASSES}x{HEIGHT}x{WIDTH}, grid {BINS + 1}")

    t_ml, b_ml, t_mc, b_mc = [], [], [], []
    ml_tuned = mc_tuned = ml_brute = mc_brute = None
    for rep in range(reps):  # alternate the sides
        order = ("tuner", "brute") if rep % 2 == 0 else ("brute", "tuner")
        for side in order:
            if side == "tuner":
                s, ml_tuned = timed(tune_multilabel, ml_p, ml_t)
                t_ml.append(s)
                s, mc_tuned = timed(tune_multiclass, mc_p, mc_t)
                t_mc.append(s)
            else:
                s, ml_brute = timed(brute_multilabel, ml_p, ml_t)
                b_ml.append(s)
        common.log(f"  rep {rep}: multilabel tuner {t_ml[-1]:.3f}s brute {b_ml[-1]:.2f}s; multiclass tuner {t_mc[-1]:.3f}s")
    for rep in range(brute_mc_reps):
        s, mc_brute = timed(brute_multiclass_sweep, mc_p, mc_t, mc_tuned["thresholds"])
        b_mc.append(s)
        common.log(f"  multiclass brute-force sweep {s:.1f}s")

    default_grid = {}
    if not quick:  # the tuner's default grid (bins=1000): brute force is 10x dearer, the tuner barely changes
        default_grid["tuner"], _ = timed(tune_multilabel, ml_p, ml_t, DEFAULT_BINS)
        default_grid["brute"], _ = timed(brute_multilabel, ml_p, ml_t, DEFAULT_BINS)
        common.log(f"  multilabel, grid {DEFAULT_BINS + 1}: tuner {default_grid['tuner']:.3f}s, "
                   f"brute {default_grid['brute']:.1f}s")

    ml_agree = int(np.sum(np.isclose(ml_brute[0], ml_tuned["thresholds"])))
    mc_agree = sum(abs(t - mc_tuned["thresholds"][c]) < 1e-9 or abs(score - mc_tuned["miou"]) < 1e-9
                   for c, (t, score) in enumerate(mc_brute, start=1))

    mem = {
        "tuner_ml": peak_mb(tune_multilabel, ml_p, ml_t),
        "tuner_ml_small": peak_mb(tune_multilabel, ml_p[:small], ml_t[:small]),
        "brute_ml": peak_mb(brute_multilabel, ml_p, ml_t),
        "brute_ml_small": peak_mb(brute_multilabel, ml_p[:small], ml_t[:small]),
        "tuner_mc": peak_mb(tune_multiclass, mc_p, mc_t),
        "tuner_mc_small": peak_mb(tune_multiclass, mc_p[:small], mc_t[:small]),
        "brute_mc_one_class": peak_mb(lambda: brute_multiclass_sweep(mc_p[:small], mc_t[:small],
                                                                     mc_tuned["thresholds"])[:1]),
    }
    common.log(f"  peak MB: {({k: round(v, 2) for k, v in mem.items()})}")
    speed_ml = common.safe_ratio(common.median(b_ml), common.median(t_ml))
    speed_mc = common.safe_ratio(common.median(b_mc), common.median(t_mc))
    flat_ml = common.safe_ratio(mem["tuner_ml"], mem["tuner_ml_small"])
    flat_mc = common.safe_ratio(mem["tuner_mc"], mem["tuner_mc_small"])
    rows = [
        common.row(f"multilabel time, {n} images (ratio: B/A)", common.side("tuner", t_ml, "s"),
                   common.side("brute force", b_ml, "s"), speed_ml, f">= {SPEEDUP:.0f}x", speed_ml >= SPEEDUP),
        common.row(f"multiclass time, {n} images (ratio: B/A)", common.side("tuner", t_mc, "s"),
                   common.side("brute 1 sweep", b_mc, "s"), speed_mc, f">= {SPEEDUP:.0f}x", speed_mc >= SPEEDUP),
        *([common.row(f"multilabel time, grid {DEFAULT_BINS + 1} (tool default)",
                      common.side("tuner", [default_grid["tuner"]], "s"),
                      common.side("brute force", [default_grid["brute"]], "s"),
                      common.safe_ratio(default_grid["brute"], default_grid["tuner"]), "info")] if default_grid else []),
        common.row(f"multilabel peak memory, {n} images", common.side("tuner", [mem["tuner_ml"]], "MB"),
                   common.side("brute force", [mem["brute_ml"]], "MB"),
                   common.safe_ratio(mem["brute_ml"], mem["tuner_ml"]), "info"),
        common.row(f"tuner peak memory, {n} vs {small} images (multilabel)",
                   common.side(f"{n} img", [mem["tuner_ml"]], "MB"),
                   common.side(f"{small} img", [mem["tuner_ml_small"]], "MB"), flat_ml, f"<= {FLAT}", flat_ml <= FLAT),
        common.row(f"tuner peak memory, {n} vs {small} images (multiclass)",
                   common.side(f"{n} img", [mem["tuner_mc"]], "MB"),
                   common.side(f"{small} img", [mem["tuner_mc_small"]], "MB"), flat_mc, f"<= {FLAT}", flat_mc <= FLAT),
        common.row(f"brute force peak memory, {n} vs {small} images (multilabel)",
                   common.side(f"{n} img", [mem["brute_ml"]], "MB"),
                   common.side(f"{small} img", [mem["brute_ml_small"]], "MB"),
                   common.safe_ratio(mem["brute_ml"], mem["brute_ml_small"]), "info"),
    ]
    details = {"images": n, "small_images": small, "classes": CLASSES, "size": [HEIGHT, WIDTH], "grid": BINS + 1,
               "times_s": {"tuner_ml": t_ml, "brute_ml": b_ml, "tuner_mc": t_mc, "brute_mc_sweep": b_mc,
                           "default_grid_multilabel": default_grid},
               "peak_mb": mem, "multilabel_thresholds_agree": f"{ml_agree}/{CLASSES}",
               "multiclass_brute_force_agrees_with_tuner": f"{mc_agree}/{CLASSES - 1}",
               "multiclass_miou": {"default": mc_tuned["default_miou"], "tuned": mc_tuned["miou"]},
               "multilabel_dice": {"default": float(np.nanmean(ml_tuned["default_score_per_class"])),
                                   "tuned": float(np.nanmean(ml_tuned["score_per_class"]))}}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
