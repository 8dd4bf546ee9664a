"""Search spaces: the YAML file that says what ``tune/run.py`` searches, and its Optuna sampling.

A search space is one YAML file (``search_spaces/<name>.yaml``; ``--space segformer`` finds it).
Every key is optional except ``space``; defaults are in brackets::

    name: smp                      # experiment name [the file name without .yaml]
    fixed:                         # settings for every trial (sections of trainables.config),
      data: {task: multiclass, unannotated: background}     # nested sections ...
      folds.strategy: multilabel                           # ... or dotted keys
      train: {epochs: 40, batch_size: 8, image_size: [352, 480]}
    search:                        # how to search
      num_samples: 16              # trials PER FOLD [8]
      metric: val_miou             # reported metric to optimise [val_miou]: val_dice, val_biou,
                                   #   val_pixel_acc, val_loss, val_miou_image, val_dice_image
                                   #   (per-image means, Kaggle style: see metrics.* below), ...
      mode: max                    # max | min [min for a metric ending in "loss", else max]
      seed: 0                      # Optuna TPE seed [0]
      n_startup_trials: 5          # random trials before TPE takes over [5]
      asha: {grace_period: 2, reduction_factor: 3, brackets: 1}   # early stopping [these];
                                   #   max_t is train.epochs; null: no early stopping. Grace 2: a
                                   #   first-epoch score ranks from-scratch trials poorly (bench/).
                                   #   train.epochs can be searched only with asha: null
      search_folds: null           # folds searched [null = every fold]; [0]: search fold 0 only,
      retrain_top: 3               #   then retrain its best `retrain_top` configs on the others [3]
      epoch_budget: null           # total training epochs of all trials and folds [null: none]
      time_budget: null            # wall-clock limit of the search: 2h, 90m, 3600s [null: none]
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_concurrent: null, workers_per_trial: 1}
                                   # [1, 0, null, 1]; gpus may be fractional (0.5: two trials per GPU).
                                   #   workers_per_trial N > 1: each trial is a Ray Train run of N
                                   #   data-parallel workers, and cpus/gpus_per_trial are PER WORKER
                                   #   (a trial takes N times them; GPUs then whole: 0, 1, 2, ...)
    space:                         # searched settings: dotted trial-config key -> distribution
      model.arch: {choice: [Unet, FPN]}
      model.encoder:               # a categorical whose list depends on another parameter's value
        choice_by: model.arch
        choices: {Unet: [resnet34, efficientnet-b4], FPN: [resnext101_32x4d]}
      optimizer.lr: {loguniform: [1.0e-4, 3.0e-3]}
      loss.name: {choice: [ce, focal, "0.5*focal+0.5*dice"]}
      loss.focal_gamma: {uniform: [1.0, 3.0], when: {loss.name: [focal, "0.5*focal+0.5*dice"]}}
      loss.class_weights: {choice: [none, inverse, [1, 1, 2]]}    # schemes or per-class vectors
      train.batch_size: {int: [4, 16], log: true}
    demo:                          # applied when no --data is given (the shipped sample on CPU)
      fixed: {train: {epochs: 3, image_size: [64, 96]}, folds: {k: 2}}   # deep-merged
      search: {num_samples: 2}                                           # merged
      resources: {gpus_per_trial: 0}                                     # merged
      space: {model.encoder: {choice: [nvidia/mit-b0]}}                  # whole parameters replaced

Distributions (any may add ``when``):

- ``{choice: [a, b, ...]}``: categorical; values may be text, numbers, booleans, null, lists
  (vectors such as class weights) or mappings. Optuna's form: ``{type: categorical, choices: [...]}``.
- ``{choice_by: parent, choices: {parent value: [...], ...}}``: categorical whose list depends on
  the value of ``parent`` (a categorical in ``space``); every parent value needs exactly one list.
- ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}`` (lo > 0), ``{quniform: [lo, hi, q]}`` (q > 0);
  Optuna's form: ``{type: float, low: lo, high: hi, log: false, step: null}``.
- ``{int: [lo, hi]}`` with optional ``log: true`` or ``step: n``; Optuna's form:
  ``{type: int, low: lo, high: hi, log: false, step: 1}``.
- ``loss.class_weights: {per_class: <numeric or choice distribution of positive numbers>}``: one
  weight per class of the dataset, each searched on its own.
- ``when: {key: value or [values], ...}``: the parameter is searched only if every listed parameter
  is itself active and took one of those values; otherwise the setting keeps its fixed/default
  value. Parameters named in ``when`` or ``choice_by`` must be in ``space``, without cycles.

Write exponents with a dot (``1.0e-4``): YAML reads ``1e-4`` as text. A plain value under
``space`` is an error: one value for every trial belongs in ``fixed``. Every problem is a
:class:`ConfigError` naming the file, the key (``space.loss.focal_gamma.when``) and the problem.

Optuna names parameters by their dotted key, except ``choice_by`` parameters, which get one name
per parent value (``model.encoder|model.arch=Unet``; Optuna cannot change a categorical's choices
under one name), ``per_class`` weights (``loss.class_weights[0]`` .. ``[C-1]``), and choices that
are not plain text/numbers, which Optuna sees as their JSON text (``"[1, 1, 2]"``, ``"null"``).
"""
from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import yaml

from trainables import config
from trainables.errors import ConfigError, InputError

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

TOP_KEYS = ("name", "fixed", "search", "resources", "space", "demo")
DEMO_KEYS = ("fixed", "search", "resources", "space")
FORMS = ("choice", "choice_by", "uniform", "loguniform", "quniform", "int", "per_class", "type")
ASHA_DEFAULTS = {"grace_period": 2, "reduction_factor": 3, "brackets": 1}
SEARCH_DEFAULTS = {"num_samples": 8, "metric": "val_miou", "mode": "max", "seed": 0, "n_startup_trials": 5,
                   "asha": ASHA_DEFAULTS, "search_folds": None, "retrain_top": 3,
                   "epoch_budget": None, "time_budget": None}
RESOURCES_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": None, "workers_per_trial": 1}
CLASS_WEIGHT_SCHEMES = ("none", "inverse", "median", "sqrt_inverse")
ALLOWED = {"data.task": ("multiclass", "multilabel"), "data.unannotated": ("background", "ignore"),
           "folds.strategy": ("kfold", "stratified", "multilabel", "group"), "metrics.average": ("dataset", "image")}
MINIMUM = {"folds.k": 2, "train.epochs": 1, "train.batch_size": 1, "train.accum_steps": 1,
           "augment.copy_paste": 0, "augment.copy_paste_max": 1, "train.oversample": 0, "train.oversample_cap": 1}
NULLABLE = {"model.weights"}  # settings with a non-null default that also accept null


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _got(value: Any) -> str:
    """``got <value>``, with a hint when YAML read a number such as 1e-4 as text."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", item.strip()):
            return f"got {value!r} (YAML reads 1e-4 as text: write 1.0e-4)"
    return f"got {value!r}"


def value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the trial-config setting ``key`` (a known dotted key); None if it can."""
    default = config.get_dotted(config.DEFAULTS, key)
    if key == "loss.class_weights":
        if isinstance(value, list) and value and all(_is_number(w) for w in value):
            return None if all(w > 0 for w in value) else f"class weights must be positive, got {value!r}"
        if value in CLASS_WEIGHT_SCHEMES:
            return None
        return f"expected one of {', '.join(CLASS_WEIGHT_SCHEMES)} or a list of per-class weights, {_got(value)}"
    if key == "train.image_size":
        if isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
            return None
        return f"expected [height, width], two positive integers, {_got(value)}"
    if key == "augment.copy_paste_classes":  # the n rarest classes, or class names/indices
        if (_is_int(value) and value >= 1) or (isinstance(value, list) and value
                                               and all(isinstance(v, str) or _is_int(v) for v in value)):
            return None
        return f"expected a number of rarest classes or a list of class names/indices, {_got(value)}"
    if key == "augment.copy_paste_scale":
        if isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value) \
                and 0 < value[0] <= value[1]:
            return None
        return f"expected [low, high] with 0 < low <= high, {_got(value)}"
    if key == "metrics.empty":
        from trainables.metrics import empty_score

        return None if empty_score(value) is not None else f"expected 1 or nan, {_got(value)}"
    if key == "augment.copy_paste" and _is_number(value) and value > 1:
        return f"expected a probability in [0, 1], got {value!r}"
    if value is None:
        return None if default is None or key in NULLABLE else "cannot be null"
    if default is None:
        expected, ok = "text, a number or a list", isinstance(value, (str, int, float, list, dict))
        ok = ok and not isinstance(value, bool)
    elif isinstance(default, bool):
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        expected, ok = "an integer", _is_int(value)
    elif isinstance(default, float):
        expected, ok = "a number", _is_number(value)
    elif isinstance(default, str):
        expected, ok = "text", isinstance(value, str)
    else:
        expected, ok = "a mapping", isinstance(value, dict)
    if not ok:
        return f"expected {expected}, {_got(value)}"
    if key in ALLOWED and value not in ALLOWED[key]:
        return f"expected one of {', '.join(ALLOWED[key])}, got {value!r}"
    if key in MINIMUM and value < MINIMUM[key]:
        return f"must be at least {MINIMUM[key]}, got {value!r}"
    return None


@dataclass
class Param:
    """One searched setting. ``kind``: categorical | dependent | float | int | per_class."""

    key: str
    kind: str
    choices: list[Any] = field(default_factory=list)  # categorical
    low: float | int | None = None  # float, int
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    parent: str | None = None  # dependent: the parameter whose value picks the list ...
    by: dict[Any, list[Any]] = field(default_factory=dict)  # ... from these
    inner: Param | None = None  # per_class: the distribution of each class's weight
    when: dict[str, list[Any]] = field(default_factory=dict)

    def values(self) -> list[Any] | None:
        """Every value a categorical or dependent parameter can take (None for numeric kinds)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind != "dependent":
            return None
        out: list[Any] = []
        for options in self.by.values():
            out.extend(v for v in options if v not in out)
        return out

    def requires(self) -> list[str]:
        """The parameters that must be sampled before this one."""
        return ([self.parent] if self.parent else []) + list(self.when)

    def active(self, sampled: Mapping[str, Any]) -> bool:
        """Whether this parameter is searched, given the values sampled so far."""
        if self.parent is not None and self.parent not in sampled:
            return False
        return all(key in sampled and sampled[key] in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial, sampled: Mapping[str, Any], num_classes: int, name: str = "") -> Any:
        """Ask ``trial`` for this parameter's value (``name`` overrides the Optuna name)."""
        name = name or self.key
        if self.kind == "categorical":
            return _suggest_choice(trial, name, self.choices)
        if self.kind == "dependent":
            value = sampled[self.parent]
            label = value if isinstance(value, str) else json.dumps(value)
            return _suggest_choice(trial, f"{name}|{self.parent}={label}", self.by[value])
        if self.kind == "per_class":
            return [self.inner.suggest(trial, sampled, num_classes, f"{name}[{i}]") for i in range(num_classes)]
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


def _suggest_choice(trial: optuna.Trial, name: str, choices: list[Any]) -> Any:
    """Plain text/number choices go to Optuna as they are; others (lists, null) as JSON text."""
    if all(isinstance(c, (str, int, float)) for c in choices):
        return trial.suggest_categorical(name, choices)
    codes = [json.dumps(c) for c in choices]
    return copy.deepcopy(choices[codes.index(trial.suggest_categorical(name, codes))])


@dataclass
class SearchSpec:
    """A validated search space; ``fixed`` is nested by section, ``space`` in sampling order."""

    source: Path
    name: str
    fixed: dict[str, dict[str, Any]]
    search: dict[str, Any]
    resources: dict[str, Any]
    space: dict[str, Param]
    demo: dict[str, Any] = field(default_factory=dict)

    def base_config(self) -> dict:
        """The trial config every trial starts from: defaults updated by ``fixed``; the trial keeps
        its best checkpoint by the metric the search optimises."""
        cfg = config.resolve(self.fixed, source=str(self.source))
        cfg["train"]["metric"], cfg["train"]["mode"] = self.search["metric"], self.search["mode"]
        return cfg


# ---------------------------------------------------------------- parsing the sections


def _mapping(source: str, where: str, raw: Any) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(source, where or "(top level)", f"expected a mapping, got {raw!r}")
    return raw


def _check_key(source: str, prefix: str, key: str) -> None:
    """``key`` must be a dotted trial-config setting."""
    if key in config.known_keys():
        return
    section = key.partition(".")[0]
    if section in config.DEFAULTS:
        problem = f"unknown setting; {section} has: {', '.join(config.DEFAULTS[section])}"
    else:
        problem = f"unknown section {section!r}; sections: {', '.join(config.DEFAULTS)}"
    raise ConfigError(source, f"{prefix}{key}", problem)


def _parse_fixed(source: str, prefix: str, raw: Any) -> dict[str, dict[str, Any]]:
    """Nested copy of a ``fixed`` mapping (nested sections or dotted keys), every value checked."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _mapping(source, prefix.rstrip("."), raw).items():
        key = str(key)
        if key in config.DEFAULTS:
            items = {f"{key}.{name}": v for name, v in _mapping(source, f"{prefix}{key}", value).items()}
        else:
            items = {key: value}
        for dotted, item in items.items():
            _check_key(source, prefix, dotted)
            problem = value_problem(dotted, item)
            if problem:
                raise ConfigError(source, f"{prefix}{dotted}", problem)
            section, _, name = dotted.partition(".")
            out.setdefault(section, {})[name] = copy.deepcopy(item)
    return out


def _merge_fixed(base: Mapping[str, dict], override: Mapping[str, dict]) -> dict[str, dict[str, Any]]:
    return copy.deepcopy({s: {**base.get(s, {}), **override.get(s, {})} for s in {**base, **override}})


def _int_min(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and v >= low else f"expected an integer >= {low}, {_got(v)}"


def _number_min(low: float, strict: bool = False) -> Callable[[Any], str | None]:
    sign = ">" if strict else ">="
    return lambda v: (None if _is_number(v) and (v > low if strict else v >= low)
                      else f"expected a number {sign} {low}, {_got(v)}")


def _folds_problem(value: Any) -> str | None:
    if value is None or (isinstance(value, list) and value and all(_is_int(f) and f >= 0 for f in value)
                         and len(set(value)) == len(value)):
        return None
    return f"expected null (every fold) or a list of distinct fold numbers such as [0], got {value!r}"


def _duration_problem(value: Any) -> str | None:
    from tune.budget import parse_duration

    try:
        parse_duration(value)
    except ConfigError as err:
        return err.problem
    return None


SEARCH_CHECKS = {
    "num_samples": _int_min(1),
    "metric": lambda v: None if isinstance(v, str) and v else f"expected a metric name such as val_miou, got {v!r}",
    "mode": lambda v: None if v in ("max", "min") else f"expected max or min, got {v!r}",
    "seed": _int_min(0),
    "n_startup_trials": _int_min(0),
    "asha": lambda v: None if v is None or isinstance(v, dict) else f"expected a mapping or null, got {v!r}",
    "search_folds": _folds_problem,
    "retrain_top": _int_min(1),
    "epoch_budget": lambda v: None if v is None else _int_min(1)(v),
    "time_budget": lambda v: None if v is None else _duration_problem(v),
}
ASHA_CHECKS = {"grace_period": _int_min(1), "reduction_factor": _number_min(1, strict=True), "brackets": _int_min(1)}
RESOURCES_CHECKS = {
    "cpus_per_trial": _number_min(0, strict=True),
    "gpus_per_trial": _number_min(0),
    "max_concurrent": lambda v: None if v is None else _int_min(1)(v),
    "workers_per_trial": _int_min(1),
}


def _check_mapping(source: str, prefix: str, raw: Any, checks: Mapping[str, Callable[[Any], str | None]]) -> dict:
    out = dict(_mapping(source, prefix.rstrip("."), raw))
    for key, value in out.items():
        if key not in checks:
            raise ConfigError(source, f"{prefix}{key}", f"unknown key; known: {', '.join(checks)}")
        problem = checks[key](value)
        if problem:
            raise ConfigError(source, f"{prefix}{key}", problem)
    return out


def _parse_search(source: str, prefix: str, raw: Any) -> dict[str, Any]:
    out = _check_mapping(source, prefix, raw, SEARCH_CHECKS)
    if out.get("asha") is not None:
        out["asha"] = _check_mapping(source, f"{prefix}asha.", out["asha"], ASHA_CHECKS)
    return out


def _parse_resources(source: str, prefix: str, raw: Any) -> dict[str, Any]:
    return _check_mapping(source, prefix, raw, RESOURCES_CHECKS)


def _merge_search(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``; ``asha`` merged key by key, ``mode`` follows a new metric."""
    out = {**base, **override}
    if isinstance(override.get("asha"), dict):
        out["asha"] = {**(base.get("asha") or ASHA_DEFAULTS), **override["asha"]}
    if "metric" in override and "mode" not in override:
        out["mode"] = "min" if out["metric"].endswith("loss") else "max"
    return copy.deepcopy(out)


# ---------------------------------------------------------------- parsing distributions


def _parse_param(source: str, where: str, key: str | None, raw: Any) -> Param:
    """One distribution; ``key`` None (inside per_class) skips checking values against the setting."""
    if not isinstance(raw, dict):
        raise ConfigError(source, where, "expected a distribution such as {choice: [...]} or {uniform: [lo, hi]}; "
                          f"to use one value in every trial, move it to `fixed`: got {raw!r}")
    raw = dict(raw)
    when = raw.pop("when", None)
    forms = [form for form in FORMS if form in raw]
    if len(forms) != 1:
        raise ConfigError(source, where, f"expected one distribution form of {', '.join(FORMS)}, got keys {list(raw)}")
    form = forms[0]
    options = {k: v for k, v in raw.items() if k != form}

    def bad(problem: str) -> ConfigError:
        return ConfigError(source, where, problem)

    def allow(*names: str) -> None:
        for name in options:
            if name not in names:
                raise bad(f"unknown option {name!r} for a {form} distribution; allowed: {', '.join(names) or 'none'}")

    def bounds(size: int) -> list:
        value = raw[form]
        if not isinstance(value, list) or len(value) != size:
            raise bad(f"{form} expects [low, high{', q' if size == 3 else ''}], got {value!r}")
        return value

    if form == "type" and raw["type"] == "categorical":
        allow("choices")
        param = _categorical(bad, key, options.get("choices"))
    elif form == "type" and raw["type"] in ("float", "int"):
        allow("low", "high", "log", "step")
        low_high = [options.get("low"), options.get("high")]
        param = _numeric(bad, key, raw["type"], low_high, options.get("log", False), options.get("step"))
    elif form == "type":
        raise bad(f"unknown type; expected categorical, float or int, got {raw['type']!r}")
    elif form == "choice":
        allow()
        param = _categorical(bad, key, raw["choice"])
    elif form == "choice_by":
        allow("choices")
        param = _dependent(bad, key, raw["choice_by"], options.get("choices"))
    elif form == "per_class":
        allow()
        param = _per_class(source, where, key, raw["per_class"])
    elif form == "int":
        allow("log", "step")
        param = _numeric(bad, key, "int", bounds(2), options.get("log", False), options.get("step"))
    elif form == "quniform":
        allow()
        low, high, q = bounds(3)
        param = _numeric(bad, key, "float", [low, high], False, q)
    else:
        allow()
        param = _numeric(bad, key, "float", bounds(2), form == "loguniform", None)
    if when is not None:
        if not isinstance(when, dict) or not when:
            raise ConfigError(source, f"{where}.when", f"expected {{parameter: value or [values]}}, got {when!r}")
        param.when = {str(k): v if isinstance(v, list) else [v] for k, v in when.items()}
    return param


def _categorical(bad: Callable[[str], ConfigError], key: str | None, choices: Any) -> Param:
    if not isinstance(choices, list) or not choices:
        raise bad(f"a choice needs a non-empty list of values, got {choices!r}")
    for choice in choices:
        problem = value_problem(key, choice) if key else None
        if problem:
            raise bad(f"choice {choice!r}: {problem}")
    return Param(key or "", "categorical", choices=copy.deepcopy(choices))


def _dependent(bad: Callable[[str], ConfigError], key: str | None, parent: Any, by: Any) -> Param:
    if not isinstance(parent, str):
        raise bad(f"choice_by names the parameter the choices depend on, got {parent!r}")
    if not isinstance(by, dict) or not by:
        raise bad(f"choice_by needs `choices`: a mapping from each {parent} value to a list, got {by!r}")
    lists = {v: _categorical(lambda p, v=v: bad(f"choices for {parent}={v}: {p}"), key, c).choices
             for v, c in by.items()}
    return Param(key or "", "dependent", parent=parent, by=lists)


def _numeric(bad: Callable[[str], ConfigError], key: str | None, kind: str, bounds: list, log: Any, step: Any) -> Param:
    low, high = bounds
    if kind == "int":
        if not (_is_int(low) and _is_int(high)):
            raise bad(f"int bounds must be integers, {_got([low, high])}")
        if step is not None and not (_is_int(step) and step >= 1):
            raise bad(f"step must be an integer >= 1, got {step!r}")
    else:
        if not (_is_number(low) and _is_number(high)):
            raise bad(f"bounds must be numbers, {_got([low, high])}")
        if step is not None and not (_is_number(step) and step > 0):
            raise bad(f"the step (q) must be positive, {_got(step)}")
        low, high, step = float(low), float(high), None if step is None else float(step)
    if low > high:
        raise bad(f"low is above high, got [{low!r}, {high!r}]")
    if not isinstance(log, bool):
        raise bad(f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise bad(f"a log scale needs low > 0, got {low!r}")
    if log and step is not None:
        raise bad("log and step cannot be combined")
    for bound in (low, high) if key else ():
        problem = value_problem(key, bound)
        if problem:
            raise bad(f"a {kind} distribution does not fit this setting: {problem}")
    return Param(key or "", kind, low=low, high=high, log=log, step=step)


def _per_class(source: str, where: str, key: str | None, raw: Any) -> Param:
    if key != "loss.class_weights":
        raise ConfigError(source, where, "per_class is only for loss.class_weights")
    inner = _parse_param(source, f"{where}.per_class", None, raw)
    at = f"{where}.per_class"
    if inner.when or inner.kind not in ("categorical", "float", "int"):
        raise ConfigError(source, at, f"expected a choice, float or int distribution without `when`, got {raw!r}")
    values = inner.choices if inner.kind == "categorical" else [inner.low]
    if not all(_is_number(v) and v > 0 for v in values):
        raise ConfigError(source, at, f"class weights must be positive numbers, got {raw!r}")
    return Param(key, "per_class", inner=inner)


def _parse_space(source: str, prefix: str, raw: Any) -> dict[str, Param]:
    out = {}
    for key, value in _mapping(source, prefix.rstrip("."), raw).items():
        key = str(key)
        if key in config.DEFAULTS:
            raise ConfigError(source, f"{prefix}{key}", "space keys are dotted settings such as optimizer.lr")
        _check_key(source, prefix, key)
        out[key] = _parse_param(source, f"{prefix}{key}", key, value)
    return out


def _link(source: str, prefix: str, space: dict[str, Param]) -> dict[str, Param]:
    """Check ``when``/``choice_by`` references; return ``space`` in sampling order (parents first)."""
    if not space:
        raise ConfigError(source, prefix.rstrip("."), "nothing to search: add parameters, e.g. optimizer.lr")
    for key, param in space.items():
        for parent, allowed in param.when.items():
            other = space.get(parent)
            if other is None:
                raise ConfigError(source, f"{prefix}{key}.when",
                                  f"{parent!r} is not searched; `when` can only name parameters in space")
            values = other.values()
            if values is None and other.kind != "int":
                raise ConfigError(source, f"{prefix}{key}.when",
                                  f"{parent} is a {other.kind} parameter; `when` can test categorical or int ones")
            for value in allowed if values is not None else ():
                if value not in values:
                    raise ConfigError(source, f"{prefix}{key}.when",
                                      f"{parent} never takes {value!r}; its values: {values!r}")
        if param.kind == "dependent":
            other = space.get(param.parent)
            values = other.values() if other else None
            if values is None:
                raise ConfigError(source, f"{prefix}{key}.choice_by",
                                  f"{param.parent!r} must be a categorical parameter in space")
            for value in values:
                if not any(value == k for k in param.by):
                    raise ConfigError(source, f"{prefix}{key}.choices", f"no list for {param.parent}={value!r}")
            for value in param.by:
                if value not in values:
                    raise ConfigError(source, f"{prefix}{key}.choices",
                                      f"{param.parent} never takes {value!r}; its values: {values!r}")
    ordered: dict[str, Param] = {}
    path: list[str] = []

    def visit(key: str) -> None:
        if key in path:
            cycle = " -> ".join(path[path.index(key):] + [key])
            raise ConfigError(source, f"{prefix}{key}", f"circular dependency: {cycle}")
        if key not in ordered:
            path.append(key)
            for parent in space[key].requires():
                visit(parent)
            path.pop()
            ordered[key] = space[key]

    for key in space:
        visit(key)
    return ordered


# ---------------------------------------------------------------- checks across sections


def _always_active(space: Mapping[str, Param], param: Param) -> bool:
    return not param.when and (param.parent is None or _always_active(space, space[param.parent]))


def _model_pairs(space: Mapping[str, Param], model: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every (arch, encoder) a trial can get; an inactive parameter keeps the fixed value."""
    arch_p, enc_p = space.get("model.arch"), space.get("model.encoder")
    archs = [(a, True) for a in arch_p.values()] if arch_p else []
    if arch_p is None or not _always_active(space, arch_p):
        archs.append((model["arch"], False))
    pairs = set()
    for arch, searched in archs:
        if enc_p is None:
            encoders = [model["encoder"]]
        elif enc_p.parent == "model.arch" and not searched:  # the encoder is inactive with its parent
            encoders = [model["encoder"]]
        elif enc_p.parent == "model.arch":
            encoders = enc_p.by[arch] + ([model["encoder"]] if enc_p.when else [])
        else:
            encoders = enc_p.values() + ([] if _always_active(space, enc_p) else [model["encoder"]])
        pairs.update((arch, encoder) for encoder in encoders)
    return pairs


def _check_spec(spec: SearchSpec, source: str, fixed_at: str, search_at: str, space_at: str) -> None:
    """Checks that need several sections; ``*_at`` prefix the keys named in errors."""
    from trainables.metrics import IMAGE_METRICS
    from trainables.models import arch_names, model_problem

    def where(key: str) -> str:
        return f"{space_at}{key}" if key in spec.space else f"{fixed_at}{key}"

    for key in config.flatten(spec.fixed):
        if key in spec.space:
            raise ConfigError(source, f"{fixed_at}{key}", "is also searched in space; keep one of the two")
    if "train.epochs" in spec.space and spec.search.get("asha"):
        raise ConfigError(source, f"{space_at}train.epochs", "ASHA allocates the epochs: set the maximum in "
                          "fixed (train.epochs), or search it without early stopping (search.asha: null)")
    base = spec.base_config()
    image_metrics = [f"val_{name}" for name in IMAGE_METRICS]
    if spec.search["metric"].endswith("_image") and spec.search["metric"] not in image_metrics:
        raise ConfigError(source, f"{search_at}metric",
                          f"unknown per-image metric {spec.search['metric']!r}; known: {', '.join(image_metrics)}")
    folds = base["folds"]
    if folds["strategy"] == "group":
        try:
            re.compile(folds["group_regex"] or "")
        except (re.error, TypeError) as err:
            raise ConfigError(source, f"{fixed_at}folds.group_regex", f"not a regular expression: {err}") from None
        if not folds["group_regex"]:
            raise ConfigError(source, f"{fixed_at}folds.group_regex", "the group strategy needs a group_regex")
    for fold in spec.search["search_folds"] or ():
        if fold >= folds["k"]:
            raise ConfigError(source, f"{search_at}search_folds",
                              f"fold {fold} does not exist with folds.k = {folds['k']}")
    known_archs = {name.lower() for name in arch_names()}
    for arch, encoder in sorted(_model_pairs(spec.space, base["model"])):
        problem = model_problem(arch, encoder)
        if problem and arch.lower() not in known_archs:
            raise ConfigError(source, where("model.arch"), problem)
        if problem:
            key = "model.arch" if "model.arch" in spec.space and "model.encoder" not in spec.space else "model.encoder"
            raise ConfigError(source, where(key), f"with model.arch {arch!r}: {problem}")


# ---------------------------------------------------------------- public API


def resolve_space_path(name_or_path: str, search_dir: Path) -> Path:
    """An existing file path, else ``search_dir/<name>`` or ``search_dir/<name>.yaml``."""
    search_dir = Path(search_dir)
    for path in (Path(name_or_path), search_dir / name_or_path, search_dir / f"{name_or_path}.yaml"):
        if path.is_file():
            return path
    available = ", ".join(sorted(p.stem for p in search_dir.glob("*.yaml"))) or "none"
    raise ConfigError("command line", "--space",
                      f"no search space {name_or_path!r}; available in {search_dir}: {available}")


def load_space(name_or_path: str, search_dir: Path) -> SearchSpec:
    """Read and validate a search space (its demo section too); problems raise :class:`ConfigError`."""
    path = resolve_space_path(name_or_path, search_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InputError(path, f"cannot read the search space: {err}") from None
    if not isinstance(raw, dict):
        raise InputError(path, f"expected a mapping with keys {', '.join(TOP_KEYS)}, got {raw!r}")
    source = str(path)
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(source, str(key), f"unknown top-level key; known: {', '.join(TOP_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "name", f"expected a non-empty name, got {name!r}")
    demo = _mapping(source, "demo", raw.get("demo"))
    for key in demo:
        if key not in DEMO_KEYS:
            raise ConfigError(source, f"demo.{key}", f"unknown key; known: {', '.join(DEMO_KEYS)}")
    spec = SearchSpec(
        source=path,
        name=name,
        fixed=_parse_fixed(source, "fixed.", raw.get("fixed")),
        search=_merge_search(SEARCH_DEFAULTS, _parse_search(source, "search.", raw.get("search"))),
        resources={**RESOURCES_DEFAULTS, **_parse_resources(source, "resources.", raw.get("resources"))},
        space=_link(source, "space.", _parse_space(source, "space.", raw.get("space"))),
        demo=copy.deepcopy(demo),
    )
    _check_spec(spec, source, "fixed.", "search.", "space.")
    if demo:
        with_demo(spec)  # a broken demo fails now, not when someone first tries it
    logger.info("search space %s (%s): %s", spec.name, path, ", ".join(spec.space))
    return spec


def with_demo(spec: SearchSpec) -> SearchSpec:
    """``spec`` with its demo overrides: fixed/search/resources merged, space parameters replaced."""
    source, demo = str(spec.source), spec.demo
    if not demo:
        raise ConfigError(source, "demo", "this search space has no demo section; give --data")
    out = replace(
        spec,
        fixed=_merge_fixed(spec.fixed, _parse_fixed(source, "demo.fixed.", demo.get("fixed"))),
        search=_merge_search(spec.search, _parse_search(source, "demo.search.", demo.get("search"))),
        resources={**spec.resources, **_parse_resources(source, "demo.resources.", demo.get("resources"))},
        space=_link(source, "demo.space.", {**spec.space, **_parse_space(source, "demo.space.", demo.get("space"))}),
    )
    _check_spec(out, source, "demo.fixed.", "demo.search.", "demo.space.")
    return out


def with_overrides(spec: SearchSpec, fixed: Mapping[str, Any] | None = None, search: Mapping[str, Any] | None = None,
                   resources: Mapping[str, Any] | None = None) -> SearchSpec:
    """``spec`` updated by command-line overrides (dotted or nested), validated like the file."""
    source = "command line"
    out = replace(
        spec,
        fixed=_merge_fixed(spec.fixed, _parse_fixed(source, "", dict(fixed or {}))),
        search=_merge_search(spec.search, _parse_search(source, "search.", dict(search or {}))),
        resources={**spec.resources, **_parse_resources(source, "resources.", dict(resources or {}))},
    )
    _check_spec(out, source, "", "search.", "space.")
    return out


def check_classes(spec: SearchSpec, num_classes: int) -> None:
    """Every class-weight vector the spec can give (fixed or a choice) has ``num_classes`` weights."""
    param = spec.space.get("loss.class_weights")
    candidates = [("fixed.loss.class_weights", spec.base_config()["loss"]["class_weights"])]
    candidates += [("space.loss.class_weights", w) for w in (param.values() if param else None) or ()]
    for key, weights in candidates:
        if isinstance(weights, list) and len(weights) != num_classes:
            raise ConfigError(spec.source, key, f"needs one weight per class: the data has {num_classes} classes, "
                              f"got {len(weights)} weights in {weights!r}")


def sample(spec: SearchSpec, trial: optuna.Trial, num_classes: int) -> dict[str, Any]:
    """Suggest every active parameter (define-by-run, parents first): ``{dotted key: value}``."""
    sampled: dict[str, Any] = {}
    for key, param in spec.space.items():
        if param.active(sampled):
            sampled[key] = param.suggest(trial, sampled, num_classes)
    return sampled


def trial_config(spec: SearchSpec, sampled: Mapping[str, Any]) -> dict:
    """The full trial config: the spec's base config updated by the sampled values."""
    return config.merge(spec.base_config(), sampled, source=str(spec.source))
