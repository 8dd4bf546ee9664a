"""Train one fold with AMP and yield one record per epoch.

    trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=0)
    for record in trainer.epochs():      # a caller may stop at any epoch (ASHA, a test, Ctrl-C)
        print(record["val_miou"])
    trainer.best_checkpoint()            # weights + config + class names + metric of the best epoch

One AMP path (autocast + GradScaler only for fp16, unscale then clip), channels_last on CUDA,
losses in float32, metrics accumulated on the device. Nothing here knows about Ray: the Tune
adapter, plain scripts, benchmarks and a W&B sweep agent all drive this same generator.

Data parallel: when a ``torch.distributed`` process group is initialised (gloo on CPU, nccl on
CUDA; Ray Train, torchrun or a test sets it up), every process builds the same trainer and it
trains as one: ``train.batch_size`` is the global batch, each rank takes ``batch_size //
world_size`` of it (step k of the ranks together is the single-process batch k, see
trainables/sampling.py), the model is wrapped in ``DistributedDataParallel`` (same initial
weights: DDP broadcasts rank 0's), each rank validates a consecutive slice of the validation
images (exactly, no padding) and the counts are summed over ranks before any score is computed.
Every rank yields the same records; the caller writes checkpoints from rank 0 (``is_main``).
BatchNorm statistics stay per rank (as with plain DDP).

Weight averaging (``train.ema_decay``): timm's ``ModelEmaV3`` keeps an exponential moving average of
``self.model`` (never the DDP wrapper), updated after every optimiser step that was taken (an fp16
step the GradScaler skipped is not averaged). It averages the whole state dict: parameters and the
floating-point buffers (BatchNorm running statistics) are lerped, integer buffers
(``num_batches_tracked``) copied. With it, validation, previews and the best checkpoint use the
averaged network (``eval_model``) while ``self.model`` keeps training; its state dict has the plain
model's keys, so checkpoints load into a plain model as before.

Stochastic weight averaging (``train.swa_epochs``: N): torch's ``AveragedModel`` takes an equal share
of the weights at the end of each of the last N epochs (under the configured schedule), and
``update_bn`` then recomputes its BatchNorm statistics on that epoch's training batches, as
``torch.optim.swa_utils`` prescribes (an average of weights has no statistics of its own). From the
first averaged epoch on, validation, previews and the best checkpoint use the average. A trial ASHA
stops before the last N epochs never averages. Not with ``train.ema_decay`` (one average at a time).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import random
import time
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from trainables.checkpoint import make_checkpoint
from trainables.copypaste import build_copy_paste
from trainables.data import SegData
from trainables.dataset import SegDataset, WorkingImages, as_list, build_transforms
from trainables.device import resolve_amp, resolve_device
from trainables.config import check_setting, validate_config
from trainables.errors import ConfigError
from trainables.losses import build_loss
from trainables.metrics import IMAGE_METRICS, SegMetrics, empty_score
from trainables.models import build_model
from trainables.optim import Schedule, build_optimizer
from trainables.preprocess import InputSpec, activate, add_probs, as_logits
from trainables.sampling import build_sampler

logger = logging.getLogger(__name__)


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite: the trial stops instead of wasting its budget."""


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` default group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_ema(model: torch.nn.Module, train: dict) -> ModelEmaV3 | None:
    """timm's EMA of ``model`` for the ``train`` settings (None when ``train.ema_decay`` is null)."""
    decay = train.get("ema_decay")
    if decay is None:
        return None
    check_setting("train.ema_decay", decay)
    return ModelEmaV3(model, decay=float(decay), use_warmup=bool(train.get("ema_warmup", True)))


def build_swa(model: torch.nn.Module, train: dict) -> AveragedModel | None:
    """torch's equal-weight average of ``model`` for ``train.swa_epochs`` (None when 0)."""
    check_setting("train.swa_epochs", train.get("swa_epochs", 0))
    return AveragedModel(model) if train.get("swa_epochs") else None


def predict_logits(model: torch.nn.Module, images: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(device_type=images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return model(images).float()


class FoldTrainer:
    """Model, optimiser, schedule and loaders of one (config, fold); ``epochs()`` runs them."""

    def __init__(self, cfg: dict, data: SegData, train_idx: list[int], val_idx: list[int],
                 fold: int | None = None, device: str | torch.device | None = None):
        validate_config(cfg, num_classes=data.num_classes)  # before any work, in the user's words
        self.cfg, self.data, self.fold = cfg, data, fold
        train = cfg["train"]
        self.generator = seed_everything(int(train["seed"]) + (fold or 0))
        self.rank, self.world_size = process_group()
        self.is_main = self.rank == 0  # the one rank that writes checkpoints and files
        self.device = resolve_device(str(device or train["device"]))
        if self.world_size > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun's, Ray Train's
        self.amp = resolve_amp(train["amp"], self.device)
        self.channels_last = bool(train["channels_last"]) and self.device.type == "cuda"
        self.metric, self.mode = train["metric"], train["mode"]
        seed = int(train["seed"]) + (fold or 0)
        self.train_set, sampler = self._training_set(train_idx, seed)
        # validation gives the network what prediction will (trainables/preprocess.py): the image at the
        # working size, resized to image_size or stepped over by windows of the crop size (random_crop),
        # scored at the working size
        self.spec = InputSpec.from_config(cfg)
        self.val_set = WorkingImages(data, val_idx, self.spec)
        workers = int(train["num_workers"])
        loader_args = dict(num_workers=workers, pin_memory=self.device.type == "cuda",
                           persistent_workers=workers > 0)
        batch, drop_last = int(train["batch_size"]), len(self.train_set) > int(train["batch_size"])
        rank_batch = self._rank_batch(batch, len(self.train_set))
        self.train_loader = DataLoader(self.train_set, batch_size=rank_batch, sampler=sampler, drop_last=drop_last,
                                       generator=self.generator, **loader_args)
        # the same number of steps on every rank (DDP's all-reduce waits for all): the single-process count
        self.train_batches = len(self.train_loader) if self.world_size == 1 else \
            (len(self.train_set) // batch if drop_last else math.ceil(len(self.train_set) / batch))
        lo, hi = np.linspace(0, len(self.val_set), self.world_size + 1).round().astype(int)[self.rank:self.rank + 2]
        val_part = self.val_set if self.world_size == 1 else Subset(self.val_set, range(lo, hi))
        self.val_loader = DataLoader(val_part, batch_size=rank_batch, shuffle=False, collate_fn=as_list, **loader_args)
        model_cfg = cfg["model"]
        self.model = build_model(model_cfg["arch"], model_cfg["encoder"], data.num_classes, model_cfg["weights"],
                                 model_cfg["kwargs"]).to(self.device)
        self.weights = getattr(self.model, "weights_loaded", None)  # imagenet | random-init | a path
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # a copy of the model made before any DDP wrapper (it would hook into the model's parameters)
        self.ema = build_ema(self.model, train)
        self.ema_steps = 0  # optimiser steps averaged so far (timm's warmup counts them)
        self.swa = build_swa(self.model, train)
        # the network trained through: DDP over the process group, else the model itself; validation,
        # previews and checkpoints use ``eval_model``, ``self.model`` or its EMA (no collective in an eval
        # forward, no "module." keys)
        self.net = self.model if self.world_size == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        sizes = np.array([h * w for h, w in data.sizes], dtype=float)[train_idx]
        self.loss_fn = build_loss(cfg["loss"], data.task, data.num_classes, self._train_pixel_counts(train_idx),
                                  data.ignore_index, image_pixels=sizes @ data.presence[train_idx]).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg["optimizer"])
        self.steps_per_epoch = self._steps_per_epoch()
        self.schedule = Schedule(self.optimizer, cfg["scheduler"], int(train["epochs"]), self.steps_per_epoch, self.mode)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.epoch = 0
        self.best_score: float | None = None
        self.best_epoch = 0
        self._best_state: dict | None = None

    def _training_set(self, train_idx: list[int], seed: int) -> tuple[Dataset, Sampler]:
        """The training images (with copy-paste) and their sampler (with rare-class oversampling); a
        subclass trains on other items (the student of :mod:`trainables.kd`). Draws and augmentations
        are seeded by (seed, epoch[, position]): the same batches for any number of workers and after a
        resume; the loader's generator only seeds the workers' own RNGs."""
        cfg, data, train = self.cfg, self.data, self.cfg["train"]
        train_set = SegDataset(data, train_idx, build_transforms(cfg["augment"], train["image_size"], True, seed),
                               cfg["data"]["max_size"], seed=seed)
        train_set.copy_paste = build_copy_paste(cfg["augment"], data, train_idx, train_set.load,
                                                self._train_pixel_counts(train_idx), seed)
        return train_set, build_sampler(train, data.presence[train_idx], data.has_background, seed, self.rank,
                                        self.world_size)

    def _train_pixel_counts(self, train_idx: list[int]) -> np.ndarray:
        """Per-class labelled pixels of the training images only (for class weights and copy-paste):
        the sum of their masks' per-class counts, never a validation or holdout pixel."""
        return self.data.pixel_counts_of(train_idx)

    def _rank_batch(self, batch: int, images: int) -> int:
        """Each rank's share of the global batch ``train.batch_size``."""
        if self.world_size == 1:
            return batch
        if batch % self.world_size:
            raise ConfigError("config", "train.batch_size", f"a trial on {self.world_size} workers splits each batch "
                                                            f"over them: expected a multiple of {self.world_size}, got {batch}")
        if images < self.world_size:
            raise ConfigError("config", "resources.workers_per_trial",
                              f"{self.world_size} workers but only {images} training images in fold {self.fold}")
        return batch // self.world_size

    def _epoch_batches(self) -> int:
        """Training batches an epoch takes: the loader's, capped by ``train.max_train_batches``."""
        cap = self.cfg["train"]["max_train_batches"]
        return min(self.train_batches, cap) if cap else self.train_batches

    def _steps_per_epoch(self) -> int:
        accum = max(1, int(self.cfg["train"]["accum_steps"]))
        return max(1, self._epoch_batches() // accum)

    def _to_device(self, images: torch.Tensor, target: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(self.device, non_blocking=True)

    def train_step(self, images: torch.Tensor, target: torch.Tensor, update: bool = True,
                   accum: int = 1) -> torch.Tensor:
        """Forward under autocast, float32 loss, scaled backward; with ``update``: unscale, clip,
        optimiser and scaler step, zero the gradients, advance the schedule. Returns the loss."""
        # accumulation steps without an update keep their gradients local (DDP all-reduces on the update)
        sync = self.net.no_sync() if not update and self.net is not self.model else contextlib.nullcontext()
        with sync:
            logits = predict_logits(self.net, images, self.amp)
            loss = self.loss_fn(logits, target)
            self.scaler.scale(loss / accum).backward()
        if update:
            self.scaler.unscale_(self.optimizer)
            clip = float(self.cfg["train"]["grad_clip"])
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            scale = self.scaler.get_scale() if self.ema is not None and self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            # the scale drops only when the scaler found inf/NaN gradients and skipped the step
            if self.ema is not None and (scale is None or self.scaler.get_scale() >= scale):
                self.update_ema()
        return loss.detach()

    def update_ema(self) -> None:
        """Average the weights of the step just taken into the EMA; before ``train.ema_start_epoch``
        the EMA just copies them (timm's decay is 0 at step 0 and at the first counted step)."""
        if self.epoch >= int(self.cfg["train"]["ema_start_epoch"]):
            self.ema_steps += 1
        self.ema.update(self.model, step=self.ema_steps)

    def swa_epoch(self) -> bool:
        """Whether the epoch just trained (``self.epoch``, 0-based) is one of the last ``train.swa_epochs``."""
        return self.swa is not None and self.epoch >= int(self.cfg["train"]["epochs"]) - int(
            self.cfg["train"]["swa_epochs"])

    @torch.no_grad()
    def update_swa(self) -> None:
        """Average the weights of the epoch just trained into the SWA model (an equal share each), then
        recompute its BatchNorm statistics with torch's ``update_bn``: one forward pass over the
        epoch's training batches (the same draws, as many as an epoch takes)."""
        self.swa.update_parameters(self.model)
        self.set_epoch(self.epoch)
        batches = itertools.islice(self.train_loader, self._epoch_batches())
        update_bn((self._to_device(images, target)[0] for images, target in batches), self.swa)
        if self.world_size > 1:  # each rank's statistics of its own images: rank 0's, as DDP's buffers
            for buffer in self.swa.module.buffers():
                dist.broadcast(buffer.data, 0)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network validated, previewed and checkpointed: the SWA average once it holds an epoch
        (``train.swa_epochs``), the EMA's when ``train.ema_decay`` is set, else the model."""
        if self.swa is not None and int(self.swa.n_averaged) > 0:
            return self.swa.module
        return self.model if self.ema is None else self.ema.module

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws and augmentations the train loader yields from its next iteration."""
        self.train_loader.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)

    def train_one_epoch(self) -> dict:
        self.set_epoch(self.epoch)
        self.model.train()
        train = self.cfg["train"]
        accum = max(1, int(train["accum_steps"]))
        total = torch.zeros((), device=self.device)
        batches, images_seen, wait = 0, 0, 0.0
        start = tick = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        limit = self._epoch_batches()
        for step, (images, target) in enumerate(self.train_loader):
            if step >= limit:
                break
            wait += time.perf_counter() - tick
            images, target = self._to_device(images, target)
            total += self.train_step(images, target, update=(step + 1) % accum == 0, accum=accum)
            batches += 1
            images_seen += images.shape[0]
            tick = time.perf_counter()
        if self.world_size > 1:  # every rank sees (and stops on) the same loss
            sums = torch.tensor([float(total), batches, images_seen], dtype=torch.float64,
                                device=self._collective_device())
            dist.all_reduce(sums)
            total, batches, images_seen = float(sums[0]), int(sums[1]), int(sums[2])
            # DDP broadcasts rank 0's buffers (BatchNorm running stats) before each forward, so after the
            # last step they differ: validate and checkpoint the same model on every rank
            for buffer in self.model.buffers():
                dist.broadcast(buffer.data, 0)
            if self.ema is not None:  # the EMA averaged each rank's own buffers
                for buffer in self.ema.module.buffers():
                    dist.broadcast(buffer.data, 0)
        train_loss = float(total) / max(batches, 1)
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss became {train_loss} in epoch {self.epoch + 1}")
        elapsed = time.perf_counter() - start
        return {"train_loss": train_loss, "train_images_per_s": images_seen / max(elapsed, 1e-9),
                "data_wait_frac": wait / max(elapsed, 1e-9), "lr": self.optimizer.param_groups[0]["lr"]}

    def _collective_device(self) -> torch.device:
        """Where tensors for a collective must be: the CUDA device under nccl, the CPU under gloo."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _boundary_this_epoch(self) -> bool:
        """Boundary IoU costs about as much as the rest of validation on a CPU: by default it is
        computed at the planned last epoch only (every epoch when it is the selection metric)."""
        setting = self.cfg["train"]["boundary_iou"]
        check_setting("train.boundary_iou", setting)
        if setting == "every" or self.metric == "val_biou":
            return True
        return setting == "last" and self.epoch + 1 >= int(self.cfg["train"]["epochs"])

    def _per_image_settings(self) -> tuple[bool, float]:
        """(score per image too, score of an empty-truth empty-prediction pair) from ``metrics``;
        per-image scores are always computed when one of them is the selection metric."""
        section = {"average": "dataset", "empty": 1, **(self.cfg.get("metrics") or {})}
        check_setting("metrics.average", section["average"])
        check_setting("metrics.empty", section["empty"])
        empty = empty_score(section["empty"])
        return section["average"] == "image" or self.metric in {f"val_{k}" for k in IMAGE_METRICS}, empty

    def _probs(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Probabilities of the network for the input ``x`` (as prediction activates them)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = predict_logits(self.eval_model, x.flip(-1) if flip else x, self.amp)
        probs = activate(logits, self.data.task)
        return probs.flip(-1) if flip else probs

    def working_probs(self, inputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(B, C, *size) probabilities at the working size ``size`` of the inputs (one shape) that
        :class:`trainables.dataset.WorkingImages` made: the ensemble predictor's computation."""
        x = torch.stack(inputs).to(self.device)
        acc = torch.zeros((len(inputs), self.data.num_classes, *size), device=self.device)
        add_probs(self._probs, self.spec, lambda scale: x, acc)
        return acc

    @torch.no_grad()
    def validate(self) -> dict:
        """Scores of the validation images as the ensemble predictor computes them: each image at its
        working size through :mod:`trainables.preprocess` (resized, or sliding windows for members
        trained on crops), probabilities back at the working size, counted against the mask there.
        The loss is the training loss of those probabilities."""
        self.eval_model.eval()
        per_image, empty = self._per_image_settings()
        metrics = SegMetrics(self.data.num_classes, self.data.task, self.data.ignore_index,
                             boundary=self._boundary_this_epoch(), per_image=per_image, empty=empty)
        total = torch.zeros((), device=self.device)
        seen = 0
        for batch in self.val_loader:
            groups: dict[tuple, list] = {}  # images of one input and working size go through together
            for x, mask in batch:
                groups.setdefault((tuple(x.shape), mask.shape), []).append((x, mask))
            for items in groups.values():
                probs = self.working_probs([x for x, _ in items], items[0][1].shape[:2])
                target = torch.from_numpy(np.stack([m for _, m in items])).to(self.device)
                if self.data.task == "multiclass":
                    target = target.long()
                else:
                    target = target.permute(0, 3, 1, 2).float()
                total += self.loss_fn(as_logits(probs, self.data.task), target) * len(items)  # a mean over images
                seen += len(items)
                if self.data.task == "multiclass":
                    metrics.update(probs.argmax(1), target)
                else:
                    valid = (target != self.data.ignore_index).all(1)  # the predictor's default rule: p >= 0.5
                    metrics.update(probs >= 0.5, target.clamp(max=1), valid=valid)
        total = float(total)
        if self.world_size > 1:  # sum the counts (never average per-rank scores), then score once
            metrics.all_reduce()
            sums = torch.tensor([total, seen], dtype=torch.float64, device=self._collective_device())
            dist.all_reduce(sums)
            total, seen = float(sums[0]), int(sums[1])
        result = metrics.compute()
        self.last_validation = result  # the full scores (confusion matrix, per-class lists) of this pass
        record = {"val_loss": total / max(seen, 1)}
        for key in ("miou", "dice", "pixel_acc", "biou", *IMAGE_METRICS):
            if key in result:
                record[f"val_{key}"] = result[key]
        for name, iou in zip(self.data.class_names, result["iou_per_class"]):
            record[f"val_iou/{name}"] = iou
        return record

    def _improved(self, score: float) -> bool:
        if score is None or math.isnan(score):
            return self.best_score is None and self._best_state is None
        if self.best_score is None or math.isnan(self.best_score):
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def epochs(self) -> Iterator[dict]:
        """Train until ``train.epochs``; yield the metrics of each epoch as it ends."""
        total_epochs = int(self.cfg["train"]["epochs"])
        while self.epoch < total_epochs:
            start = time.perf_counter()
            record = self.train_one_epoch()
            if self.swa_epoch():
                self.update_swa()
                record["swa_epochs"] = int(self.swa.n_averaged)
            record.update(self.validate())
            self.epoch += 1
            score = record.get(self.metric)
            self.schedule.epoch_end(score)
            improved = self._improved(score)
            if improved:
                self.best_score, self.best_epoch = score, self.epoch
                weights = self.eval_model.state_dict()  # the EMA's with train.ema_decay
                self._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in weights.items()})
            record.update(epoch=self.epoch, improved=improved, best_score=self.best_score, best_epoch=self.best_epoch,
                          epoch_time_s=time.perf_counter() - start, fold=self.fold, weights=self.weights)
            yield record

    @torch.no_grad()
    def preview(self, n: int = 4) -> dict[str, np.ndarray]:
        """The first ``n`` validation images (uint8), their true and predicted labels (multiclass) or
        channels (multilabel), predicted as validation scores them and shown at ``train.image_size``
        (for dashboards)."""
        self.eval_model.eval()
        height, width = (int(v) for v in self.cfg["train"]["image_size"])

        def shown(a: np.ndarray) -> np.ndarray:  # (H, W[, C]) labels at image_size, channels first
            out = cv2.resize(a, (width, height), interpolation=cv2.INTER_NEAREST).reshape(height, width, *a.shape[2:])
            return out if out.ndim == 2 else out.transpose(2, 0, 1)

        images, truth, pred = [], [], []
        for k in range(min(n, len(self.val_set))):
            image, mask = self.val_set.load(k)
            probs = self.working_probs([self.val_set[k][0]], mask.shape[:2])[0]
            if self.data.task == "multiclass":
                decided = probs.argmax(0).cpu().numpy().astype(np.uint8)
            else:
                decided = (probs >= 0.5).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
            images.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR))
            truth.append(shown(mask))
            pred.append(shown(decided))
        return {"images": np.stack(images), "truth": np.stack(truth).astype(np.uint8),
                "pred": np.stack(pred).astype(np.uint8)}

    def best_checkpoint(self) -> dict:
        if self._best_state is None:
            raise RuntimeError("no epoch has finished yet")
        return make_checkpoint(self._best_state, self.cfg, self.data.class_names, self.data.task, self.metric,
                               self.best_score if self.best_score is not None else float("nan"), self.best_epoch,
                               self.fold, extra={"dataset": self.data.fingerprint}, weights=self.weights)

    def state_dict(self) -> dict:
        """Everything needed to continue this run later (resume after a crash); with ``train.ema_decay``
        also the EMA's weights (``ema``, the plain model's keys) and its step count."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "schedule": self.schedule.state_dict(), "epoch": self.epoch,
                 "best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self._best_state,
                 "rng": torch.get_rng_state(), "loader_rng": self.generator.get_state()}
        if self.ema is not None:
            state.update(ema=self.ema.module.state_dict(), ema_steps=self.ema_steps)
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()  # the average so far and how many epochs it holds
        return state

    def load_state_dict(self, state: dict) -> None:
        """A state of :meth:`state_dict`. A state without an EMA (saved with ``train.ema_decay: null``
        or before it existed) starts the EMA afresh from the restored weights; an EMA in the state of a
        trainer without one is ignored. The SWA average (``train.swa_epochs``) is restored likewise; a
        state without one leaves it empty, to be filled by the epochs still in its window."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
                self.ema_steps = int(state.get("ema_steps", 0))
            else:
                self.ema.set(self.model)
                self.ema_steps = 0
        if self.swa is not None and state.get("swa") is not None:
            self.swa.load_state_dict(state["swa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.best_score, self.best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
        self._best_state = state["best_state"]
        torch.set_rng_state(state["rng"])
        self.generator.set_state(state["loader_rng"])
        # augmentation needs no saved state: it is seeded from (seed, epoch, position), and the
        # augment_rng / copy_paste_rng of older states are ignored
