"""The ensemble: fit on a finished search's out-of-fold predictions, then apply anywhere.

Prediction, the deployable side (imports ``trainables`` and itself only; no tuner, no search, no
Ray unless asked; with ``--runtime onnx`` no torch):
  bundle        the folder that predicts anywhere, and its loading
  member        a member and the TTA views, as both runtimes hold them
  voting        batched soft/hard voting over members and views, array-library free
  predictor     the same on PyTorch
  onnx_runtime  members run by onnxruntime
  onnx_export   members written as ONNX and checked against PyTorch
  rules         the decision rules the tuners fit (thresholds, min and empty areas)
  crf_apply     the CRF as prediction applies it
  tiling        the ``--tile`` option
  infer         prediction over a folder: masks, probabilities, test rows
  scoring       decisions scored against annotated masks
  submission    ``submission.csv`` in this tool's format or a competition's
  rle           run-length encoding
  pseudo        pseudo-labels from the ensemble's decisions
  ray_predict   prediction by a Ray Data actor pool
  predict       ``seghpo predict`` / ``python ensemble/predict.py``

Fit (imports prediction, never the search or the report):
  members       members chosen from trials.csv
  selection     greedy ensemble selection
  latency       a latency budget for members and TTA views
  oof           out-of-fold evaluation
  thresholds    class-wise thresholds tuned out of fold
  image_thresholds thresholds and empty areas tuned for per-image scores
  crf           the CRF's parameters fitted out of fold
  crossfit      cross-fitting: each decision scored on a fold it was not fitted on
  holdout       the ensemble scored on the holdout
  refit         the best configurations retrained on every training image, offered to the combination
  combine       how the members are combined, decided on the holdout
  compare       two experiments' out-of-fold results side by side
  cam           Grad-CAM overlays
  steps         the ensemble step as named steps, each writing its files
  extras        predict, pseudo-labels and Grad-CAM after the steps
  distill       one student trained on the ensemble's probabilities, its bundle and rows

Report: ``report`` (the out-of-fold plots). Entry point: ``run`` (``seghpo ensemble``).
"""
