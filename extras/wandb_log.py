"""--wandb PROJECT: the records checkpoint.MetricsLog writes to metrics.jsonl, sent to
Weights & Biases as well (pip install wandb; WANDB_MODE=offline keeps them on disk).
Imported only when the flag is given, and used on rank 0 only, like metrics.jsonl.

Not run directly; checkpoint.MetricsLog calls start_run.
"""

import importlib
import os

from errors import UserError


def start_run(args, metrics_path):
    """A wandb run named after the stage and --out-dir, with the run's flags as its config;
    the caller logs each record with run.log(record, step=record["step"])."""
    try:
        wandb = importlib.import_module("wandb")
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    stage = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    return wandb.init(project=args.wandb, config=vars(args),
                      name=f"{stage} {os.path.abspath(args.out_dir)}")
