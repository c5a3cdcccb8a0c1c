"""Shared pieces of the data set configs: the method chosen by ``get_config(arg)``.

Methods (``--config configs/<dataset>.py:<method>``):
  concat              alpha = 0 (classification only)
  constant:<a>        alpha = a throughout (Table 4's 0 / 0.5 / 1)
  stepwise:<p>        h(p): p for the first half of training, 1 - p after
  ours_h              heuristic alpha_t = 1 - exp(-1/t)
  ours_lb             learned alpha, exact hypergradient (IFT + CG); --config.alpha.hypergrad.method picks another
  ours_lb_vector      learned alpha with one weight per modality pair
  lfm_code            the authors' alpha step in the paper's recipe: JS alignment, H.g reduced by the mean of the
                      model's first tensor, alpha in [0.05, 0.95] from 0.95, their alpha learning rate
  authors_learned     the authors' released training recipe (Crema_epoch_learnable.py), whole: the above plus
                      one head a modality with the mean of their logits, loss 2 L_total, alpha stepped before
                      each epoch on 8 held-out training examples (H and g on the same 8, BatchNorm as their model
                      is in: training mode at epoch 0, evaluation mode after), alpha kept as a double, SGD
                      1e-2 / momentum 0.9 / weight decay 1e-4, StepLR(70, 0.1) stepped before each epoch,
                      batch 64, 200 epochs (the data set's config adds one video frame)
  authors_fitted      the same recipe with their README's entry point (Crema_epoch.py): alpha the degree-5
                      polynomial of the epoch written there, not learned
  unimodal:<modality> one encoder alone, classification only
  ogm_ge              OGM-GE (Peng et al., CVPR 2022): the dominant modality's encoder gradients damped, with
                      Gaussian noise (dyngap_jax/methods/ogm_ge.py; config.balance.options); two modalities
  mmpareto            MMPareto (Wei & Hu, ICML 2024): each encoder's multimodal and unimodal gradients combined
                      by their cosine (equal weights, or min-norm where they conflict), magnified by 1.5; a
                      head a modality beside the concat head (dyngap_jax/methods/mmpareto.py)
  mslr                MSLR (Yao & Mihalcea, ACL 2022): a learning rate a modality, its multiplier moved by the
                      modality's validation accuracy against its last 5; the additive late fusion (a head a
                      modality, logits summed) (dyngap_jax/methods/mslr.py)
  agm                 AGM (Li et al., ICCV 2023): each modality's Shapley contribution from passes with the others
                      zeroed, its backward scaled by how far its running score is from the batch's
                      (dyngap_jax/methods/agm.py); 2^M - 1 forward passes a step
  pmr                 PMR (Fan et al., CVPR 2023): per-class prototypes of each modality's features before each
                      epoch; the weaker modality's cross-entropy over negative distances to them added
                      (dyngap_jax/methods/pmr.py); two modalities
  mla                 MLA (Zhang et al., CVPR 2024): a unimodal step a modality through one shared head, each
                      batch; entropy-weighted fusion of the modalities' logits at test time
                      (dyngap_jax/methods/mla.py)
  gblending           Gradient-Blending (Wang et al., CVPR 2020): the fused and unimodal heads' losses weighted by
                      each head's generalisation gain over its overfitting squared, estimated every 10 epochs by
                      training copies (dyngap_jax/methods/gblending.py); a head a modality beside the concat head

The authors' recipes select the best epoch on validation, as every method here; their code keeps the
best test accuracy, which ``--config.train.select_split=test`` reproduces (flagged in the output).

Batch sizes are global: ``train.batch_size``, ``train.eval_batch_size`` and ``alpha.batch_size`` are
the examples of one step over all processes and devices (each process loads its share; a training
batch must divide over the devices of the data axis). Every field is a row of the table in
``dyngap_jax/train/sections.py`` (its default, kind, doc and when it is read; the README lists them)
and is validated before the first step (``dyngap_jax.train.config.validate``); a field the chosen
setup does not read is warned about when set. Every method of every data set's config validates
(``tests/test_config.py`` iterates :data:`METHODS` over each one). The learned alpha's defaults come from ``dyngap_jax.alpha.LearnedAlpha`` and the
hypergradient method's from its class in ``dyngap_jax.hypergrad`` (``alpha.hypergrad.options`` left
``None`` take them, so ``--config.alpha.hypergrad.method=minres`` alone is MINRES with its defaults).
"""
from __future__ import annotations

import ml_collections

from dyngap_jax import methods
from dyngap_jax.train.config import base_config


def base(dataset: str, data_dir: str) -> ml_collections.ConfigDict:
    """Every field with its generic default (``dyngap_jax.train.config.base_config``); a data set's
    config sets ``model`` and the required ``train`` fields (``num_epochs``, ``batch_size``,
    ``learning_rate``)."""
    return base_config(dataset, data_dir)


METHODS = ("concat", "constant:<a>", "stepwise:<p>", "ours_h", "ours_lb", "ours_lb_vector", "lfm_code", "authors_learned",
           "authors_fitted", "unimodal:<modality>", "ogm_ge", "mmpareto", "mslr", "agm", "pmr", "mla", "gblending")
# the balancing methods (config.balance.method): their options' defaults are their Options classes' (the original
# code's); these are the config's own settings, and a data set's config may add its own (apply_method's
# balance_options). Those of two modalities (their `modalities`) are refused for more by validate.
BALANCE = {"ogm_ge": {}, "mmpareto": {}, "mslr": {}, "agm": {}, "pmr": {}, "mla": {}, "gblending": {}}
TWO_MODALITIES = tuple(name for name in BALANCE if methods.get(name).modalities[1] == 2)


def method_args(modalities) -> list[str]:
    """Every method of :data:`METHODS` as a ``get_config`` argument (a value for each ``<...>``; every modality
    for ``unimodal``): what ``tests/test_config.py`` validates for every data set's config."""
    out = []
    for name in METHODS:
        if name in TWO_MODALITIES and len(modalities) != 2:
            continue
        if name == "unimodal:<modality>":
            out += [f"unimodal:{m}" for m in modalities]
        else:
            out.append(name.replace("<a>", "0.5").replace("<p>", "0.05"))
    return out


def apply_method(c: ml_collections.ConfigDict, arg: str, balance_options: dict | None = None) -> ml_collections.ConfigDict:
    """``c`` with the method ``arg`` (see the module docstring); ``balance_options``: a data set's own defaults for
    the balancing methods' options, ``{method: {option: value}}``."""
    name, _, value = (arg or "ours_lb").partition(":")
    c.method = arg or "ours_lb"
    if name in BALANCE:  # the method's own loss (loss.* and alpha.* are LFM's, not read)
        c.balance.method = name
        c.balance.options.update({**BALANCE[name], **(balance_options or {}).get(name, {})})
        if name in ("mmpareto", "gblending"):  # the concat head and a linear head a modality
            c.model.fusion = {"name": "concat", "unimodal_heads": True}
        elif name == "mslr":  # their AVClassifier_Sum: a linear head a modality, the logits summed
            c.model.fusion = {"name": "sum", "reduce": "sum"}
        elif name == "mla":  # their fc_out: one head every modality's features go through
            c.model.fusion = {"name": "shared"}
    elif name == "concat":
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
        c.alpha.hypergrad.warm_power = True  # a relative damping's power iteration from the last step's (issue 25)
        c.alpha.hypergrad.reuse_lambda = True  # and then only at the first step: the last solve's top Ritz value
    elif name == "lfm_code":
        c.alpha.strategy = "learned"
        c.loss.mm = "js"
        c.alpha.learned.init = 0.95
        c.alpha.learned.clip = (0.05, 0.95)
        c.alpha.learned.schedule = "authors"
        c.alpha.hypergrad.method = "lfm_code"
        c.alpha.hypergrad.options.reduction = "first_tensor_mean"
        c.alpha.hypergrad.options.tensor = "first"  # PyTorch's first parameter: the one the model creates first
    elif name in ("authors_learned", "authors_fitted"):
        authors_recipe(c, learned=name == "authors_learned")
    elif name == "unimodal":
        if value not in c.model.modalities:
            raise ValueError(f"config method unimodal:{value}: modality must be one of {list(c.model.modalities)}")
        c.model.modalities = [value]
        c.model.encoders = {value: c.model.encoders[value].to_dict()}
        c.model.projection_dim = None
        # the other modalities' data settings go with their encoders (their frames and masks are not read)
        c.data.frames = {m: f.to_dict() for m, f in c.data.frames.items() if m == value}
        c.data.masks = [m for m in c.data.masks if m == value]
        c.alpha.strategy = "constant:0.0"
        c.loss.mm = "none"
    else:
        raise ValueError(
            f"unknown method {arg!r}; known: concat, constant:<a>, stepwise:<p>, ours_h, ours_lb, ours_lb_vector, "
            f"lfm_code, authors_learned, authors_fitted, unimodal:<modality>, {', '.join(BALANCE)}"
        )
    return c


def authors_recipe(c: ml_collections.ConfigDict, learned: bool) -> ml_collections.ConfigDict:
    """The authors' released recipe (njustkmg/NeurIPS24-LFM, Crema_epoch_learnable.py / Crema_epoch.py and
    model/AudioVideo.py) on any data set's model; docs/results.md tabulates it against the paper's text."""
    c.loss.mm = "js"  # their Alignment(): the Jensen-Shannon variant between the heads' softmaxed logits
    c.loss.scale = 2.0  # loss = 2 * (cls_k[0] L_CLS + cls_k[1] L_align)
    c.model.fusion = {"name": "sum", "reduce": "mean"}  # cls_a, cls_v heads; the loss on 0.5 o_a + 0.5 o_v
    defaults = base_config("", "").train
    c.train.update({"optimizer": "sgd", "learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 1e-4,
                    "schedule": "step", "step_every_epochs": 70, "step_factor": 0.1, "step_at_epoch_start": True,
                    "batch_size": 64, "num_epochs": 200,
                    # no plateau: the data set's plateau settings do not apply
                    "plateau_factor": defaults.plateau_factor, "plateau_patience": defaults.plateau_patience})
    if not learned:
        c.alpha.strategy = "authors_fitted"
        return c
    c.alpha.strategy = "learned"
    c.alpha.when = "epoch_start"  # getAlpha_Learnable(...) before train_audio_video(...), epoch 0 included
    c.alpha.inner_iters = 0
    c.alpha.heldout = 16  # val_indices = torch.randperm(num_samples)[:16], removed from the training set
    c.alpha.outer = "heldout"
    c.alpha.inner = "outer"  # H and g on the same half of the held-out batch
    c.alpha.batch_size = 8
    c.alpha.batch_norm = "authors"
    c.alpha.learned.update({"init": 0.95, "clip": (0.05, 0.95), "schedule": "authors", "precision": "float64"})
    c.alpha.hypergrad.method = "lfm_code"
    c.alpha.hypergrad.options.reduction = "first_tensor_mean"
    c.alpha.hypergrad.options.tensor = "first"
    return c
