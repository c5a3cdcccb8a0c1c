"""Training: the config (its table of fields, defaults, validation), setup (config -> the run's parts, the train
state), the compiled steps, the loop of Algorithm 1 with preemption, evaluation and checkpoints.

The training methods the steps run (LFM and, on the same interface, the balancing methods) are in
:mod:`dyngap_jax.methods`; the studies built on training (the hypergradient comparison, the paper's
report) in :mod:`dyngap_jax.studies`.
"""
from dyngap_jax.methods.alpha_step import alpha_losses, make_alpha_step
from dyngap_jax.methods.lfm import mm_loss_fn
from dyngap_jax.methods.state import TrainState
from dyngap_jax.train.checkpoint import CheckpointError, Checkpointer
from dyngap_jax.train.config import Config, ConfigError, Precision, base_config, validate
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
from dyngap_jax.train.loop_state import LoopState
from dyngap_jax.train.preempt import EXIT_STATUS as PREEMPTED_EXIT_STATUS
from dyngap_jax.train.preempt import Preempted
from dyngap_jax.train.setup import CompiledSteps, Run, create_train_state, make_optimizer, setup
from dyngap_jax.train.steps import make_eval_step, make_train_step
from dyngap_jax.train.workdir import WorkdirBusy, recorded_config, workdir_lock

__all__ = ["CheckpointError", "Checkpointer", "CompiledSteps", "Config", "ConfigError", "LoopState",
           "PREEMPTED_EXIT_STATUS", "Precision", "Preempted", "Run", "TrainState", "TrainingDiverged", "WorkdirBusy",
           "alpha_losses", "base_config", "create_train_state", "evaluate", "evaluate_checkpoint", "load_run_state",
           "make_alpha_step", "make_eval_step", "make_optimizer", "make_train_step", "metrics_table", "mm_loss_fn",
           "predict", "predict_checkpoint", "recorded_config", "setup", "summary_table", "train", "validate",
           "workdir_lock"]
