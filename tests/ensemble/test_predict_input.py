"""``ensemble/predict.py`` refuses bad input in one line, exit 2, before any prediction, writing nothing.

The bundle is one untrained tiny member (what it predicts does not matter here); inputs are a few
small random images.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config, write_image
from tests.ensemble.test_ensemble import _env, _one_error_line
from trainables.checkpoint import make_checkpoint, save_checkpoint
from trainables.models import build_model

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["background", "a", "b"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from ensemble.bundle import write_bundle
    from ensemble.predictor import load_member

    tmp = tmp_path_factory.mktemp("bundle")
    cfg = tiny_config()
    torch.manual_seed(0)
    m = cfg["model"]
    model = build_model(m["arch"], m["encoder"], len(NAMES), weights=None, kwargs=m["kwargs"])
    path = save_checkpoint(make_checkpoint(model.state_dict(), cfg, NAMES, "multiclass", "val_miou", 0.5, 1, 0),
                           tmp / "m0" / "model.pt")
    member = load_member(path, "m0", torch.device("cpu"))
    return write_bundle(tmp / "bundle", [member], tta="none", voting="soft", rule={"thresholds": None},
                        metric="val_miou", mode="max",
                        data={"has_background": True})


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    for k, name in enumerate(["a.png", "b.png", "c.png"]):
        write_image(folder / name, 24, 32, seed=k)
    return folder


def _tree(root: Path) -> dict:
    """Every path under ``root`` (itself when a file) with its bytes: what the command may not change."""
    if root.is_file():
        return {root: root.read_bytes()}
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))} if root.exists() else {}


def _refused(argv: list, capsys, out: Path) -> str:
    """Run main(argv) in this process: exit 2, one error line, ``out`` as it was; the line."""
    from ensemble.predict import main

    before = _tree(out)
    existed = out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    line = _one_error_line(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err))
    assert out.exists() == existed and _tree(out) == before, f"{out} changed"
    return line


@pytest.mark.parametrize("ray", [False, True], ids=["local", "ray"])
def test_two_images_with_one_stem_are_refused(bundle, images, tmp_path, capsys, ray):
    write_image(images / "b.jpg", 24, 32, seed=9)  # b.png and b.jpg would write one masks/b.png
    out = tmp_path / "out"
    line = _refused(["--bundle", bundle, "--images", images, "--out", out, *(["--ray"] if ray else [])], capsys, out)
    assert str(images) in line and "'b'" in line and "b.jpg" in line and "b.png" in line, line


@pytest.mark.parametrize("ray", [False, True], ids=["local", "ray"])
def test_out_naming_a_file_is_refused(bundle, images, tmp_path, capsys, ray):
    out = tmp_path / "preds.txt"
    out.write_text("keep me\n")
    extra = ["--ray"] if ray else []
    line = _refused(["--bundle", bundle, "--images", images, "--out", out, *extra], capsys, out)
    assert line.startswith(f"error: {out}:") and "not a folder" in line, line
    # a folder below a file: the same, naming the file
    line = _refused(["--bundle", bundle, "--images", images, "--out", out / "sub", *extra], capsys, out)
    assert line.startswith(f"error: {out}:") and "not a folder" in line, line


@pytest.mark.parametrize("ray", [False, True], ids=["local", "ray"])
def test_batch_size_below_one_is_refused(bundle, images, tmp_path, capsys, ray):
    out = tmp_path / "out"
    for size in (0, -2):
        line = _refused(["--bundle", bundle, "--images", images, "--out", out, "--batch-size", size,
                         *(["--ray"] if ray else [])], capsys, out)
        assert line == f"error: command line: --batch-size: must be at least 1, got {size}", line


@pytest.mark.parametrize("ray", [False, True], ids=["local", "ray"])
def test_sample_submission_that_does_not_fit_is_refused_before_any_mask(bundle, images, tmp_path, capsys, ray):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier file\n")
    extra = ["--ray"] if ray else []
    # one row per image, but the bundle has three classes: which one is the mask?
    single = tmp_path / "single.csv"
    single.write_text("ImageId,EncodedPixels\na,\nb,\nc,\n")
    line = _refused(["--bundle", bundle, "--images", images, "--out", out, "--sample-submission", single, *extra],
                    capsys, out)
    assert line.startswith(f"error: {single}:") and "which one is the mask" in line, line
    # a row of an image that is not among the inputs
    other = tmp_path / "other.csv"
    other.write_text("id,class,rle\n" + "".join(f"{i},{c},\n" for i in ("a", "b", "c", "zzz") for c in NAMES))
    line = _refused(["--bundle", bundle, "--images", images, "--out", out, "--sample-submission", other, *extra],
                    capsys, out)
    assert line.startswith(f"error: {other}:") and "'zzz'" in line and str(images) in line, line
    # classes the bundle does not have (the first rows are fine)
    late = tmp_path / "late.csv"
    late.write_text("id,class,rle\na,0,\nb,1,\nc,2,\na,7,\n")
    line = _refused(["--bundle", bundle, "--images", images, "--out", out, "--sample-submission", late, *extra],
                    capsys, out)
    assert line.startswith(f"error: {late}:") and "not the bundle's" in line, line


@pytest.mark.slow
def test_cli_subprocess_refuses_an_out_file_in_one_line(bundle, images, tmp_path):
    out = tmp_path / "preds.txt"
    out.write_text("keep me\n")
    proc = subprocess.run([sys.executable, str(ROOT / "ensemble" / "predict.py"), "--bundle", str(bundle),
                           "--images", str(images), "--out", str(out)], cwd=tmp_path, env=_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert line.startswith(f"error: {out}:") and "Traceback" not in proc.stderr
    assert out.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["images", "preds.txt"]


def test_good_input_still_predicts(bundle, images, tmp_path, capsys):
    """The checks refuse only what they should: the same folder and a fitting sample predict."""
    from ensemble.predict import main

    sample = tmp_path / "sample.csv"
    sample.write_text("id,class,rle\n" + "".join(f"{i},{c},\n" for i in ("c", "a") for c in NAMES))
    out = tmp_path / "out"
    main(["--bundle", str(bundle), "--images", str(images), "--out", str(out), "--batch-size", "2",
          "--sample-submission", str(sample)])
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png", "c.png"]
    rows = (out / "submission.csv").read_text().splitlines()
    assert rows[0] == "id,class,rle" and [r.split(",")[0] for r in rows[1:]] == ["c"] * 3 + ["a"] * 3
