"""Training, without Ray: data -> folds -> model -> loss -> loop -> metrics.

The shared bottom every stage may import (nothing here imports a stage above it):
  errors      one root exception for problems in the user's input (one line, exit 2)
  io          atomic writes: every file appears whole or not at all
  runfiles    the on-disk format of a run, ``runs/<name>/``
  rows        the row labels of every ensemble table
  cli         command-line plumbing: user errors, ``--set``, ``--debug``, the shared flag groups
  device      device and autocast (AMP) resolution

Training:
  segdata     the dataset record (:class:`SegData`), images, cached masks, fingerprints
  data        loading a dataset: COCO json (``coco``) or image/mask folders; ``extra`` adds
              training-only datasets
  coco        COCO json -> cached masks
  extra       extra training data (``data.extra_train``)
  folds       k-fold splits written once and reused
  config      the trial configuration: defaults, meanings, checks
  inputs      image -> member input without torch: sizes, resizing, normalisation, windows
  preprocess  the same on tensors, and probabilities back to any size
  dataset     torch Datasets with albumentations
  sampling    rare-class oversampling
  copypaste   copy-paste augmentation
  models      smp and SegFormer models by name
  losses      losses by name, and the distillation loss
  optim       optimisers and schedules by name
  metrics     IoU, Dice, boundary IoU, per-image scores
  checkpoint  self-describing checkpoints
  loop        :class:`FoldTrainer`: one fold with AMP, one record per epoch
  kd          a student trained on a teacher's probabilities (knowledge distillation)
  train       one fold from the command line (``seghpo train``)

tests/test_layers.py holds these layers against the imports.
"""
