"""The one place a config becomes a run's objects: model, optimiser, alpha strategy (with its
hypergradient method), L_MM, mesh, loaders, and the train state.

``run = setup(config)`` validates the whole config (:mod:`dyngap_jax.train.config`), reads the records'
manifest, checks the batch sizes against the split and the devices and builds the model, all before
anything is written or trained; ``run.create_train_state()`` is the only way a train state is made
(training, evaluation and restoring, the hypergradient comparison, Grad-CAM and the benchmarks use
it, so a checkpoint always restores into the tree it was saved from). ``setup(config, data=False)``
serves code without records (benchmarks on synthetic batches; give ``create_train_state`` an example).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import hypergrad, models, parallel
from dyngap_jax.data import augment
from dyngap_jax.data import loader as data_loader
from dyngap_jax.data.records import Manifest, load_manifest
from dyngap_jax.train.config import ConfigError, learned_alpha, validate
from dyngap_jax.train.steps import (
    TRAINING_INPUTS,
    TrainState,
    make_alpha_step,
    make_eval_step,
    make_train_step,
    mm_loss_fn,
)


def make_optimizer(tcfg: Mapping, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum, weight decay, plateau x factor on the epoch's mean loss, or a step decay) or Adam (Sec. 4.1)."""
    lr = tcfg["learning_rate"]
    if tcfg["schedule"] == "step":
        every = tcfg["step_every_epochs"]
        if tcfg["step_at_epoch_start"]:
            # PyTorch's StepLR stepped before each epoch's training (the authors' code): epoch e (from 0) trains at
            # lr * factor^((e + 1) // every), the first decay one epoch early; optax's count is the step's index
            last = tcfg["num_epochs"] // every + 1
            lr = optax.piecewise_constant_schedule(lr, {(k * every - 1) * steps_per_epoch: tcfg["step_factor"]
                                                        for k in range(1, last + 1)})
        else:
            lr = optax.exponential_decay(lr, transition_steps=every * steps_per_epoch, decay_rate=tcfg["step_factor"],
                                         staircase=True)
    parts = []
    if tcfg["weight_decay"]:
        parts.append(optax.add_decayed_weights(tcfg["weight_decay"]))
    parts.append(optax.sgd(lr, momentum=tcfg["momentum"]) if tcfg["optimizer"] == "sgd" else optax.adam(lr))
    if tcfg["schedule"] == "plateau":
        # the decision is taken on the mean training loss of each epoch
        parts.append(optax.contrib.reduce_on_plateau(factor=tcfg["plateau_factor"], patience=tcfg["plateau_patience"],
                                                     accumulation_size=steps_per_epoch))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The alpha strategy: a fixed schedule ``fixed(epoch, num_epochs)``, or the learned alpha with its method."""

    name: str
    fixed: Callable | None = None
    learned: alpha_lib.LearnedAlpha | None = None
    method: hypergrad.Method | None = None
    require_converged: bool = False
    precision: str = "highest"
    warm_start: bool = False  # the method takes a warm start and the config asks for one
    hvp_remat: str = "none"

    def value(self, epoch: int, num_epochs: int):
        """The fixed strategy's alpha at ``epoch`` (counted from 1, as the paper's t)."""
        return self.fixed(epoch, num_epochs)


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """Global sizes (the config's) and this process's share of each."""

    train: int
    eval: int
    alpha: int
    local_train: int
    local_eval: int
    local_alpha: int


@dataclasses.dataclass
class Run:
    """What a config turns into. ``cfg`` is the validated config as a plain dict."""

    cfg: dict
    warnings: list[str]
    mesh: Any
    manifest: Manifest | None
    steps_per_epoch: int
    batch: BatchSizes
    model: models.MultimodalClassifier
    pretrained: dict
    tx: optax.GradientTransformation
    strategy: Strategy
    mm_loss: Callable
    # the parameters' '/'-joined paths in the order the model creates them (set by create_train_state)
    parameter_order: list[str] | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg["model"]["modalities"])

    # ---- data

    @property
    def frames(self) -> dict[str, augment.FrameAugment]:
        """The frame modalities' settings (``config.data.frames``): size, normalisation, augmentation."""
        return {m: augment.FrameAugment(size=tuple(f["size"]) if f.get("size") else None,
                                        normalize=f.get("normalize", True),
                                        select=tuple(f["select"]) if f.get("select") is not None else None)
                for m, f in self.cfg["data"]["frames"].items()}

    @property
    def heldout(self) -> np.ndarray:
        """The training examples held out for the alpha step (``config.alpha.heldout``; record indices in the
        order they were drawn), empty unless the strategy is learned and holds some out."""
        acfg = self.cfg["alpha"]
        if self.strategy.learned is None or not acfg["heldout"] or self.manifest is None:
            return np.zeros((0,), np.int64)
        n = self.manifest.splits["train"]["num_examples"]
        return data_loader.heldout_indices(n, acfg["heldout"], self.cfg["seed"])

    def heldout_batch(self) -> dict:
        """This process's part of the fixed alpha batch of ``alpha.outer='heldout'``: the first
        ``alpha.batch_size`` held-out examples, augmented once (the same batch every alpha step)."""
        cfg = self.cfg
        rows = self.heldout[:self.batch.alpha]
        p = jax.process_index()
        batch = data_loader.load_examples(cfg["data_dir"], "train", rows, seed=cfg["seed"], **self._record_options())
        return {k: v[p * self.batch.local_alpha:(p + 1) * self.batch.local_alpha] for k, v in batch.items()}

    @property
    def prepare(self) -> Callable:
        """``prepare(batch)``: a loader batch -> the model's inputs (traced inside every step: frames
        cropped, resized, flipped and normalised on the device; the identity without frames)."""
        return augment.make_prepare(self.frames)

    def prepare_batch(self, batch: Mapping) -> dict:
        """A loader batch as the model's inputs, computed now (for code outside the steps: model
        initialisation, Grad-CAM, the hypergradient comparison's own closures)."""
        if not self.frames:
            return dict(batch)
        return jax.jit(self.prepare)(dict(batch))

    def loader(self, split: str, *, train: bool, epoch: int = 0, infinite: bool = False, batch_size: int | None = None):
        """This process's loader of ``split``; ``batch_size`` is global (default: the train batch).

        Its batches are what the steps take: frames as stored, with each training example's crop
        box and flip (:meth:`prepare` makes the model's inputs of them)."""
        cfg = self.cfg
        local = self.batch.local_train if batch_size is None else _local(batch_size, "batch_size")
        return data_loader.make_loader(
            cfg["data_dir"], split, batch_size=local, train=train, seed=(cfg["seed"] * 1009 + epoch) % (2**31),
            num_epochs=None if infinite else 1, worker_count=cfg["data"]["worker_count"],
            fraction=cfg["data"]["train_fraction"] if split == "train" else 1.0,
            exclude=self.heldout if split == "train" else (), **self._record_options())

    def _record_options(self) -> dict:
        """What every reader of the run's records is given: the modalities (and masks) to decode, the frame
        settings, standardisation, the manifest's expected contents, checksum verification."""
        cfg = self.cfg
        return {"modalities": self.modalities + [f"{m}_mask" for m in cfg["data"]["masks"]], "frames": self.frames,
                "standardize": cfg["data"]["standardize"], "expect": _expect(cfg),
                "verify": cfg["data"]["verify_checksums"]}

    def example_batch(self) -> dict:
        """The training split's first two examples (unshuffled), as the evaluation loader gives them."""
        return next(iter(self.loader("train", train=False, batch_size=2 * jax.process_count())))

    # ---- state and steps

    def create_train_state(self, example: Mapping | None = None, key: jax.Array | None = None) -> TrainState:
        """A fresh train state (parameters initialised from ``config.seed``, or ``key``), on the host.

        The tree is the config's: its optimiser state, its alpha (scalar or one per pair, the
        optimiser and schedule of ``config.alpha.learned``), so checkpoints restore into it.
        ``example`` is a loader batch (prepared here) or already the model's inputs.
        """
        example = self.prepare_batch(self.example_batch() if example is None else example)
        key = jax.random.PRNGKey(self.cfg["seed"]) if key is None else key
        variables = models.init_variables(self.model, key, example, self.pretrained)
        self.parameter_order = models.parameter_order(self.model, example)
        if self.cfg["train"]["compute_dtype"] == "float64":
            if not jax.config.jax_enable_x64:
                raise ConfigError("config.train.compute_dtype='float64' needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 "
                                  "(or run inside jax.enable_x64(True))")
            variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                                               else x, variables)
        params = variables.pop("params")
        if isinstance(self.strategy.method, hypergrad.Dense):
            n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
            try:
                self.strategy.method.check_size(n)
            except hypergrad.OptionError as e:
                raise ConfigError(f"config.alpha.hypergrad.options.max_params: {e}") from None
        learned = self.strategy.learned or alpha_lib.LearnedAlpha(init=0.0)
        solution = jax.tree_util.tree_map(jnp.zeros_like, params) if self.strategy.warm_start else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                          opt_state=self.tx.init(params), alpha=learned.create(), rng=jax.random.fold_in(key, 1),
                          alpha_solution=solution)

    def shardings(self, state: TrainState):
        """``(state, batch, replicated)`` shardings on the run's mesh."""
        state_sh = parallel.state_shardings(state, self.mesh, self.cfg["parallel"]["shard_params"])
        return state_sh, parallel.batch_sharding(self.mesh), parallel.replicated(self.mesh)

    @property
    def compute_model(self) -> models.MultimodalClassifier:
        """The model the train and evaluation steps run: at ``config.train.compute_dtype`` (bfloat16:
        every encoder and head computes in bfloat16 on float32 parameters; losses stay float32). The
        alpha step runs :attr:`model` at its own precision (a float64 run's alpha step too is float64)."""
        dtype = self.cfg["train"]["compute_dtype"]
        return self.model if dtype == "float32" else models.with_dtype(self.model, jnp.dtype(dtype))

    def alpha_method(self) -> hypergrad.Method | None:
        """The learned strategy's method, with the authors' "first tensor" resolved to the parameter the
        model creates first (PyTorch's registration order for modules written in forward order; known
        once :meth:`create_train_state` has initialised the model)."""
        method = self.strategy.method
        if isinstance(method, hypergrad.LFMCode) and method.tensor:
            order = self.parameter_order
            if not order:
                raise ConfigError("config.alpha.hypergrad.options.tensor is checked against the model's parameters: "
                                  "create the train state before compiling the steps")
            if method.tensor == "first":
                method = dataclasses.replace(method, tensor=order[0])
            elif method.tensor not in order:
                raise ConfigError(f"config.alpha.hypergrad.options.tensor: {method.tensor!r} is not a parameter of the "
                                  f"model; its first ones (in PyTorch's order): {', '.join(order[:4])}, ...")
        return method

    def eval_step(self, state: TrainState):
        """The jitted evaluation step on the run's mesh, at ``config.train.matmul_precision``."""
        return make_eval_step(self.compute_model, self.shardings(state), self.cfg["train"]["matmul_precision"],
                              self.prepare)

    def compile_steps(self, state: TrainState, donate: bool = True):
        """``(train_step, eval_step, alpha_step or None)`` jitted with the run's shardings.

        ``donate``: the train and alpha steps reuse the input state's buffers (what training does;
        pass False to call a step twice on the same state)."""
        sh = self.shardings(state)
        precision = self.cfg["train"]["matmul_precision"]
        train_step = make_train_step(self.compute_model, self.tx, self.mm_loss, sh, precision, self.prepare, donate,
                                     self.cfg["loss"]["scale"])
        eval_step = self.eval_step(state)
        alpha_step = None
        if self.strategy.learned is not None:
            s = self.strategy
            float64 = self.cfg["train"]["compute_dtype"] == "float64"
            alpha_step = make_alpha_step(self.compute_model if float64 else self.model, self.mm_loss, s.learned,
                                         self.alpha_method(), s.require_converged, sh,
                                         "highest" if float64 else s.precision, s.warm_start, self.prepare, donate,
                                         s.hvp_remat, self.cfg["alpha"]["batch_norm"])
        return train_step, eval_step, alpha_step


def _local(global_size: int, field: str) -> int:
    if global_size % jax.process_count():
        raise ConfigError(f"config.{field}={global_size} is not divisible by the {jax.process_count()} processes "
                          "(batch sizes are global)")
    return global_size // jax.process_count()


def _expect(cfg: Mapping) -> dict:
    return {"name": cfg["dataset"], "num_classes": cfg["model"]["num_classes"],
            "modalities": {m: None for m in cfg["model"]["modalities"]}}


def _batch_sizes(cfg: Mapping, mesh, n_train: int | None) -> BatchSizes:
    tcfg, acfg = cfg["train"], cfg["alpha"]
    n_local_devices = mesh.shape["data"] // jax.process_count()
    train = tcfg["batch_size"]
    local_train = _local(train, "train.batch_size")
    if local_train % n_local_devices:
        raise ConfigError(f"config.train.batch_size={train} is not divisible by the {mesh.shape['data']} devices "
                          "of the data axis")
    if n_train is not None and local_train > n_train // jax.process_count():
        raise ConfigError(f"config.train.batch_size={train} is larger than the training split ({n_train})")
    eval_size = tcfg["eval_batch_size"] or train
    alpha = acfg["batch_size"] or train
    local_alpha = _local(alpha, "alpha.batch_size")
    if acfg["strategy"] == "learned" and (alpha > train or local_alpha % n_local_devices):
        raise ConfigError(f"config.alpha.batch_size={alpha} must be at most config.train.batch_size={train} "
                          f"and divide over the {mesh.shape['data']} devices of the data axis")
    return BatchSizes(train, eval_size, alpha, local_train, _local(eval_size, "train.eval_batch_size"), local_alpha)


def setup(config, *, data: bool = True, steps_per_epoch: int | None = None) -> Run:
    """Validate ``config`` and build its run (see the module docstring). Nothing is written.

    ``data=False`` skips the records (``steps_per_epoch`` then defaults to 1; it sets the plateau's
    accumulation, the step schedule and the authors' alpha schedule).
    """
    cfg, warnings = validate(config)
    pcfg = cfg["parallel"]
    mesh = parallel.make_mesh(pcfg["data"], pcfg["model"])
    manifest, n_train = None, None
    if data:
        manifest = load_manifest(cfg["data_dir"])
        data_loader.check_manifest(manifest, folder=cfg["data_dir"], split="train", **_expect(cfg))
        if "validation" not in manifest.splits:
            raise ConfigError(f"config.data_dir: {cfg['data_dir']} has no validation split to select the best "
                              "epoch on (never on test)")
        n_all = manifest.splits["train"]["num_examples"]
        held = cfg["alpha"]["heldout"] if cfg["alpha"]["strategy"] == "learned" else 0
        if held >= n_all:
            raise ConfigError(f"config.alpha.heldout={held}: the training split has {n_all} examples")
        n_train = len(data_loader.kept_indices(n_all, cfg["data"]["train_fraction"], exclude=range(held)))
        # every split the run reads, checked (and hashed, once a process) before anything is written
        for split in ("train", "validation", "test"):
            if split in manifest.splits:
                data_loader.open_split(cfg["data_dir"], split, verify=cfg["data"]["verify_checksums"], **_expect(cfg))
    batch = _batch_sizes(cfg, mesh, n_train)
    if steps_per_epoch is None:
        steps_per_epoch = (n_train // jax.process_count()) // batch.local_train if data else 1
    try:
        model, pretrained = models.build_model(cfg["model"])
    except ValueError as e:
        msg = str(e)
        raise ConfigError(f"config.{msg}" if msg.startswith("model.") else f"config.model: {msg}") from None
    tx = make_optimizer(cfg["train"], steps_per_epoch)
    acfg = cfg["alpha"]
    per_pair = acfg["strategy"] == "learned" and acfg["learned"]["per_pair"]
    mm_loss = mm_loss_fn(cfg["loss"]["mm"], cfg["model"]["modalities"], cfg["loss"]["temperature"], per_pair)
    if acfg["strategy"] == "learned":
        inner = acfg["inner_iters"]
        learned = learned_alpha(cfg, max(1, steps_per_epoch // inner) if inner else 1)
        method = hypergrad.method_from_config(acfg["hypergrad"])
        missing = [i for i in method.required_inputs() if i not in TRAINING_INPUTS]
        if missing:
            raise ConfigError(f"config.alpha.hypergrad: method {method.name!r} with these options needs {missing}, "
                              "which the training loop does not provide")
        hcfg = acfg["hypergrad"]
        require = hcfg["require_converged"]
        strategy = Strategy("learned", learned=learned, method=method,
                            require_converged=method.exact if require is None else require,
                            precision=hcfg["precision"], warm_start=hcfg["warm_start"] and "x0" in method.inputs,
                            hvp_remat=hcfg["remat"])
    else:
        strategy = Strategy(acfg["strategy"], fixed=alpha_lib.fixed_strategy(acfg["strategy"]))
    for w in warnings:
        logging.warning("%s", w)
    return Run(cfg=cfg, warnings=warnings, mesh=mesh, manifest=manifest, steps_per_epoch=steps_per_epoch, batch=batch,
               model=model, pretrained=pretrained, tx=tx, strategy=strategy, mm_loss=mm_loss)


def create_train_state(config, example: Mapping | None = None, key: jax.Array | None = None) -> TrainState:
    """The train state of ``config`` (``setup(config).create_train_state(...)``; without records when
    ``example`` is given). Use :func:`setup` when the model or the steps are needed too."""
    return setup(config, data=example is None).create_train_state(example, key)


__all__ = ["BatchSizes", "Run", "Strategy", "create_train_state", "make_optimizer", "setup"]
