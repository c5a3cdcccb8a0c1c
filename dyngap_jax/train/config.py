"""The run config: its generic defaults and its validation, before anything runs.

:func:`base_config` is what every ``configs/<dataset>.py`` starts from (``configs/_base.py``); a data
set's config fills in ``model`` and the required ``train`` fields. :func:`validate` checks the whole
config (every field, whatever the strategy uses) and returns it as a plain dict with the warnings
about fields the chosen setup ignores; :class:`ConfigError` names the field and the valid choices.

Batch sizes are **global**: ``train.batch_size``, ``train.eval_batch_size`` and ``alpha.batch_size``
count the examples of one step over all processes and devices. Each process loads
``size / process_count`` of them, and a training batch must divide over the devices of the data axis
(evaluation batches are padded to divide).

Fields a setup ignores (validated all the same; a value other than the default is warned about once):

* with a fixed alpha strategy: ``alpha.inner_iters``, ``alpha.when``, ``alpha.outer``,
  ``alpha.inner``, ``alpha.heldout``, ``alpha.batch_size``, ``alpha.batch_norm``, ``alpha.learned.*``
  and ``alpha.hypergrad.*``;
* ``loss.temperature`` unless ``loss.mm`` is ``infonce``;
* ``train.momentum`` unless ``train.optimizer`` is ``sgd``; ``train.plateau_*`` unless
  ``train.schedule`` is ``plateau``; ``train.step_*`` unless it is ``step``.

``train.select_split='test'`` (the authors' protocol) is accepted with a warning.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import hypergrad
from dyngap_jax.hypergrad.hvp import REMAT_POLICIES

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("plateau", "step", "constant")
ALPHA_SCHEDULES = ("constant", "authors")
MM_LOSSES = ("infonce", "js", "none")
SELECT_METRICS = ("acc", "map", "f1")
# matmul / convolution precisions (jax.default_matmul_precision): "default" is the backend's (TF32 for float32 on
# NVIDIA GPUs), "highest" full float32; the 3-pass dot algorithms reach about 1e-5 on matmuls but leave
# convolutions at the default; the alpha step may also run its model and solve in "float64"
MATMUL_PRECISIONS = ("default", "high", "highest", "BF16_BF16_F32_X3", "TF32_TF32_F32_X3")
HYPERGRAD_PRECISIONS = MATMUL_PRECISIONS + ("float64",)
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
ALPHA_WHEN = ("after_steps", "epoch_start")
OUTER_BATCHES = ("validation", "train", "heldout")
INNER_BATCHES = ("train", "outer")
ALPHA_BATCH_NORM = ("batch", "running", "authors")
SELECT_SPLITS = ("validation", "test")
SECTIONS = ("dataset", "data_dir", "seed", "progress", "method", "data", "loss", "parallel", "alpha", "model", "train")


class ConfigError(ValueError):
    """A config field with a bad or missing value; the message starts with the field's path."""


def base_config(dataset: str, data_dir: str) -> ml_collections.ConfigDict:
    """Every field of a run config with its generic default (``None`` placeholders: unset or required)."""
    learned = alpha_lib.LearnedAlpha()
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.data_dir = data_dir
    c.seed = 0
    c.progress = True
    c.method = ""
    # train_fraction < 1: a low-data run on a seeded random subset of the training split (the same subset in
    # every run; validation and test stay whole)
    # verify_checksums: each split's shards are hashed against the manifest when the run first opens it
    # worker_count: grain worker processes reading and batching records (None: from the machine's cores,
    # dyngap_jax.data.loader.default_worker_count; 0: in the training process)
    c.data = ml_collections.ConfigDict({"standardize": False, "frames": {}, "masks": [], "worker_count": placeholder(int),
                                        "train_fraction": 1.0, "verify_checksums": True})
    # scale: the train step descends scale * L_total (the authors' code trains on 2 L_total); the alpha step's
    # Hessian and the logged losses are of L_total itself
    c.loss = ml_collections.ConfigDict({"mm": "infonce", "temperature": 0.1, "scale": 1.0})
    # devices: `data` splits every batch (default: all devices); `model` > 1 with shard_params splits large
    # weight matrices too; `distributed` starts JAX's multi-host runtime (see README)
    c.parallel = ml_collections.ConfigDict({
        "data": placeholder(int),
        "model": 1,
        "shard_params": False,
        "distributed": {"auto": False, "coordinator_address": "", "num_processes": placeholder(int),
                        "process_id": placeholder(int)},
    })
    c.alpha = ml_collections.ConfigDict({
        "strategy": "constant:0.0",
        "inner_iters": 0,  # train steps between alpha steps (0: one alpha step per epoch)
        # when: "after_steps" (Algorithm 1: after every inner_iters train steps, or after the epoch's last one) or
        # "epoch_start" (the authors' code: before each epoch's first train step, epoch 0 included; inner_iters 0)
        "when": "after_steps",
        # the batch of the upper-level L_CLS: validation (default), train, or heldout (alpha.heldout training
        # examples drawn once and kept out of training: the first alpha.batch_size of them, augmented once,
        # the same batch every alpha step, as the authors' code)
        "outer": "validation",
        # the inner batch (L_CLS and L_MM, the Hessian's): "train" (the train step's batch) or "outer" (the outer
        # batch itself: H and g on the same examples, as the authors' code)
        "inner": "train",
        "heldout": 0,  # training examples held out for alpha.outer="heldout" (the authors: 16)
        # global examples in the hypergradient's inner and outer batches (None: the train batch); the authors use 8
        "batch_size": placeholder(int),
        # batch_norm: the alpha step's BatchNorm: "batch" (batch statistics, running averages untouched),
        # "running" (the running averages, evaluation mode) or "authors" (batch statistics, and the averages
        # moved as a training-mode forward moves them, until the run's first evaluation; the running averages
        # after it, as the authors' evaluation leaves their model in evaluation mode)
        "batch_norm": "batch",
        # precision: "float64" keeps alpha to double precision (the authors' Python float); see LearnedAlpha
        "learned": {"init": learned.init, "learning_rate": learned.learning_rate, "schedule": "constant",
                    "clip": tuple(learned.clip), "optimizer": learned.optimizer, "per_pair": False,
                    "precision": learned.precision},
        # `method` and the options that are set (None: the method's default; see dyngap_jax.hypergrad).
        # "Exact" (cg, minres, dense) means the method's stated system solved to its tolerance: a solve that
        # stops short is counted and, by default (require_converged None: the method's `exact`), not applied.
        # `precision`: of every matmul and convolution in the alpha step (HVPs, solve), whatever the backend's
        # default; "float64" runs the alpha step's model and solve in float64. `warm_start`: the last solution
        # (kept in the train state, checkpointed) starts the next solve; off by default: measured neutral when
        # every alpha step sees new batches (docs/benchmarks.md)
        # `remat`: what the forward pass under each HVP keeps for its backward pass (none / dots / full: memory
        # against recomputation; the value is the same), dyngap_jax.hypergrad.hvp.REMAT_POLICIES
        "hypergrad": {"method": "cg", "options": {k: placeholder(t) for k, t in hypergrad.option_types().items()},
                      "require_converged": placeholder(bool), "precision": "highest", "warm_start": False,
                      "remat": "none"},
    })
    c.model = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict({
        "num_epochs": placeholder(int), "batch_size": placeholder(int), "eval_batch_size": placeholder(int),
        "optimizer": "sgd", "learning_rate": placeholder(float), "momentum": 0.9, "weight_decay": 0.0,
        "schedule": "plateau", "plateau_factor": 0.1, "plateau_patience": 10,
        "step_every_epochs": placeholder(int), "step_factor": 0.1,
        # step_at_epoch_start: the step schedule decays one epoch early, as PyTorch's StepLR stepped before each
        # epoch's training does (the authors' code): epoch e (from 0) trains at lr * factor^((e + 1) // every)
        "step_at_epoch_start": False,
        "checkpoint_every_steps": 0, "keep_checkpoints": 2, "select_metric": "acc",
        # select_split: the split the best epoch is chosen on; "test" is the authors' code's protocol (the test
        # score of the chosen epoch is then no estimate of anything) and is flagged wherever it is reported
        "select_split": "validation",
        "matmul_precision": "default",  # the train and evaluation steps' (see MATMUL_PRECISIONS)
        # bfloat16: encoders and heads compute in bfloat16 (mixed precision); parameters, optimiser state, losses
        # and metrics stay float32; the alpha step keeps config.alpha.hypergrad.precision. float64: parameters,
        # optimiser state and every computation in float64 (needs JAX_ENABLE_X64=1; reference and parity runs)
        "compute_dtype": "float32",
        # train steps between fetches of the step metrics from the device (and progress-bar updates); the
        # epoch's end and every checkpoint fetch too. No host synchronisation in between.
        "log_every_steps": 50,
    })
    return c


# --------------------------------------------------------------------------- checks


def _plain(x):
    """A ConfigDict or mapping as plain dicts and lists (what ``config.json`` holds)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _get(cfg: Mapping, path: str, required: bool = True):
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if required:
                raise ConfigError(f"config.{path}: missing field")
            return None
        node = node[part]
    if node is None and required:
        raise ConfigError(f"config.{path}: required, but not set")
    return node


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(cfg, path, minimum=None, optional=False):
    v = _get(cfg, path, required=not optional)
    if v is None:
        return None
    if not _is_int(v):
        raise ConfigError(f"config.{path}: must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"config.{path}: must be >= {minimum}, got {v}")
    return int(v)


def _num(cfg, path, low=None, high=None, low_open=False, high_open=False, optional=False):
    v = _get(cfg, path, required=not optional)
    if v is None:
        return None
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"config.{path}: must be a finite number, got {v!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ConfigError(f"config.{path}: must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ConfigError(f"config.{path}: must be {'<' if high_open else '<='} {high}, got {v}")
    return float(v)


def _choice(cfg, path, choices):
    v = _get(cfg, path)
    if v not in choices:
        raise ConfigError(f"config.{path}: unknown {v!r}; known: {', '.join(choices)}")
    return v


def _bool(cfg, path):
    v = _get(cfg, path)
    if not isinstance(v, bool):
        raise ConfigError(f"config.{path}: must be True or False, got {v!r}")
    return v


def _known_keys(cfg, path, known):
    node = _get(cfg, path) if path else cfg
    if not isinstance(node, Mapping):
        raise ConfigError(f"config.{path}: must be a dict of fields, got {node!r}")
    unknown = sorted(set(node) - set(known))
    if unknown:
        where = f"config.{path}." if path else "config."
        raise ConfigError(f"{where}{unknown[0]}: unknown field; {where[:-1]} has {', '.join(sorted(known))}")


# --------------------------------------------------------------------------- validation


def _merged(defaults: Mapping, cfg: Mapping) -> dict:
    """``cfg`` with the fields it leaves out taken from ``defaults`` (sections merged, not replaced)."""
    out = dict(cfg)
    for k, d in defaults.items():
        if k not in out:
            out[k] = d
        elif isinstance(d, Mapping) and d and isinstance(out[k], Mapping) and k != "options":
            out[k] = _merged(d, out[k])
    if "alpha" in out and isinstance(out["alpha"].get("hypergrad"), Mapping):
        hg = out["alpha"]["hypergrad"]
        hg["options"] = {**defaults["alpha"]["hypergrad"]["options"], **dict(hg.get("options") or {})}
    return out


def validate(config) -> tuple[dict, list[str]]:
    """``(cfg, warnings)``: the config as a plain dict, every field checked, or a :class:`ConfigError`.

    Fields the config leaves out take :func:`base_config`'s defaults (a required one left unset fails).

    What needs the data or the devices (batch sizes against the split and the mesh) and the model
    (its encoders by name) is checked by :mod:`dyngap_jax.train.setup`, still before anything is
    written or trained.
    """
    defaults = base_config("", "").to_dict()
    _known_keys(_plain(config), "", SECTIONS)
    cfg = _merged(defaults, _plain(config))
    if not isinstance(_get(cfg, "dataset"), str) or not cfg["dataset"]:
        raise ConfigError("config.dataset: a data set name is required")
    if not isinstance(_get(cfg, "data_dir"), str) or not cfg["data_dir"]:
        raise ConfigError("config.data_dir: the folder of the prepared records is required")
    _int(cfg, "seed")
    _bool(cfg, "progress")
    _validate_data(cfg)
    _validate_model(cfg)
    _validate_train(cfg)
    _validate_parallel(cfg)
    _validate_alpha(cfg)
    _known_keys(cfg, "loss", defaults["loss"])
    mm = _choice(cfg, "loss.mm", MM_LOSSES)
    _num(cfg, "loss.temperature", low=0.0, low_open=True)
    _num(cfg, "loss.scale", low=0.0, low_open=True)
    if len(cfg["model"]["modalities"]) < 2 and mm != "none":
        raise ConfigError(f"config.loss.mm: {mm!r} needs two modalities or more; use 'none' for unimodal runs")
    return cfg, _ignored(cfg, defaults)


def _validate_data(cfg):
    _known_keys(cfg, "data", ("standardize", "frames", "masks", "worker_count", "train_fraction", "verify_checksums"))
    _bool(cfg, "data.standardize")
    _bool(cfg, "data.verify_checksums")
    _num(cfg, "data.train_fraction", low=0.0, high=1.0, low_open=True)
    _int(cfg, "data.worker_count", minimum=0, optional=True)
    for m, spec in (_get(cfg, "data.frames") or {}).items():
        _known_keys(cfg, f"data.frames.{m}", ("size", "normalize", "select"))
        size = spec.get("size")
        if size is not None and (len(size) != 2 or not all(_is_int(s) and s > 0 for s in size)):
            raise ConfigError(f"config.data.frames.{m}.size: [height, width] in pixels, got {size!r}")
        select = spec.get("select")
        if select is not None and (not isinstance(select, (list, tuple)) or not select
                                   or not all(_is_int(i) and i >= 0 for i in select)):
            raise ConfigError(f"config.data.frames.{m}.select: a list of stored frame indices to keep, got {select!r}")
    if not isinstance(_get(cfg, "data.masks"), (list, tuple)):
        raise ConfigError(f"config.data.masks: a list of modality names, got {cfg['data']['masks']!r}")


def _validate_model(cfg):
    mods = _get(cfg, "model.modalities")
    if not isinstance(mods, (list, tuple)) or not mods or len(set(mods)) != len(mods) or \
            not all(isinstance(m, str) and m for m in mods):
        raise ConfigError(f"config.model.modalities: a non-empty list of distinct names, got {mods!r}")
    _int(cfg, "model.num_classes", minimum=2)
    for m in _get(cfg, "data.frames") or {}:
        if m not in mods:
            raise ConfigError(f"config.data.frames.{m}: not a modality of config.model.modalities {list(mods)}")


def _validate_train(cfg):
    _known_keys(cfg, "train", base_config("", "").train.keys())
    _int(cfg, "train.num_epochs", minimum=1)
    _int(cfg, "train.batch_size", minimum=1)
    _int(cfg, "train.eval_batch_size", minimum=1, optional=True)
    _choice(cfg, "train.optimizer", OPTIMIZERS)
    _num(cfg, "train.learning_rate", low=0.0, low_open=True)
    _num(cfg, "train.momentum", low=0.0, high=1.0, high_open=True)
    _num(cfg, "train.weight_decay", low=0.0)
    schedule = _choice(cfg, "train.schedule", SCHEDULES)
    _num(cfg, "train.plateau_factor", low=0.0, high=1.0, low_open=True, high_open=True)
    _int(cfg, "train.plateau_patience", minimum=1)
    _int(cfg, "train.step_every_epochs", minimum=1, optional=True)
    _num(cfg, "train.step_factor", low=0.0, high=1.0, low_open=True)
    if schedule == "step" and cfg["train"].get("step_every_epochs") is None:
        raise ConfigError("config.train.step_every_epochs: required with config.train.schedule='step' "
                          "(epochs between decays by config.train.step_factor)")
    _int(cfg, "train.checkpoint_every_steps", minimum=0)
    _int(cfg, "train.keep_checkpoints", minimum=1)
    _choice(cfg, "train.select_metric", SELECT_METRICS)
    _choice(cfg, "train.select_split", SELECT_SPLITS)
    _bool(cfg, "train.step_at_epoch_start")
    _choice(cfg, "train.matmul_precision", MATMUL_PRECISIONS)
    _choice(cfg, "train.compute_dtype", COMPUTE_DTYPES)
    _int(cfg, "train.log_every_steps", minimum=1)


def _validate_parallel(cfg):
    _known_keys(cfg, "parallel", ("data", "model", "shard_params", "distributed"))
    _int(cfg, "parallel.data", minimum=1, optional=True)
    _int(cfg, "parallel.model", minimum=1)
    _bool(cfg, "parallel.shard_params")
    _known_keys(cfg, "parallel.distributed", ("auto", "coordinator_address", "num_processes", "process_id"))


def _validate_alpha(cfg):
    _known_keys(cfg, "alpha", ("strategy", "inner_iters", "when", "outer", "inner", "heldout", "batch_size", "batch_norm",
                               "learned", "hypergrad"))
    strategy = _get(cfg, "alpha.strategy")
    if strategy != "learned":
        try:
            alpha_lib.fixed_strategy(strategy)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.alpha.strategy: {e}; or 'learned'") from None
    _int(cfg, "alpha.inner_iters", minimum=0)
    when = _choice(cfg, "alpha.when", ALPHA_WHEN)
    if when == "epoch_start" and cfg["alpha"]["inner_iters"]:
        raise ConfigError(f"config.alpha.inner_iters={cfg['alpha']['inner_iters']}: alpha.when='epoch_start' takes one "
                          "alpha step before each epoch; set inner_iters to 0")
    outer = _choice(cfg, "alpha.outer", OUTER_BATCHES)
    _choice(cfg, "alpha.inner", INNER_BATCHES)
    heldout = _int(cfg, "alpha.heldout", minimum=0)
    size = _int(cfg, "alpha.batch_size", minimum=1, optional=True)
    if outer == "heldout" and (size is None or heldout < size):
        raise ConfigError(f"config.alpha.heldout={heldout}: alpha.outer='heldout' takes its batch of alpha.batch_size="
                          f"{size} from the held-out examples; hold out at least that many (and set alpha.batch_size)")
    _choice(cfg, "alpha.batch_norm", ALPHA_BATCH_NORM)
    _known_keys(cfg, "alpha.learned", ("init", "learning_rate", "schedule", "clip", "optimizer", "per_pair", "precision"))
    _choice(cfg, "alpha.learned.precision", ("float32", "float64"))
    _choice(cfg, "alpha.learned.schedule", ALPHA_SCHEDULES)
    _bool(cfg, "alpha.learned.per_pair")
    for field in ("init", "learning_rate"):
        _num(cfg, f"alpha.learned.{field}")
    clip = _get(cfg, "alpha.learned.clip")
    if not isinstance(clip, (list, tuple)) or len(clip) != 2 or not all(isinstance(x, numbers.Real) for x in clip):
        raise ConfigError(f"config.alpha.learned.clip: a pair (lo, hi), got {clip!r}")
    try:
        learned_alpha(cfg, 1)
    except ValueError as e:  # LearnedAlpha names its argument: `init`, `learning_rate`, `clip`, `optimizer`, ...
        field = next((f for f in ("init", "learning_rate", "clip", "optimizer", "precision") if f"`{f}`" in str(e)), "")
        raise ConfigError(f"config.alpha.learned.{field}: {e}") from None
    _known_keys(cfg, "alpha.hypergrad", ("method", "options", "require_converged", "precision", "warm_start", "remat"))
    _choice(cfg, "alpha.hypergrad.remat", REMAT_POLICIES)
    if _get(cfg, "alpha.hypergrad.require_converged", required=False) is not None:
        _bool(cfg, "alpha.hypergrad.require_converged")
    _choice(cfg, "alpha.hypergrad.precision", HYPERGRAD_PRECISIONS)
    _bool(cfg, "alpha.hypergrad.warm_start")
    hypergrad.method_from_config(cfg["alpha"]["hypergrad"])  # raises naming config.alpha.hypergrad.<field>


def learned_alpha(cfg: Mapping, alpha_steps_per_epoch: int) -> alpha_lib.LearnedAlpha:
    """The :class:`~dyngap_jax.alpha.LearnedAlpha` of ``config.alpha.learned`` (one weight per pair if ``per_pair``)."""
    lcfg = cfg["alpha"]["learned"]
    mods = cfg["model"]["modalities"]
    lr = alpha_lib.authors_lr_schedule(alpha_steps_per_epoch) if lcfg["schedule"] == "authors" else lcfg["learning_rate"]
    per_pair = lcfg["per_pair"] and cfg["alpha"]["strategy"] == "learned"
    return alpha_lib.LearnedAlpha(init=lcfg["init"], learning_rate=lr, clip=tuple(lcfg["clip"]),
                                  num_pairs=max(1, len(mods) * (len(mods) - 1) // 2) if per_pair else None,
                                  optimizer=lcfg["optimizer"], precision=lcfg["precision"])


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _ignored(cfg: dict, defaults: dict) -> list[str]:
    """Warnings for fields the chosen setup does not read whose value is not the default."""
    groups = []
    if cfg["alpha"]["strategy"] != "learned":
        groups.append((f"the fixed alpha strategy {cfg['alpha']['strategy']!r}",
                       [f"alpha.{k}" for k in ("inner_iters", "when", "outer", "inner", "heldout", "batch_size",
                                                 "batch_norm", "learned", "hypergrad")]))
    if cfg["loss"]["mm"] != "infonce":
        groups.append((f"config.loss.mm={cfg['loss']['mm']!r}", ["loss.temperature"]))
    if cfg["train"]["optimizer"] != "sgd":
        groups.append((f"config.train.optimizer={cfg['train']['optimizer']!r}", ["train.momentum"]))
    if cfg["train"]["schedule"] != "plateau":
        groups.append((f"config.train.schedule={cfg['train']['schedule']!r}", ["train.plateau_factor", "train.plateau_patience"]))
    if cfg["train"]["schedule"] != "step":
        groups.append((f"config.train.schedule={cfg['train']['schedule']!r}", ["train.step_every_epochs", "train.step_factor",
                                                                              "train.step_at_epoch_start"]))
    flat, flat_default = _flat(cfg), _flat(defaults)
    out = []
    if cfg["train"]["select_split"] == "test":
        out.append("config.train.select_split='test': the best epoch is chosen on the test split (the authors' code's "
                   "protocol), so its test score is no estimate of the test error")
    for reason, prefixes in groups:
        for key in sorted(flat):
            if any(key == p or key.startswith(p + ".") for p in prefixes) and flat[key] != flat_default.get(key):
                out.append(f"config.{key}={flat[key]!r} is ignored with {reason}")
    return out
