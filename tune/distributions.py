"""The distributions of a search space's ``space`` section: parsing, dependencies, Optuna sampling.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from trainables import config
from trainables.errors import ConfigError

if TYPE_CHECKING:
    import optuna

FORMS = ("choice", "choice_by", "uniform", "loguniform", "quniform", "int", "per_class", "type")


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


def parse_param(source: str, where: str, key: str | None, raw: Any) -> Param:
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
        problem = config.setting_problem(key, choice) if key else None
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
        if not (config.is_int(low) and config.is_int(high)):
            raise bad(f"int bounds must be integers, {config.got([low, high])}")
        if step is not None and not (config.is_int(step) and step >= 1):
            raise bad(f"step must be an integer >= 1, got {step!r}")
    else:
        if not (config.is_number(low) and config.is_number(high)):
            raise bad(f"bounds must be numbers, {config.got([low, high])}")
        if step is not None and not (config.is_number(step) and step > 0):
            raise bad(f"the step (q) must be positive, {config.got(step)}")
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
        problem = config.setting_problem(key, bound)
        if problem:
            raise bad(f"a {kind} distribution does not fit this setting: {problem}")
    return Param(key or "", kind, low=low, high=high, log=log, step=step)


def _per_class(source: str, where: str, key: str | None, raw: Any) -> Param:
    if key != "loss.class_weights":
        raise ConfigError(source, where, "per_class is only for loss.class_weights")
    inner = parse_param(source, f"{where}.per_class", None, raw)
    at = f"{where}.per_class"
    if inner.when or inner.kind not in ("categorical", "float", "int"):
        raise ConfigError(source, at, f"expected a choice, float or int distribution without `when`, got {raw!r}")
    values = inner.choices if inner.kind == "categorical" else [inner.low]
    if not all(config.is_number(v) and v > 0 for v in values):
        raise ConfigError(source, at, f"class weights must be positive numbers, got {raw!r}")
    return Param(key, "per_class", inner=inner)


def link(source: str, prefix: str, space: dict[str, Param]) -> dict[str, Param]:
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


def always_active(space: Mapping[str, Param], param: Param) -> bool:
    return not param.when and (param.parent is None or always_active(space, space[param.parent]))
