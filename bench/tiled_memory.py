"""tiled_memory: does sliding-window ensemble inference keep one probability map, whatever the
number of members? Peak memory of predicting one large image with 1 and with 8 members.

Members are the tiny Unet (resnet18, depth 3, decoder [32, 16, 8]), random init, 12 classes,
marked as trained on 256x256 native-resolution crops (``augment.random_crop``): they predict by
sliding windows (overlap 0.5, Gaussian weights; trainables/preprocess.py). The image is a generated
grayscale PNG read as 3 channels (``trainables.data.read_image``), 1024x1024 and 2048x2048 (the
hand X-ray size; ``--quick``: 512x512); CPU, one torch thread.

Each measurement runs in a fresh Python process: the members are built and run once on one
window (warm-up), the peak is reset (``/proc/self/clear_refs``), the process's resident memory
is read (``VmRSS`` of /proc/self/status), one ``Ensemble.predict_batch`` runs,
and the peak (``VmHWM``) minus that baseline is the inference's own memory: the image, its
(C, H, W) float32 probability map and running sum, and one window's work. Members stacked into a
(M, C, H, W) tensor (as ``predict_batch`` did before) would need M maps: shown for context.

Target: peak with 8 members <= 1.2 x peak with 1 member, at every image size.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from bench import common  # noqa: E402

NAME = "tiled_memory"
TARGET = "peak inference memory, 8 members <= 1.2 x 1 member"
RATIO = 1.2
CLASSES, CROP = 12, [256, 256]

CHILD = r"""
import json, sys, time
import numpy as np, torch
from PIL import Image
torch.set_num_threads({threads})
from ensemble.predictor import Ensemble, Member
from trainables.data import read_image
from trainables.models import build_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

size, members, path = {size}, {members}, "{path}"
gray = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
Image.fromarray(gray, mode="L").save(path)
image = read_image(path)
ms = []
for k in range(members):
    torch.manual_seed(k)
    model = build_model("Unet", "resnet18", {classes}, weights=None,
                        kwargs={{"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}).eval()
    ms.append(Member(f"m{{k}}", 0, model, tuple({crop}), "multiclass", [str(c) for c in range({classes})], 0.5, {{}},
                     input="tiles", max_size=None))
ens = Ensemble(ms, device="cpu")
ens.predict_batch([image[:{crop}[0], :{crop}[1]].copy()])  # warm-up: one window, allocator pools and kernels ready
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
base = status("VmRSS")
start = time.perf_counter()
probs = ens.predict_batch([image])[0]
seconds = time.perf_counter() - start
print(json.dumps({{"peak": status("VmHWM") - base, "base": base, "seconds": seconds, "shape": list(probs.shape)}}))
"""


def measure(size: int, members: int, tmp) -> dict:
    code = CHILD.format(threads=common.THREADS, size=size, members=members, path=tmp / f"img{size}.png",
                        classes=CLASSES, crop=CROP)
    proc = subprocess.run([sys.executable, "-c", code], cwd=common.ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {size}px x {members} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict:
    sizes = [512] if quick else [1024, 2048]
    reps = 1 if quick else 2
    rows, details = [], {"crop": CROP, "classes": CLASSES, "threads": common.THREADS, "runs": []}
    with common.scratch("tiled") as tmp:
        for size in sizes:
            peaks = {1: [], 8: []}
            for rep in range(reps):
                for m in ((1, 8) if rep % 2 == 0 else (8, 1)):
                    t = time.perf_counter()
                    res = measure(size, m, tmp)
                    peaks[m].append(res["peak"] / 2**20)
                    details["runs"].append({"size": size, "members": m, **res})
                    common.log(f"{NAME}: {size}x{size}, {m} members: peak +{res['peak'] / 2**20:.0f} MB "
                               f"({res['seconds']:.1f}s predict, {time.perf_counter() - t:.0f}s process)")
            ratio = common.safe_ratio(common.median(peaks[8]), common.median(peaks[1]))
            prob_map = CLASSES * size * size * 4 / 2**20
            rows.append(common.row(f"peak memory {size}x{size} (probability map {prob_map:.0f} MB)",
                                   common.side("8 members", peaks[8], "MB"), common.side("1 member", peaks[1], "MB"),
                                   ratio, f"<= {RATIO}", ratio is not None and ratio <= RATIO))
            rows.append(common.row(f"stacked (M, C, H, W) maps at {size}x{size}, for context",
                                   common.side("8 maps", [8 * prob_map], "MB"), common.side("1 map", [prob_map], "MB"),
                                   8.0, "info"))
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
