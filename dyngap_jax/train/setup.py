"""The one place a config becomes a run's parts: mesh, records, model, optimiser, training method, steps.

``run = setup(config)`` validates the whole config (:mod:`dyngap_jax.train.config`), reads the
records' manifest, checks the batch sizes against the split and the devices, builds the model and
reads its parameters' order and count off an abstract initialisation, and makes the training
method (``config.balance.method``: LFM by default, with its hypergradient method resolved against
the model), all before anything is written or trained. Every part of the :class:`Run` is built
there, so none depends on the order the others are used in. ``run.create_train_state()`` is the
only way a train state is made (training, restoring, the comparison, Grad-CAM, the benchmarks), so
a checkpoint always restores into the tree it was saved from. ``setup(config, data=False,
example=batch)`` serves code without records (benchmarks on synthetic batches).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dyngap_jax import methods, models, parallel
from dyngap_jax.data import augment
from dyngap_jax.data import loader as data_loader
from dyngap_jax.data.records import Manifest, load_manifest
from dyngap_jax.methods import RunInfo, TrainState
from dyngap_jax.train.config import Config, ConfigError, validate
from dyngap_jax.train.steps import make_eval_step, make_train_step


def make_optimizer(tcfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum, weight decay, plateau x factor on the epoch's mean loss, or a step decay) or Adam (Sec. 4.1);
    ``tcfg`` is the config's ``train`` section."""
    lr = tcfg.learning_rate
    if tcfg.schedule == "step":
        every = tcfg.step_every_epochs
        if tcfg.step_at_epoch_start:
            # PyTorch's StepLR stepped before each epoch's training (the authors' code): epoch e (from 0) trains at
            # lr * factor^((e + 1) // every), the first decay one epoch early; optax's count is the step's index
            last = tcfg.num_epochs // every + 1
            lr = optax.piecewise_constant_schedule(lr, {(k * every - 1) * steps_per_epoch: tcfg.step_factor
                                                        for k in range(1, last + 1)})
        else:
            lr = optax.exponential_decay(lr, transition_steps=every * steps_per_epoch, decay_rate=tcfg.step_factor,
                                         staircase=True)
    parts = []
    if tcfg.weight_decay:
        parts.append(optax.add_decayed_weights(tcfg.weight_decay))
    parts.append(optax.sgd(lr, momentum=tcfg.momentum) if tcfg.optimizer == "sgd" else optax.adam(lr))
    if tcfg.schedule == "plateau":
        # the decision is taken on the mean training loss of each epoch
        parts.append(optax.contrib.reduce_on_plateau(factor=tcfg.plateau_factor, patience=tcfg.plateau_patience,
                                                     accumulation_size=steps_per_epoch))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """Global sizes (the config's) and this process's share of each."""

    train: int
    eval: int
    alpha: int
    local_train: int
    local_eval: int
    local_alpha: int


class CompiledSteps(NamedTuple):
    """The run's jitted steps: train, evaluation, and LFM's alpha step (None without a learned alpha)."""

    train: Any
    eval: Any
    alpha: Any


@dataclasses.dataclass(frozen=True)
class Run:
    """What a config turns into (see the module docstring). ``cfg`` is the validated :class:`Config`.

    ``example``: two training examples as the model takes them (what initialises it); ``info``: the
    parameters' order and count; ``method``: the training method; ``heldout``: the training examples
    held out of training for the alpha step (record indices, in the order drawn).
    """

    cfg: Config
    warnings: list[str]
    mesh: Any
    manifest: Manifest | None
    steps_per_epoch: int
    batch: BatchSizes
    model: models.MultimodalClassifier
    pretrained: dict
    example: dict
    info: RunInfo
    tx: optax.GradientTransformation
    method: methods.Method
    heldout: np.ndarray

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.model.modalities)

    # ---- data

    @property
    def frames(self) -> dict[str, augment.FrameAugment]:
        """The frame modalities' settings (``config.data.frames``): size, normalisation, augmentation."""
        return _frames(self.cfg)

    def heldout_batch(self) -> dict:
        """This process's part of the fixed alpha batch of ``alpha.outer='heldout'``: the first
        ``alpha.batch_size`` held-out examples, augmented once (the same batch every alpha step)."""
        rows = self.heldout[:self.batch.alpha]
        p = jax.process_index()
        batch = data_loader.load_examples(self.cfg.data_dir, "train", rows, seed=self.cfg.seed, **_record_options(self.cfg))
        return {k: v[p * self.batch.local_alpha:(p + 1) * self.batch.local_alpha] for k, v in batch.items()}

    @property
    def prepare(self) -> Callable:
        """``prepare(batch)``: a loader batch -> the model's inputs (traced inside every step: frames
        cropped, resized, flipped and normalised on the device; the identity without frames)."""
        return augment.make_prepare(self.frames)

    def prepare_batch(self, batch: Mapping) -> dict:
        """A loader batch as the model's inputs, computed now (for code outside the steps)."""
        return _prepare_now(self.frames, batch)

    def loader(self, split: str, *, train: bool, epoch: int = 0, infinite: bool = False, batch_size: int | None = None):
        """This process's loader of ``split``; ``batch_size`` is global (default: the train batch). Its
        batches are what the steps take (frames as stored, with each training example's crop box and flip)."""
        return _loader(self.cfg, split, train=train, epoch=epoch, infinite=infinite, heldout=self.heldout,
                       local=self.batch.local_train if batch_size is None else _local(batch_size, "batch_size"))

    def example_batch(self) -> dict:
        """The training split's first two examples (unshuffled), as the evaluation loader gives them."""
        return next(iter(self.loader("train", train=False, batch_size=2 * jax.process_count())))

    # ---- state and steps

    def create_train_state(self, key: jax.Array | None = None) -> TrainState:
        """A fresh train state (parameters initialised from ``config.seed``, or ``key``), on the host.

        The tree is the config's and its method's (its optimiser state, its alpha, its own state), so
        checkpoints restore into it."""
        key = jax.random.PRNGKey(self.cfg.seed) if key is None else key
        variables = models.init_variables(self.model, key, self.example, self.pretrained)
        if self.cfg.precision.compute_dtype == "float64":
            variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                                               else x, variables)
        params = variables.pop("params")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                          opt_state=self.tx.init(params), rng=jax.random.fold_in(key, 1),
                          **self.method.init_fields(params))

    def shardings(self, state: TrainState):
        """``(state, batch, replicated)`` shardings on the run's mesh."""
        state_sh = parallel.state_shardings(state, self.mesh, self.cfg.parallel.shard_params)
        return state_sh, parallel.batch_sharding(self.mesh), parallel.replicated(self.mesh)

    @property
    def compute_model(self) -> models.MultimodalClassifier:
        """The model the train and evaluation steps run, at ``config.train.compute_dtype`` (bfloat16: every
        encoder and head in bfloat16 on float32 parameters; losses stay float32)."""
        dtype = self.cfg.precision.compute_dtype
        return self.model if dtype == "float32" else models.with_dtype(self.model, jnp.dtype(dtype))

    def train_step(self, state: TrainState, donate: bool = True):
        """The jitted train step (the method's) on the run's mesh, at the resolved matmul precision."""
        return make_train_step(model=self.compute_model, tx=self.tx, method=self.method, shardings=self.shardings(state),
                               precision=self.cfg.precision.matmul, prepare=self.prepare, donate=donate)

    def eval_step(self, state: TrainState):
        """The jitted evaluation step on the run's mesh (the method's fusion of the modalities)."""
        return make_eval_step(model=self.compute_model, method=self.method, shardings=self.shardings(state),
                              precision=self.cfg.precision.matmul, prepare=self.prepare)

    def compile_steps(self, state: TrainState, donate: bool = True) -> CompiledSteps:
        """``(train_step, eval_step, alpha_step or None)`` for code that drives the steps itself (tests,
        benchmarks). ``donate``: the train and alpha steps reuse the input state's buffers (pass False to
        call a step twice on the same state)."""
        alpha = next((p.compile(self, state, donate) for p in self.method.parts() if p.name == "alpha"
                      and hasattr(p, "compile")), None)
        return CompiledSteps(self.train_step(state, donate), self.eval_step(state), alpha)


def _frames(cfg: Config) -> dict[str, augment.FrameAugment]:
    return {m: augment.FrameAugment(size=f.size, normalize=f.normalize, select=f.select,
                                    random_resized_crop=f.random_resized_crop, scale=f.crop_scale, flip=f.flip)
            for m, f in cfg.data.frames.items()}


def _prepare_now(frames, batch: Mapping) -> dict:
    if not frames:
        return dict(batch)
    return jax.jit(augment.make_prepare(frames))(dict(batch))


def _expect(cfg: Config) -> dict:
    return {"name": cfg.dataset, "num_classes": cfg.model.num_classes, "modalities": {m: None for m in cfg.model.modalities}}


def _record_options(cfg: Config) -> dict:
    """What every reader of the run's records is given: the modalities (and masks) to decode, the frame
    settings, standardisation, the manifest's expected contents, checksum verification."""
    return {"modalities": list(cfg.model.modalities) + [f"{m}_mask" for m in cfg.data.masks], "frames": _frames(cfg),
            "standardize": cfg.data.standardize, "expect": _expect(cfg), "verify": cfg.data.verify_checksums}


def _loader(cfg: Config, split: str, *, train: bool, epoch: int, infinite: bool, heldout, local: int):
    return data_loader.make_loader(
        cfg.data_dir, split, batch_size=local, train=train, seed=(cfg.seed * 1009 + epoch) % (2**31),
        num_epochs=None if infinite else 1, worker_count=cfg.data.worker_count,
        fraction=cfg.data.train_fraction if split == "train" else 1.0,
        exclude=heldout if split == "train" else (), **_record_options(cfg))


def _local(global_size: int, field: str) -> int:
    if global_size % jax.process_count():
        raise ConfigError(f"config.{field}={global_size} is not divisible by the {jax.process_count()} processes "
                          "(batch sizes are global)")
    return global_size // jax.process_count()


def _batch_sizes(cfg: Config, mesh, n_train: int | None) -> BatchSizes:
    t, a = cfg.train, cfg.alpha
    n_local_devices = mesh.shape["data"] // jax.process_count()
    local_train = _local(t.batch_size, "train.batch_size")
    if local_train % n_local_devices:
        raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by the {mesh.shape['data']} devices "
                          "of the data axis")
    if n_train is not None and local_train > n_train // jax.process_count():
        raise ConfigError(f"config.train.batch_size={t.batch_size} is larger than the training split ({n_train})")
    eval_size = t.eval_batch_size or t.batch_size
    alpha = a.batch_size or t.batch_size
    local_alpha = _local(alpha, "alpha.batch_size")
    if a.strategy == "learned" and (alpha > t.batch_size or local_alpha % n_local_devices):
        raise ConfigError(f"config.alpha.batch_size={alpha} must be at most config.train.batch_size={t.batch_size} "
                          f"and divide over the {mesh.shape['data']} devices of the data axis")
    return BatchSizes(t.batch_size, eval_size, alpha, local_train, _local(eval_size, "train.eval_batch_size"), local_alpha)


def _records(cfg: Config):
    """``(manifest, training examples, held-out indices)``, every split the run reads checked and hashed."""
    manifest = load_manifest(cfg.data_dir)
    data_loader.check_manifest(manifest, folder=cfg.data_dir, split="train", **_expect(cfg))
    if "validation" not in manifest.splits:
        raise ConfigError(f"config.data_dir: {cfg.data_dir} has no validation split to select the best epoch on "
                          "(never on test)")
    if cfg.train.select_split not in manifest.splits:
        raise ConfigError(f"config.train.select_split={cfg.train.select_split!r}: {cfg.data_dir} has no "
                          f"{cfg.train.select_split} split (it has {', '.join(sorted(manifest.splits))})")
    n_all = manifest.splits["train"]["num_examples"]
    reads_alpha = "alpha" in methods.get(cfg.balance.method).reads
    held = cfg.alpha.heldout if cfg.alpha.strategy == "learned" and reads_alpha else 0
    if held >= n_all:
        raise ConfigError(f"config.alpha.heldout={held}: the training split has {n_all} examples")
    heldout = data_loader.heldout_indices(n_all, held, cfg.seed) if held else np.zeros((0,), np.int64)
    n_train = len(data_loader.kept_indices(n_all, cfg.data.train_fraction, exclude=range(held)))
    for split in ("train", "validation", "test"):  # checked (and hashed, once a process) before anything is written
        if split in manifest.splits:
            data_loader.open_split(cfg.data_dir, split, verify=cfg.data.verify_checksums, **_expect(cfg))
    return manifest, n_train, heldout


def setup(config, *, data: bool = True, example: Mapping | None = None, steps_per_epoch: int | None = None) -> Run:
    """Validate ``config`` and build its run (see the module docstring). Nothing is written.

    ``data=False`` skips the records; ``example`` (a loader batch, or already the model's inputs) then
    initialises the model, and ``steps_per_epoch`` (default 1) sets the plateau's accumulation, the step
    schedule and the authors' alpha schedule.
    """
    cfg, warnings = validate(config)
    mesh = parallel.make_mesh(cfg.parallel.data, cfg.parallel.model)
    manifest, n_train, heldout = (_records(cfg) if data else (None, None, np.zeros((0,), np.int64)))
    batch = _batch_sizes(cfg, mesh, n_train)
    if steps_per_epoch is None:
        steps_per_epoch = (n_train // jax.process_count()) // batch.local_train if data else 1
    try:
        model, pretrained = models.build_model(cfg.model.to_dict())
    except ValueError as e:
        msg = str(e)
        raise ConfigError(f"config.{msg}" if msg.startswith("model.") else f"config.model: {msg}") from None
    if example is None:
        if not data:
            raise ValueError("setup(config, data=False) needs `example=`: a batch to initialise the model with")
        example = next(iter(_loader(cfg, "train", train=False, epoch=0, infinite=False, heldout=heldout,
                                    local=2)))
    example = _prepare_now(_frames(cfg), example)
    order, count, widths = models.parameter_info(model, example)
    info = RunInfo(steps_per_epoch=steps_per_epoch, parameter_order=tuple(order), num_params=count, feature_dims=widths)
    try:
        method = methods.get(cfg.balance.method)(cfg, info, cfg.balance.resolved)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("config.") else f"config.balance.method: {e}") from None
    for w in warnings:
        logging.warning("%s", w)
    return Run(cfg=cfg, warnings=list(warnings), mesh=mesh, manifest=manifest, steps_per_epoch=steps_per_epoch,
               batch=batch, model=model, pretrained=pretrained, example=example, info=info,
               tx=make_optimizer(cfg.train, steps_per_epoch), method=method, heldout=heldout)


def create_train_state(config, example: Mapping | None = None, key: jax.Array | None = None) -> TrainState:
    """The train state of ``config`` (``setup(config).create_train_state(key)``; without records when
    ``example`` is given). Use :func:`setup` when the model or the steps are needed too."""
    return setup(config, data=example is None, example=example).create_train_state(key)


__all__ = ["BatchSizes", "CompiledSteps", "Run", "create_train_state", "make_optimizer", "setup"]
