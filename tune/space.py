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
      n_startup_trials: 10         # random trials before TPE takes over [10, Optuna's default],
                                   #   counted over all folds with share_folds (per fold without)
      share_folds: true            # one TPE model over every fold's trials, scores shifted by their
                                   #   fold's median at the first rung [true]; false: a study per fold
      asha: {grace_period: 2, reduction_factor: 3, brackets: 1}   # early stopping [these];
                                   #   max_t is train.epochs; null: no early stopping. Grace 2: a
                                   #   first-epoch score ranks from-scratch trials poorly (bench/).
                                   #   recheck: true: see tune/scheduler.py [false]
                                   #   promotion: true: pause at rungs, see tune/promotion.py [false]
                                   #   train.epochs can be searched only with asha: null
      search_folds: null           # folds searched [null = every fold]; [0]: search fold 0 only,
      retrain_top: 3               #   then retrain its best `retrain_top` configs on the others [3]
      racing: null                 # {eta: 3}: fold racing (tune/racing.py): a config runs on fold 0,
                                   #   and on each next fold while its mean ranks in the top 1/eta;
                                   #   num_samples then counts configs in total [null: none]
      epoch_budget: null           # total training epochs of all trials and folds [null: none]
      time_budget: null            # wall-clock limit of the search: 2h, 90m, 3600s [null: none]
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_concurrent: null, workers_per_trial: 1}
                                   # [1, 0, null, 1]; gpus may be fractional (0.5: two trials per GPU).
                                   #   workers_per_trial N > 1: each trial is a Ray Train run of N
                                   #   data-parallel workers, and cpus/gpus_per_trial are PER WORKER
                                   #   (a trial takes N times them; GPUs then whole: 0, 1, 2, ...).
                                   #   reuse_actors [true]: a finished one-process trial's worker
                                   #   runs the next trial (Tune's reuse_actors)
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

The distributions and their Optuna sampling are in :mod:`tune.distributions`; every setting's
value is checked by :func:`trainables.config.setting_problem`, the check training uses too. Every
problem is a :class:`ConfigError` naming the file, the key (``space.loss.focal_gamma.when``) and
the problem.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import yaml

from trainables import config
from trainables.errors import ConfigError, InputError
from trainables.cli import parse_duration
from tune.distributions import Param, always_active, link, parse_param

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

TOP_KEYS = ("name", "fixed", "search", "resources", "space", "demo")
DEMO_KEYS = ("fixed", "search", "resources", "space")
# settings the driver uses once for the whole search, so a trial's sampled value would be ignored
DRIVER_SECTIONS = {
    "data": "the driver loads the data once for every trial and the ensemble reads fixed.data",
    "folds": "the driver makes the folds once and every trial trains on them",
}
ASHA_DEFAULTS = {"grace_period": 2, "reduction_factor": 3, "brackets": 1, "promotion": False}
SEARCH_DEFAULTS = {"num_samples": 8, "metric": "val_miou", "mode": "max", "seed": 0, "n_startup_trials": 10,
                   "share_folds": True, "asha": ASHA_DEFAULTS, "search_folds": None, "retrain_top": 3,
                   "epoch_budget": None, "time_budget": None, "racing": None}
RACING_DEFAULTS = {"eta": 3}
RESOURCES_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": None, "workers_per_trial": 1,
                      "reuse_actors": True}
MEANINGS = {  # of the search.* and resources.* keys (docs/reference/settings.md: tune/settings_doc.py)
    "search.num_samples": "trials per fold; with racing, new configurations in total (each runs on fold 0, "
                          "and on later folds while it wins: at most num_samples x folds trials)",
    "search.metric": "reported metric to optimise: val_miou, val_dice, val_biou, val_pixel_acc, val_loss, "
                     "val_miou_image, val_dice_image (per-image means, see metrics.*)",
    "search.mode": "max | min (a new metric ending in loss makes it min)",
    "search.seed": "Optuna TPE seed",
    "search.n_startup_trials": "random trials before TPE takes over (per fold; with share_folds, over all folds)",
    "search.share_folds": "true: one TPE model over every fold's trials, scores shifted by their fold's median "
                          "at the first rung (tune/searcher.py); false: each fold's study learns alone",
    "search.asha": "ASHA early stopping (max_t is train.epochs); null: none, and train.epochs may be searched",
    "search.asha.grace_period": "epochs before a trial can first be stopped (a first-epoch score ranks "
                                "from-scratch trials poorly: bench/README.md)",
    "search.asha.reduction_factor": "keep the top 1/reduction_factor at each rung",
    "search.asha.brackets": "ASHA brackets",
    "search.asha.recheck": "rank a trial that passed a rung again at each later epoch (tune/scheduler.py)",
    "search.asha.promotion": "pause trials at each rung and promote the top 1/reduction_factor of the fold's trials "
                             "once they are known (tune/promotion.py)",
    "search.search_folds": "folds searched (null: every fold); [0]: search fold 0, then retrain on the others",
    "search.retrain_top": "configs of each searched fold retrained on the other folds",
    "search.epoch_budget": "total training epochs of all trials and folds (null: none)",
    "search.time_budget": "wall-clock limit of the search: 2h, 90m, 3600s (null: none)",
    "search.racing": "fold racing (tune/racing.py): a new configuration trains on fold 0, then on the next fold "
                     "while its mean over the folds it ran ranks in the top 1/eta of the configurations that "
                     "completed as many folds (null: every fold searched on its own)",
    "search.racing.eta": "keep the top 1/eta of the configurations at each fold (a lone first arrival passes); "
                         "1: every configuration runs on every fold",
    "resources.cpus_per_trial": "CPUs of a trial (per worker with workers_per_trial > 1)",
    "resources.gpus_per_trial": "GPUs of a trial, may be fractional: 0.5 puts two trials on a GPU (per worker, "
                                "then whole, with workers_per_trial > 1)",
    "resources.max_concurrent": "trials at once (null: as many as the free resources allow)",
    "resources.workers_per_trial": "N > 1: each trial is a Ray Train run of N data-parallel workers",
    "resources.reuse_actors": "a finished trial's worker process runs the next trial (Tune's reuse_actors: no "
                              "new process, no imports again); one-process trials only",
}


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
            problem = config.setting_problem(dotted, item)
            if problem:
                raise ConfigError(source, f"{prefix}{dotted}", problem)
            section, _, name = dotted.partition(".")
            out.setdefault(section, {})[name] = copy.deepcopy(item)
    return out


def _merge_fixed(base: Mapping[str, dict], override: Mapping[str, dict]) -> dict[str, dict[str, Any]]:
    return copy.deepcopy({s: {**base.get(s, {}), **override.get(s, {})} for s in {**base, **override}})


def _int_min(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if config.is_int(v) and v >= low else f"expected an integer >= {low}, {config.got(v)}"


def _number_min(low: float, strict: bool = False) -> Callable[[Any], str | None]:
    sign = ">" if strict else ">="
    return lambda v: (None if config.is_number(v) and (v > low if strict else v >= low)
                      else f"expected a number {sign} {low}, {config.got(v)}")


def _folds_problem(value: Any) -> str | None:
    if value is None or (isinstance(value, list) and value and all(config.is_int(f) and f >= 0 for f in value)
                         and len(set(value)) == len(value)):
        return None
    return f"expected null (every fold) or a list of distinct fold numbers such as [0], got {value!r}"


def _duration_problem(value: Any) -> str | None:
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
    "share_folds": lambda v: None if isinstance(v, bool) else f"expected true or false, {config.got(v)}",
    "asha": lambda v: None if v is None or isinstance(v, dict) else f"expected a mapping or null, got {v!r}",
    "search_folds": _folds_problem,
    "retrain_top": _int_min(1),
    "epoch_budget": lambda v: None if v is None else _int_min(1)(v),
    "time_budget": lambda v: None if v is None else _duration_problem(v),
    "racing": lambda v: None if v is None or isinstance(v, dict) else f"expected a mapping such as {{eta: 3}} "
                                                                      f"or null, got {v!r}",
}
RACING_CHECKS = {"eta": _int_min(1)}
ASHA_CHECKS = {"grace_period": _int_min(1), "reduction_factor": _number_min(1, strict=True), "brackets": _int_min(1),
               "recheck": lambda v: None if isinstance(v, bool) else f"expected true or false, {config.got(v)}",
               "promotion": lambda v: None if isinstance(v, bool) else f"expected true or false, {config.got(v)}"}
RESOURCES_CHECKS = {
    "cpus_per_trial": _number_min(0, strict=True),
    "gpus_per_trial": _number_min(0),
    "max_concurrent": lambda v: None if v is None else _int_min(1)(v),
    "workers_per_trial": _int_min(1),
    "reuse_actors": lambda v: None if isinstance(v, bool) else f"expected true or false, {config.got(v)}",
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
    if out.get("racing") is not None:
        out["racing"] = {**RACING_DEFAULTS, **_check_mapping(source, f"{prefix}racing.", out["racing"], RACING_CHECKS)}
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


def _parse_space(source: str, prefix: str, raw: Any) -> dict[str, Param]:
    out = {}
    for key, value in _mapping(source, prefix.rstrip("."), raw).items():
        key = str(key)
        if key in config.DEFAULTS:
            raise ConfigError(source, f"{prefix}{key}", "space keys are dotted settings such as optimizer.lr")
        _check_key(source, prefix, key)
        section = key.partition(".")[0]
        if section in DRIVER_SECTIONS:
            raise ConfigError(source, f"{prefix}{key}", f"{section}.* settings cannot be searched: "
                              f"{DRIVER_SECTIONS[section]}; set it in fixed")
        out[key] = parse_param(source, f"{prefix}{key}", key, value)
    return out


# ---------------------------------------------------------------- checks across sections


def model_pairs(space: Mapping[str, Param], model: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every (arch, encoder) a trial can get; an inactive parameter keeps the fixed value."""
    arch_p, enc_p = space.get("model.arch"), space.get("model.encoder")
    archs = [(a, True) for a in arch_p.values()] if arch_p else []
    if arch_p is None or not always_active(space, arch_p):
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
            encoders = enc_p.values() + ([] if always_active(space, enc_p) else [model["encoder"]])
        pairs.update((arch, encoder) for encoder in encoders)
    return pairs


def _check_spec(spec: SearchSpec, source: str, fixed_at: str, search_at: str, space_at: str) -> None:
    """Checks that need several sections; ``*_at`` prefix the keys named in errors."""
    def where(key: str) -> str:
        return f"{space_at}{key}" if key in spec.space else f"{fixed_at}{key}"

    for key in config.flatten(spec.fixed):
        if key in spec.space:
            raise ConfigError(source, f"{fixed_at}{key}", "is also searched in space; keep one of the two")
    if "train.epochs" in spec.space and spec.search.get("asha"):
        raise ConfigError(source, f"{space_at}train.epochs", "ASHA allocates the epochs: set the maximum in "
                          "fixed (train.epochs), or search it without early stopping (search.asha: null)")
    # lazy: start-up time (torch and smp are imported when a space is checked, not by every importer of this module)
    from trainables.metrics import IMAGE_METRICS
    from trainables.models import arch_names, model_problem

    base = spec.base_config()
    image_metrics = [f"val_{name}" for name in IMAGE_METRICS]
    if spec.search["metric"].endswith("_image") and spec.search["metric"] not in image_metrics:
        raise ConfigError(source, f"{search_at}metric",
                          f"unknown per-image metric {spec.search['metric']!r}; known: {', '.join(image_metrics)}")
    try:  # the settings that depend on each other (each value was checked on its own already)
        config.validate_config(base, source=source)
    except ConfigError as err:
        raise ConfigError(source, where(err.key), err.problem) from None
    folds = base["folds"]
    if spec.search.get("racing") and (spec.search.get("asha") or {}).get("promotion"):
        raise ConfigError(source, f"{search_at}racing", "racing hands out a fold's trials as configurations earn "
                          "it, so asha.promotion cannot know when a fold's rung is complete; use one of them")
    if spec.search.get("racing") and spec.search["search_folds"] is not None:
        raise ConfigError(source, f"{search_at}racing", "racing runs every configuration on fold 0 first and "
                          "promotes it fold by fold: it replaces two-stage mode; set search_folds: null")
    for fold in spec.search["search_folds"] or ():
        if fold >= folds["k"]:
            raise ConfigError(source, f"{search_at}search_folds",
                              f"fold {fold} does not exist with folds.k = {folds['k']}")
    known_archs = {name.lower() for name in arch_names()}
    for arch, encoder in sorted(model_pairs(spec.space, base["model"])):
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
        space=link(source, "space.", _parse_space(source, "space.", raw.get("space"))),
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
        space=link(source, "demo.space.", {**spec.space, **_parse_space(source, "demo.space.", demo.get("space"))}),
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
        problem = config.setting_problem("loss.class_weights", weights, num_classes)
        if problem:
            raise ConfigError(spec.source, key, problem)


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
