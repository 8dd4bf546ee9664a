"""What ``ensemble/run.py`` does with the ensemble once :mod:`ensemble.steps` has written it:
``--predict`` (the bundle on new images), ``--pseudo-label`` (labels of unlabeled images for
``data.extra_train``) and ``--cam`` (Grad-CAM overlays), locally or, for the first two, on a Ray
cluster (a Ray Data actor pool, ensemble/ray_predict.py). Each writes its own files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ensemble.bundle import load_bundle, rule_refiner, rule_thresholds
from ensemble.cam import cam_step
from ensemble.crossfit import prediction_rule
from ensemble.predict import predict_with_bundle, print_result
from ensemble.predictor import Ensemble, Member
from ensemble.pseudo import write_pseudo_labels
from ensemble.ray_predict import predict_on_ray, pseudo_label_on_ray
from ensemble.steps import EnsembleOptions, ExperimentRun, Members, OutOfFold, PostProcessing
from trainables.errors import ConfigError
from trainables.runfiles import RunFiles


@dataclass(frozen=True)
class RayOptions:
    """The Ray Data actor pool (``--ray``/``--address`` and the actor flags)."""
    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def kwargs(self, options: EnsembleOptions) -> dict:
        """Keyword arguments of ensemble/ray_predict.py's entry points."""
        return {"address": self.address, "actors": self.actors, "batch_size": options.batch_size,
                "cpus_per_actor": self.cpus_per_actor, "gpus_per_actor": self.gpus_per_actor,
                "device": options.device}


@dataclass(frozen=True)
class PseudoOptions:
    unlabeled: Path  # the images to label
    out: Path | None = None  # [runs/<name>/pseudo]
    confidence: float = 0.9  # pixels whose probability of their label is below this are ignored (255)
    per_fold: bool = False  # one label set per fold, from that fold's members only


def predict(run: ExperimentRun, bundle_dir: Path, *, images: Path, out: Path | None, save_probs: bool,
            options: EnsembleOptions, ray: RayOptions | None = None) -> dict:
    """The bundle just written on ``images``, as ensemble/predict.py runs it anywhere (with ``ray``, by
    an actor pool); predictions go to ``out`` [runs/<name>/ensemble/predictions]."""
    out = out or run.out.predictions_dir
    cache_dir = run.data_settings["cache_dir"]
    if ray is not None:
        res = predict_on_ray(bundle_dir, images, out, save_probs=save_probs, cache_dir=cache_dir,
                             **ray.kwargs(options))
        print_result(res, res["members"], res["class_names"])
        return res
    loaded = load_bundle(bundle_dir, run.device)
    res = predict_with_bundle(loaded, images, out=out, batch_size=options.batch_size, save_probs=save_probs,
                              device=run.device, cache_dir=cache_dir)
    print_result(res, len(loaded.members), loaded.class_names)
    return res


def pseudo_labels(run: ExperimentRun, members: Members, *, oof: OutOfFold, post: PostProcessing, bundle_dir: Path,
                  shipped: list[Member], pseudo: PseudoOptions, options: EnsembleOptions,
                  ray: RayOptions | None = None) -> Path:
    """Pseudo-labels of the bundle's combination of members (``shipped``), or each fold's members
    (``pseudo.per_fold``, their plain average), with the rule the bundle applies; on Ray, the actors
    load the same members from the bundle just written (``shipped``, in this order). Returns the
    folder (per fold: ``<out>/fold{fold}``) to give ``data.extra_train``."""
    d = run.data_settings
    out = pseudo.out or RunFiles(run.run_dir).pseudo_dir
    rule = prediction_rule(oof.thresholds, post.post, run.max_size)  # what the bundle applies
    sets = ({f"fold{f}": e.members for f, e in members.ensembles.items()} if pseudo.per_fold else {"": shipped})
    for sub, chosen in sets.items():
        provenance = {"experiment": str(run.run_dir), "members": [m.name for m in chosen]}
        target = out / sub if sub else out
        if ray is not None:
            indices = [k for k, m in enumerate(shipped) if any(m is x for x in chosen)]
            if len(indices) != len(chosen):
                raise ConfigError("command line", "--pseudo-per-fold", f"{sub}'s members are not all in the bundle "
                                  "(the combination shipped dropped some): run it without --ray/--address")
            summary = pseudo_label_on_ray(bundle_dir, pseudo.unlabeled, target, indices, pseudo.confidence,
                                          provenance, cache_dir=d["cache_dir"], **ray.kwargs(options))
            summary.pop("actors")
        else:
            summary = write_pseudo_labels(
                Ensemble(chosen, members.tta, options.voting,
                         run.device), rule_thresholds(rule), inputs=pseudo.unlabeled,
                out=target, class_names=run.data.class_names, confidence=pseudo.confidence, refine=rule_refiner(rule),
                batch_size=options.batch_size,
                provenance=provenance, cache_dir=d["cache_dir"])
        print(f"pseudo-labels: {summary['images']} images, {100 * summary['kept_share']:.0f}% of pixels kept "
              f"-> {target}")
    entry = out / "fold{fold}" if pseudo.per_fold else out
    print(f"train with them: --set \"data.extra_train=['{entry}']\"")
    return entry


def cam(run: ExperimentRun, members: Members, *, cls: str, images: str) -> list[Path]:
    """Grad-CAM overlays of class ``cls`` (name or index) for each fold's best member, on ``images``
    (a number of out-of-fold images, or a folder); written beside the out-of-fold results."""
    return cam_step(members.ensembles, run.data, run.folds, run.max_size, cls, images, run.out.root,
                    run.data_settings["cache_dir"])
