"""Training: train state, compiled steps, the loop of Algorithm 1, checkpoints, plots."""
from dyngap_jax.train.checkpoint import Checkpointer
from dyngap_jax.train.loop import TrainingDiverged, evaluate, make_optimizer, summary_table, train
from dyngap_jax.train.steps import TrainState, make_alpha_step, make_eval_step, make_train_step, mm_loss_fn

__all__ = ["Checkpointer", "TrainState", "TrainingDiverged", "evaluate", "make_alpha_step", "make_eval_step",
           "make_optimizer", "make_train_step", "mm_loss_fn", "summary_table", "train"]
