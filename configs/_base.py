"""Shared pieces of the data set configs: the method chosen by ``get_config(arg)``.

Methods (``--config configs/<dataset>.py:<method>``):
  concat              alpha = 0 (classification only)
  constant:<a>        alpha = a throughout (Table 4's 0 / 0.5 / 1)
  stepwise:<p>        h(p): p for the first half of training, 1 - p after
  ours_h              heuristic alpha_t = 1 - exp(-1/t)
  ours_lb             learned alpha, exact hypergradient (IFT + CG); --config.alpha.hypergrad.method picks another
  ours_lb_vector      learned alpha with one weight per modality pair
  lfm_code            the authors' code: JS alignment, H.g with first-tensor mean, alpha in [0.05, 0.95] from 0.95
  unimodal:<modality> one encoder alone, classification only

Batch sizes are global: ``train.batch_size``, ``train.eval_batch_size`` and ``alpha.batch_size`` are
the examples of one step over all processes and devices (each process loads its share; a training
batch must divide over the devices of the data axis). Every field is validated before the first step
(``dyngap_jax.train.config.validate``); the fields a strategy ignores are listed there and warned
about when set. The learned alpha's defaults come from ``dyngap_jax.alpha.LearnedAlpha`` and the
hypergradient method's from its class in ``dyngap_jax.hypergrad`` (``alpha.hypergrad.options`` left
``None`` take them, so ``--config.alpha.hypergrad.method=minres`` alone is MINRES with its defaults).
"""
from __future__ import annotations

import ml_collections

from dyngap_jax.train.config import base_config


def base(dataset: str, data_dir: str) -> ml_collections.ConfigDict:
    """Every field with its generic default (``dyngap_jax.train.config.base_config``); a data set's
    config sets ``model`` and the required ``train`` fields (``num_epochs``, ``batch_size``,
    ``learning_rate``)."""
    return base_config(dataset, data_dir)


def apply_method(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    name, _, value = (arg or "ours_lb").partition(":")
    c.method = arg or "ours_lb"
    if name == "concat":
        c.alpha.strategy = "constant:0.0"
    elif name in ("constant", "stepwise"):
        if not value:
            raise ValueError(f"config method {name!r} needs a value, e.g. {name}:0.5")
        c.alpha.strategy = f"{name}:{float(value)}"
    elif name == "ours_h":
        c.alpha.strategy = "heuristic"
    elif name in ("ours_lb", "ours_lb_vector"):
        c.alpha.strategy = "learned"
        c.alpha.learned.per_pair = name == "ours_lb_vector"
    elif name == "lfm_code":
        c.alpha.strategy = "learned"
        c.loss.mm = "js"
        c.alpha.learned.init = 0.95
        c.alpha.learned.clip = (0.05, 0.95)
        c.alpha.learned.schedule = "authors"
        c.alpha.hypergrad.method = "lfm_code"
        c.alpha.hypergrad.options.reduction = "first_tensor_mean"
    elif name == "unimodal":
        if value not in c.model.modalities:
            raise ValueError(f"config method unimodal:{value}: modality must be one of {list(c.model.modalities)}")
        c.model.modalities = [value]
        c.model.encoders = {value: c.model.encoders[value].to_dict()}
        c.model.projection_dim = None
        c.alpha.strategy = "constant:0.0"
        c.loss.mm = "none"
    else:
        raise ValueError(
            f"unknown method {arg!r}; known: concat, constant:<a>, stepwise:<p>, ours_h, ours_lb, ours_lb_vector, "
            "lfm_code, unimodal:<modality>"
        )
    return c
