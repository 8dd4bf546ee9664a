"""Search-space files: validation messages, the shipped spaces, and Optuna sampling."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from trainables.errors import ConfigError, InputError
from tune.space import (check_classes, load_space, resolve_space_path, sample, trial_config, with_demo,
                        with_overrides)

SEARCH_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
SHIPPED = ["segformer", "smp", "mixed"]
LR = "  optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str):
    return load_space(str(write(tmp_path, text)), tmp_path)


def run_study(spec, sampler, n_trials: int, num_classes: int = 5) -> list[tuple[dict, dict]]:
    """(sampled values, Optuna params) of each trial of a study optimising a made-up objective."""
    out = []

    def objective(trial: optuna.Trial) -> float:
        values = sample(spec, trial, num_classes)
        out.append((values, dict(trial.params)))
        return len(json.dumps(values)) % 7 + values.get("optimizer.lr", 0.0)

    optuna.create_study(direction="maximize", sampler=sampler).optimize(objective, n_trials=n_trials)
    return out


BAD = [
    # (case id, YAML text, key named in the error, part of the problem)
    ("top-level", "spaces: {}\nspace:\n" + LR, "spaces", "unknown top-level key"),
    ("name", "name: [a]\nspace:\n" + LR, "name", "non-empty name"),
    ("fixed-section", "fixed: {dataa: {task: multiclass}}\nspace:\n" + LR, "fixed.dataa", "unknown section"),
    ("fixed-setting", "fixed: {train: {epoch: 3}}\nspace:\n" + LR, "fixed.train.epoch", "unknown setting"),
    ("fixed-dotted", "fixed: {optimizer.momentun: 0.9}\nspace:\n" + LR, "fixed.optimizer.momentun", "unknown setting"),
    ("fixed-not-mapping", "fixed: {train: 3}\nspace:\n" + LR, "fixed.train", "expected a mapping"),
    ("int-type", "fixed: {train: {epochs: ten}}\nspace:\n" + LR, "fixed.train.epochs", "expected an integer"),
    ("float-for-int", "fixed: {train.epochs: 3.5}\nspace:\n" + LR, "fixed.train.epochs", "expected an integer"),
    ("float-as-text", "fixed: {optimizer.momentum: 1e-3}\nspace:\n" + LR, "fixed.optimizer.momentum", "write 1.0e-4"),
    ("bool-type", "fixed: {augment.random_crop: 1}\nspace:\n" + LR, "fixed.augment.random_crop", "true or false"),
    ("null", "fixed: {train.epochs: null}\nspace:\n" + LR, "fixed.train.epochs", "cannot be null"),
    ("image-size-len", "fixed: {train.image_size: [256]}\nspace:\n" + LR, "fixed.train.image_size", "two positive"),
    ("image-size-zero", "fixed: {train.image_size: [0, 64]}\nspace:\n" + LR, "fixed.train.image_size", "two positive"),
    ("task", "fixed: {data.task: binary}\nspace:\n" + LR, "fixed.data.task", "multiclass or multilabel"),
    ("unannotated", "fixed: {data.unannotated: void}\nspace:\n" + LR, "fixed.data.unannotated", "background or ignore"),
    ("strategy", "fixed: {folds.strategy: random}\nspace:\n" + LR, "fixed.folds.strategy", "kfold"),
    ("k", "fixed: {folds.k: 1}\nspace:\n" + LR, "fixed.folds.k", "at least 2, got 1"),
    ("group-regex", "fixed: {folds.strategy: group}\nspace:\n" + LR, "fixed.folds.group_regex", "needs a group_regex"),
    ("group-bad-regex", "fixed: {folds: {strategy: group, group_regex: '('}}\nspace:\n" + LR,
     "fixed.folds.group_regex", "invalid regular expression"),
    ("weights-scheme", "fixed: {loss.class_weights: inverted}\nspace:\n" + LR, "fixed.loss.class_weights", "inverse"),
    ("weights-nonpositive", "fixed: {loss.class_weights: [1, 0, 2]}\nspace:\n" + LR, "fixed.loss.class_weights",
     "must be positive"),
    ("fixed-and-searched", "fixed: {optimizer.lr: 0.1}\nspace:\n" + LR, "fixed.optimizer.lr", "also searched"),
    ("no-space", "fixed: {train.epochs: 2}\n", "space", "nothing to search"),
    ("space-setting", "space: {optimizer.lrr: {uniform: [0.1, 0.2]}}\n", "space.optimizer.lrr", "unknown setting"),
    ("space-section", "space: {optimizer: {lr: {uniform: [0.1, 0.2]}}}\n", "space.optimizer", "dotted settings"),
    ("space-scalar", "space: {optimizer.lr: 0.001}\n", "space.optimizer.lr", "move it to `fixed`"),
    ("unknown-form", "space: {optimizer.lr: {normal: [0, 1]}}\n", "space.optimizer.lr", "distribution form"),
    ("two-forms", "space: {optimizer.lr: {uniform: [0, 1], choice: [1]}}\n", "space.optimizer.lr", "one distribution"),
    ("unknown-option", "space: {optimizer.lr: {uniform: [0.1, 1], log: true}}\n", "space.optimizer.lr",
     "unknown option 'log'"),
    ("empty-choice", "space: {loss.name: {choice: []}}\n", "space.loss.name", "non-empty list"),
    ("choice-type", "space: {train.epochs: {choice: [10, ten]}}\n", "space.train.epochs", "choice 'ten'"),
    ("choice-weights", "space: {loss.class_weights: {choice: [none, [1, -1]]}}\n", "space.loss.class_weights",
     "must be positive"),
    ("low-above-high", "space: {optimizer.lr: {uniform: [0.5, 0.1]}}\n", "space.optimizer.lr", "low is above high"),
    ("log-low", "space: {optimizer.lr: {loguniform: [0, 0.1]}}\n", "space.optimizer.lr", "log scale needs low > 0"),
    ("int-log-low", "space: {train.epochs: {int: [0, 10], log: true}}\n", "space.train.epochs", "low > 0"),
    ("quniform-q", "space: {augment.color: {quniform: [0.0, 0.5, 0]}}\n", "space.augment.color", "must be positive"),
    ("quniform-len", "space: {augment.color: {quniform: [0.0, 0.5]}}\n", "space.augment.color", "[low, high, q]"),
    ("int-bounds", "space: {train.epochs: {int: [1.5, 4]}}\n", "space.train.epochs", "must be integers"),
    ("int-step", "space: {train.epochs: {int: [2, 8], step: 0}}\n", "space.train.epochs", "step must be"),
    ("log-and-step", "space: {train.epochs: {int: [2, 8], step: 2, log: true}}\n", "space.train.epochs",
     "cannot be combined"),
    ("bounds-text", "space: {optimizer.lr: {loguniform: [1e-4, 1.0e-2]}}\n", "space.optimizer.lr", "write 1.0e-4"),
    ("type-missing", "space: {optimizer.lr: {type: float, low: 0.1}}\n", "space.optimizer.lr", "must be numbers"),
    ("type-unknown", "space: {optimizer.lr: {type: normal, low: 0, high: 1}}\n", "space.optimizer.lr", "unknown type"),
    ("float-for-int-setting", "space: {augment.rotate_limit: {uniform: [0, 30]}}\n", "space.augment.rotate_limit",
     "expected an integer"),
    ("per-class-key", "space: {optimizer.lr: {per_class: {uniform: [0.5, 2]}}}\n", "space.optimizer.lr",
     "only for loss.class_weights"),
    ("per-class-low", "space: {loss.class_weights: {per_class: {uniform: [0, 2]}}}\n",
     "space.loss.class_weights.per_class", "must be positive"),
    ("when-missing", "space:\n  loss.focal_gamma: {uniform: [1, 3], when: {loss.name: focal}}\n",
     "space.loss.focal_gamma.when", "'loss.name' is not searched"),
    ("when-value", "space:\n  loss.name: {choice: [ce, focal]}\n"
     "  loss.focal_gamma: {uniform: [1, 3], when: {loss.name: focall}}\n",
     "space.loss.focal_gamma.when", "never takes 'focall'"),
    ("when-float", "space:\n" + LR + "  loss.focal_gamma: {uniform: [1, 3], when: {optimizer.lr: 0.1}}\n",
     "space.loss.focal_gamma.when", "float parameter"),
    ("cycle", "space:\n  loss.name: {choice: [ce, focal], when: {optimizer.name: adam}}\n"
     "  optimizer.name: {choice: [adam, sgd], when: {loss.name: ce}}\n", "space.loss.name", "circular dependency"),
    ("choice-by-parent", "space:\n  model.encoder: {choice_by: model.arch, choices: {Unet: [resnet34]}}\n",
     "space.model.encoder.choice_by", "'model.arch' must be a categorical parameter in space"),
    ("choice-by-missing-list", "space:\n  model.arch: {choice: [Unet, FPN]}\n"
     "  model.encoder: {choice_by: model.arch, choices: {Unet: [resnet34]}}\n",
     "space.model.encoder.choices", "no list for model.arch='FPN'"),
    ("choice-by-extra-list", "space:\n  model.arch: {choice: [Unet]}\n"
     "  model.encoder: {choice_by: model.arch, choices: {Unet: [resnet34], Fpn: [resnet34]}}\n",
     "space.model.encoder.choices", "never takes 'Fpn'"),
    ("choice-by-empty-list", "space:\n  model.arch: {choice: [Unet]}\n"
     "  model.encoder: {choice_by: model.arch, choices: {Unet: []}}\n",
     "space.model.encoder", "choices for model.arch=Unet"),
    ("encoder-fixed", "fixed: {model: {arch: Unet, encoder: resnet999}}\nspace:\n" + LR, "fixed.model.encoder",
     "resnet999"),
    ("encoder-dependent", "space:\n  model.arch: {choice: [Unet, FPN]}\n"
     "  model.encoder: {choice_by: model.arch, choices: {Unet: [resnet34], FPN: [resnet999]}}\n",
     "space.model.encoder", "'FPN'"),
    ("encoder-segformer",
     "fixed: {model.arch: segformer}\nspace:\n  model.encoder: {choice: [nvidia/mit-b0, resnet34]}\n",
     "space.model.encoder", "Hugging Face name"),
    ("arch", "space:\n  model.arch: {choice: [Unet, Unett]}\n", "space.model.arch", "unknown architecture 'Unett'"),
    ("search-key", "search: {samples: 4}\nspace:\n" + LR, "search.samples", "unknown key"),
    ("num-samples", "search: {num_samples: 0}\nspace:\n" + LR, "search.num_samples", ">= 1, got 0"),
    ("mode", "search: {mode: maximize}\nspace:\n" + LR, "search.mode", "max or min"),
    ("asha", "search: {asha: {grace: 1}}\nspace:\n" + LR, "search.asha.grace", "unknown key"),
    ("search-folds", "search: {search_folds: [5]}\nspace:\n" + LR, "search.search_folds", "fold 5 does not exist"),
    ("resources-key", "resources: {gpus: 1}\nspace:\n" + LR, "resources.gpus", "unknown key"),
    ("gpus", "resources: {gpus_per_trial: -1}\nspace:\n" + LR, "resources.gpus_per_trial", ">= 0"),
    ("demo-key", "space:\n" + LR + "demo: {data: {}}\n", "demo.data", "unknown key"),
    ("demo-fixed", "space:\n" + LR + "demo: {fixed: {folds: {k: 1}}}\n", "demo.fixed.folds.k", "at least 2"),
    ("demo-space", "space:\n  model.arch: {choice: [Unet, FPN]}\n"
     "  model.encoder: {choice_by: model.arch, choices: {Unet: [resnet34], FPN: [resnet34]}}\n"
     "demo: {space: {model.arch: {choice: [Unet, DeepLabV3Plus]}}}\n",
     "demo.space.model.encoder.choices", "no list for model.arch='DeepLabV3Plus'"),
    # the driver makes the folds and loads the data once, and the ensemble reads fixed.data: never per trial
    ("space-folds", "space:\n" + LR + "  folds.k: {choice: [3, 5]}\n", "space.folds.k", "cannot be searched"),
    ("space-data", "space:\n  data.max_size: {choice: [256, 512]}\n", "space.data.max_size", "fixed"),
    ("demo-space-data", "space:\n" + LR + "demo: {space: {data.extra_train: {choice: [a.json, b.json]}}}\n",
     "demo.space.data.extra_train", "cannot be searched"),
]


@pytest.mark.parametrize("text,key,problem", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_space_names_file_and_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(str(path), tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message, message
    assert "\n" not in message


def test_invalid_yaml_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="space.yaml"):
        load_text(tmp_path, "space: {optimizer.lr: [\n")


def test_resolve_space_path(tmp_path):
    assert resolve_space_path("segformer", SEARCH_DIR) == SEARCH_DIR / "segformer.yaml"
    assert resolve_space_path("segformer.yaml", SEARCH_DIR) == SEARCH_DIR / "segformer.yaml"
    own = write(tmp_path, "space:\n" + LR, "own.yaml")
    assert resolve_space_path(str(own), SEARCH_DIR) == own
    with pytest.raises(ConfigError, match=r"--space: no search space 'nope'.*mixed, segformer, smp"):
        resolve_space_path("nope", SEARCH_DIR)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load_with_and_without_demo(name):
    spec = load_space(name, SEARCH_DIR)
    demo = with_demo(spec)
    for s, classes in ((spec, 12), (demo, 4)):
        check_classes(s, classes)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        cfg = trial_config(s, sample(s, trial, classes))
        assert cfg["data"]["task"] == "multiclass" and cfg["folds"]["strategy"] == "multilabel"
    assert spec.name == name and spec.base_config()["train"]["epochs"] >= 20
    assert demo.base_config()["folds"]["k"] == 2
    height, width = demo.base_config()["train"]["image_size"]
    assert height * width <= 128 * 128 < spec.base_config()["train"]["image_size"][0] ** 2  # a CPU-sized demo
    assert demo.base_config()["train"]["epochs"] <= 8
    assert demo.search["num_samples"] <= 4 and demo.resources["gpus_per_trial"] == 0
    assert list(demo.space)[: len(spec.space)] == list(spec.space)  # replaced parameters keep their place


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(seed=1)],
                         ids=["random", "tpe"])
def test_conditional_and_dependent_sampling(sampler):
    spec = load_space("smp", SEARCH_DIR)
    by_arch = spec.space["model.encoder"].by
    trials = run_study(spec, sampler, 50)
    for values, params in trials:
        assert ("loss.focal_gamma" in values) == ("focal" in values["loss.name"])
        arch = values["model.arch"]
        assert values["model.encoder"] in by_arch[arch]
        assert params[f"model.encoder|model.arch={arch}"] == values["model.encoder"]
        assert "model.encoder" not in params
        cfg = trial_config(spec, values)
        assert cfg["model"]["encoder"] == values["model.encoder"]
        assert cfg["loss"]["focal_gamma"] == values.get("loss.focal_gamma", 2.0)
    assert len({values["model.arch"] for values, _ in trials}) > 1


def test_dependency_order_puts_parents_first(tmp_path):
    spec = load_text(tmp_path, "space:\n"
                     "  loss.focal_gamma: {uniform: [1, 3], when: {loss.name: focal}}\n"
                     "  model.encoder: {choice_by: model.arch, choices: {Unet: [resnet18], FPN: [resnet34]}}\n"
                     "  loss.name: {type: categorical, choices: [ce, focal]}\n"
                     "  model.arch: {choice: [Unet, FPN]}\n")
    assert list(spec.space) == ["loss.name", "loss.focal_gamma", "model.arch", "model.encoder"]


def test_vectors_and_null_round_trip(tmp_path):
    spec = load_text(tmp_path, "space:\n"
                     "  loss.class_weights: {choice: [none, [1, 1, 2], [1, 2, 4]]}\n"
                     "  train.max_train_batches: {choice: [null, 4]}\n")
    trials = run_study(spec, optuna.samplers.RandomSampler(seed=0), 30, num_classes=3)
    for values, params in trials:
        assert values["loss.class_weights"] in ("none", [1, 1, 2], [1, 2, 4])
        assert params["loss.class_weights"] == json.dumps(values["loss.class_weights"])
        assert values["train.max_train_batches"] in (None, 4)
    seen = {json.dumps(values["loss.class_weights"]) for values, _ in trials}
    assert seen == {'"none"', "[1, 1, 2]", "[1, 2, 4]"}
    assert any(values["train.max_train_batches"] is None for values, _ in trials)


@pytest.mark.parametrize("dist", ["{loguniform: [0.25, 4.0]}", "{type: float, low: 0.5, high: 2}",
                                  "{choice: [0.5, 1, 2]}"])
def test_per_class_weights(tmp_path, dist):
    spec = load_text(tmp_path, f"space:\n  loss.class_weights: {{per_class: {dist}}}\n")
    values, params = run_study(spec, optuna.samplers.TPESampler(seed=0), 3, num_classes=4)[-1]
    weights = values["loss.class_weights"]
    assert len(weights) == 4 and all(0.25 <= w <= 4.0 for w in weights)
    assert sorted(params) == [f"loss.class_weights[{i}]" for i in range(4)]
    assert trial_config(spec, values)["loss"]["class_weights"] == weights


def test_sampling_is_deterministic_for_a_seed():
    spec = load_space("mixed", SEARCH_DIR)
    first = run_study(spec, optuna.samplers.TPESampler(seed=7, n_startup_trials=3), 12)
    second = run_study(spec, optuna.samplers.TPESampler(seed=7, n_startup_trials=3), 12)
    assert first == second


def test_check_classes_rejects_wrong_vector_length(tmp_path):
    spec = load_text(tmp_path, "fixed: {loss.class_weights: [1, 2, 3]}\nspace:\n" + LR)
    check_classes(spec, 3)
    with pytest.raises(ConfigError, match=r"fixed.loss.class_weights: .*4 classes, got 3 weights"):
        check_classes(spec, 4)
    spec = load_text(tmp_path, "space:\n  loss.class_weights: {choice: [inverse, [1, 2]]}\n")
    with pytest.raises(ConfigError, match=r"space.yaml: space.loss.class_weights: .*3 classes"):
        check_classes(spec, 3)


def test_with_overrides_validates_and_merges():
    spec = load_space("segformer", SEARCH_DIR)
    with pytest.raises(ConfigError, match=r"^command line: folds.k: must be at least 2, got 1$"):
        with_overrides(spec, fixed={"folds.k": 1})
    with pytest.raises(ConfigError, match=r"^command line: search.num_samples: "):
        with_overrides(spec, search={"num_samples": 0})
    with pytest.raises(ConfigError, match=r"^command line: resources.gpus: unknown key"):
        with_overrides(spec, resources={"gpus": 1})
    with pytest.raises(ConfigError, match=r"^command line: optimizer.lr: is also searched"):
        with_overrides(spec, fixed={"optimizer.lr": 0.1})
    out = with_overrides(spec, fixed={"train": {"epochs": 2}, "folds.k": 3}, search={"metric": "val_loss"},
                         resources={"gpus_per_trial": 1})
    assert out.base_config()["train"]["epochs"] == 2 and out.base_config()["folds"]["k"] == 3
    assert out.base_config()["train"]["image_size"] == [352, 480]
    assert out.search["mode"] == "min" and out.resources["gpus_per_trial"] == 1
    # trials keep their best checkpoint by the searched metric, not the training default
    assert (out.base_config()["train"]["metric"], out.base_config()["train"]["mode"]) == ("val_loss", "min")
    assert spec.base_config()["train"]["metric"] == "val_miou"
    assert spec.base_config()["train"]["epochs"] == 40  # the original is untouched


def test_with_demo_needs_a_demo(tmp_path):
    spec = load_text(tmp_path, "space:\n" + LR)
    assert spec.search["num_samples"] == 8 and spec.search["asha"]["reduction_factor"] == 3
    with pytest.raises(ConfigError, match="space.yaml: demo: "):
        with_demo(spec)
