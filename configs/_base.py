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
"""
from __future__ import annotations

import ml_collections


def base(dataset: str, data_dir: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.data_dir = data_dir
    c.seed = 0
    c.progress = True
    c.method = ""
    c.data = ml_collections.ConfigDict({"standardize": False, "frames": {}, "masks": [], "worker_count": 0})
    c.loss = ml_collections.ConfigDict({"mm": "infonce", "temperature": 0.1})
    # devices: `data` splits every batch (default: all devices); `model` > 1 with shard_params splits large
    # weight matrices too; `distributed` starts JAX's multi-host runtime (see README)
    c.parallel = ml_collections.ConfigDict({
        "data": ml_collections.config_dict.placeholder(int),
        "model": 1,
        "shard_params": False,
        "distributed": {"auto": False, "coordinator_address": "",
                        "num_processes": ml_collections.config_dict.placeholder(int),
                        "process_id": ml_collections.config_dict.placeholder(int)},
    })
    c.alpha = ml_collections.ConfigDict({
        "strategy": "constant:0.0",
        "inner_iters": 0,  # train steps between alpha steps (0: one alpha step per epoch)
        "outer": "validation",  # the batch of the upper-level L_CLS: validation (default) or train
        # examples in the hypergradient's inner and outer batches (None: the train batch); the authors use 8
        "batch_size": ml_collections.config_dict.placeholder(int),
        "learned": {"init": 0.5, "learning_rate": 0.05, "schedule": "constant", "clip": (0.0, 1.0),
                    "optimizer": "sgd", "per_pair": False},
        # normal equations: positive definite for the indefinite Hessians of networks (plain CG breaks down on them)
        "hypergrad": {"method": "cg", "options": {"operator": "normal", "damping": 1e-4, "tol": 1e-3, "maxiter": 30},
                      "require_converged": False},
    })
    return c


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
        c.alpha.hypergrad.options = {"reduction": "first_tensor_mean"}
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
