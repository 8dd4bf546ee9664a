"""Read the records of an offline W&B run file (``run-<id>.wandb``) for tests: the reader is
tune/wandb_runs.py's (wandb ships the protobufs but no reader in its Python package)."""
from tune.wandb_runs import history, records

__all__ = ["history", "records"]
