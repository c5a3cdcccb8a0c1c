"""Evaluate a saved checkpoint on a split, and format metrics as a table."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import models
from dyngap_jax.train.checkpoint import Checkpointer
from dyngap_jax.train.loop import _cfg, _loader, evaluate, make_optimizer, predict
from dyngap_jax.train.steps import TrainState, make_eval_step


def epoch_checkpoints(workdir: str) -> dict[int, int]:
    """``{epoch: step}`` of the retained checkpoints saved at an epoch's end (raise
    ``config.train.keep_checkpoints`` to keep every epoch's)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    out = {}
    for step in ckpt.all_steps():
        extra = ckpt.restore_extra(step)
        if not extra.get("step_in_epoch"):
            out[int(extra["epoch"])] = step  # extra["epoch"] is the next epoch's index: epochs done
    ckpt.close()
    return out


def load_run_state(config, workdir: str, which: str | int = "latest"):
    """``(model, state, step)`` of a run's ``latest`` checkpoint, its ``best`` (on validation) one, or step ``which``."""
    cfg = _cfg(config)
    folder = os.path.join(workdir, "best" if which == "best" else "checkpoints")
    ckpt = Checkpointer(folder)
    if isinstance(which, int):
        if which not in ckpt.all_steps():
            raise FileNotFoundError(f"{folder}: no checkpoint at step {which}; retained steps: {ckpt.all_steps()}")
        step = which
    elif which in ("latest", "best"):
        step = ckpt.latest_step()
    else:
        raise ValueError(f"load_run_state: `which` must be 'latest', 'best' or a step, got {which!r}")
    if step is None:
        raise FileNotFoundError(f"{folder}: no checkpoint (has the run in {workdir} saved one?)")
    model, pretrained = models.build_model(cfg["model"])
    example = next(iter(_loader(cfg, "train", train=False, batch_size=2)))
    variables = models.init_variables(model, jax.random.PRNGKey(0), example, pretrained)
    params = variables.pop("params")
    tx = make_optimizer(cfg["train"], 1)
    mods = cfg["model"]["modalities"]
    n_pairs = max(1, len(mods) * (len(mods) - 1) // 2)
    per_pair = cfg["alpha"]["strategy"] == "learned" and cfg["alpha"].get("learned", {}).get("per_pair")
    learned = alpha_lib.LearnedAlpha(num_pairs=n_pairs if per_pair else None)
    like = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables, opt_state=tx.init(params),
                      alpha=learned.create(), rng=jax.random.PRNGKey(0))
    state, _ = ckpt.restore(step, like)
    ckpt.close()
    return model, state, step


def evaluate_checkpoint(config, workdir: str, split: str, which: str = "best"):
    """``(step, metrics)`` of the ``best`` (on validation) or ``latest`` checkpoint of ``workdir`` on ``split``."""
    model, state, step = load_run_state(config, workdir, which)
    return step, evaluate(state, make_eval_step(model), _cfg(config), split)


def predict_checkpoint(config, workdir: str, split: str, which: str = "best"):
    """``(logits, modality_logits, features, labels)`` of a checkpoint on every example of ``split``."""
    model, state, _ = load_run_state(config, workdir, which)
    return predict(state, make_eval_step(model), _cfg(config), split)


def metrics_table(res: dict, modalities, names=("acc", "map", "f1")) -> str:
    head = f"{'metric':<6} {'fused':>8} " + " ".join(f"{m:>8}" for m in modalities) + f" {'gap':>8}"
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:<6} {res[n]:>8.4f} " + " ".join(f"{res[f'{n}/{m}']:>8.4f}" for m in modalities)
                     + f" {res[f'gap_{n}']:>8.4f}")
    if "modality_gap" in res:
        lines.append(f"modality-gap distance: {res['modality_gap']:.4f}")
    return "\n".join(lines)
