"""Training: the config (defaults, validation), setup (config -> run objects, the train state), the
compiled steps, the loop of Algorithm 1, evaluation and checkpoints.

The studies built on it (the hypergradient comparison, the paper's report) are in
:mod:`dyngap_jax.studies`.
"""
from dyngap_jax.train.checkpoint import CheckpointError, Checkpointer
from dyngap_jax.train.config import ConfigError, base_config, validate
from dyngap_jax.train.evaluation import (
    evaluate,
    evaluate_checkpoint,
    load_run_state,
    metrics_table,
    predict,
    predict_checkpoint,
    summary_table,
)
from dyngap_jax.train.loop import TrainingDiverged, train
from dyngap_jax.train.setup import Run, Strategy, create_train_state, make_optimizer, setup
from dyngap_jax.train.steps import (
    TrainState,
    alpha_losses,
    make_alpha_step,
    make_eval_step,
    make_train_step,
    mm_loss_fn,
)
from dyngap_jax.train.workdir import WorkdirBusy, recorded_config, workdir_lock

__all__ = ["CheckpointError", "Checkpointer", "ConfigError", "Run", "Strategy", "TrainState", "TrainingDiverged",
           "WorkdirBusy", "alpha_losses", "base_config", "create_train_state", "evaluate", "evaluate_checkpoint", "load_run_state", "make_alpha_step",
           "make_eval_step", "make_optimizer", "make_train_step", "metrics_table", "mm_loss_fn", "predict",
           "predict_checkpoint", "recorded_config", "setup", "summary_table", "train", "validate", "workdir_lock"]
