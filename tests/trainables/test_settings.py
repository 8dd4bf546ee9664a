"""Trial settings are checked once (trainables/config.py): the search-space loader and training
refuse a bad value with the same message, and the space module keeps only the search language."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from trainables.config import MEANINGS, defaults, known_keys, setting_problem, validate_config
from trainables.errors import ConfigError
from trainables.loop import FoldTrainer
from tune.space import DRIVER_SECTIONS, check_classes, load_space

LR = {"optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]}}
BAD = [  # a setting and a value every check must refuse
    ("augment.copy_paste", 1.5),
    ("augment.copy_paste_max", 0),
    ("augment.copy_paste_classes", 0),
    ("augment.copy_paste_scale", [2.0, 0.5]),
    ("train.oversample", -1),
    ("train.oversample_cap", 0.5),
    ("train.boundary_iou", "sometimes"),
    ("train.image_size", [0, 64]),
    ("loss.class_weights", "inverted"),
    ("loss.class_weights", [1, 0, 2]),
    ("data.crowd", "drop"),
    ("data.background", 3),
    ("folds.k", 1),
    ("folds.holdout", 0.7),
    ("metrics.empty", 0),
]


def space_problem(tmp_path: Path, doc: dict) -> ConfigError:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_space(str(path), tmp_path)
    return info.value


def training_problem(sample, cfg: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        FoldTrainer(cfg, sample, list(range(8)), list(range(8, 12)), fold=0)
    return info.value


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_space_and_training_refuse_a_setting_in_the_same_words(tmp_path, sample, key, value):
    trained = training_problem(sample, tiny_config(**{key: value}))
    assert trained.key == key and trained.problem == setting_problem(key, value)
    fixed = space_problem(tmp_path, {"fixed": {key: value}, "space": LR})
    assert (fixed.key, fixed.problem) == (f"fixed.{key}", trained.problem)
    searched = space_problem(tmp_path, {"space": {key: {"choice": [defaults()[key.split(".")[0]][key.split(".")[1]],
                                                                   value]}}})
    assert searched.key == f"space.{key}"
    if key.split(".")[0] in DRIVER_SECTIONS:  # the driver reads these once: not searchable at all
        assert searched.problem.startswith(f"{key.split('.')[0]}.* settings cannot be searched")
    else:
        assert searched.problem == f"choice {value!r}: {trained.problem}"


def test_class_weight_vectors_need_one_weight_per_class_in_both(tmp_path, sample):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"fixed": {"loss.class_weights": [1, 1, 2]}, "space": LR}))
    with pytest.raises(ConfigError) as info:
        check_classes(load_space(str(path), tmp_path), sample.num_classes)
    trained = training_problem(sample, tiny_config(**{"loss.class_weights": [1, 1, 2]}))
    assert info.value.problem == trained.problem
    assert f"the data has {sample.num_classes} classes, got 3 weights" in trained.problem


def test_group_strategy_needs_a_regex_in_both(tmp_path, sample):
    trained = training_problem(sample, tiny_config(**{"folds.strategy": "group"}))
    fixed = space_problem(tmp_path, {"fixed": {"folds.strategy": "group"}, "space": LR})
    assert (fixed.key, fixed.problem) == ("fixed.folds.group_regex", trained.problem)
    assert trained.key == "folds.group_regex"


def test_space_module_keeps_only_the_search_language():
    """The space modules name no trial setting beyond the few their language needs (ASHA owns the
    epochs, choice_by models, per_class weights): every value check lives in trainables/config."""
    import tune.distributions
    import tune.space

    for name in ("value_problem", "ALLOWED", "MINIMUM", "NULLABLE", "CLASS_WEIGHT_SCHEMES"):
        assert not hasattr(tune.space, name), name
    named = set()
    for module in (tune.space, tune.distributions):
        tree = ast.parse(Path(module.__file__).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        named |= {key for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  for key in known_keys() if key in node.value}
    language = {"train.epochs", "model.arch", "model.encoder", "loss.class_weights",
                "folds.k",  # search.search_folds names folds that must exist
                "optimizer.lr"}  # the example in "nothing to search: add parameters, e.g. optimizer.lr"
    assert named <= language, named


def test_every_setting_has_a_meaning_and_valid_default():
    assert set(MEANINGS) == set(known_keys())
    assert all(MEANINGS.values())
    validate_config(defaults())
