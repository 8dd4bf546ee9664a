"""The search: a space YAML, one Optuna study and one ASHA bracket set per fold, one Ray Tune
experiment; and the report, which reads ``runs/`` only.

Search (imports ``trainables`` only):
  space         the space YAML and its checks; ``distributions`` its parameters
  distributions parsing, dependencies and Optuna sampling of searched parameters
  searcher      one Optuna study per fold behind one Ray Tune searcher
  racing        fold racing: a configuration earns the next fold while its mean ranks in the top 1/eta
  scheduler     ASHA with one bracket set per fold
  promotion     successive halving with promotion per fold: paused at a rung, resumed if in its top
  budget        epoch and wall-clock budgets
  experiment    the Tune callback that keeps trials.csv current
  trainable     the thin adapter between Ray Tune and ``trainables.loop.FoldTrainer``
  train_adapter a trial of several Ray Train workers
  storage       Tune's storage, local or shared, written atomically
  rundir        what a new run refuses to inherit and what ``--resume`` may change
  resume        reconciling the saved searcher state with Tune's trials
  progress      the per-fold progress view
  search        one search: data and folds on the driver, then the experiment
  cluster       joining a Ray cluster or starting a private one (Ray prediction uses it too)
  localray      processes of one local Ray cluster (tests and benchmarks)
  fingerprint   a dataset's fingerprint: sizes, channels, class shares, object sizes, frame-like names
  measure       measured peak memory and step time of a model at an input and batch size
  plan_decisions the planner's steps: folds, input size, working size, batch, epochs and trials, machine
  wandb_logging per-trial W&B runs and the W&B sweep export
  settings_doc  the generated settings table (docs/reference/settings.md)
  cli_doc       the generated command-line reference (docs/reference/cli.md)

Report (reads ``runs/``; imports no search and no fit module):
  report, report_ensemble, report_crossfold, report_html   the experiment's HTML page
  compare, wandb_runs                                      Tune against a W&B sweep

Entry points (call the stages, then the report):
  commands      ``seghpo`` and its subcommands
  plan          ``seghpo plan``: a space's fixed half from the fingerprint and measurements
  run           ``seghpo tune`` / ``python tune/run.py``
  sweep_agent   the W&B sweep program
"""
