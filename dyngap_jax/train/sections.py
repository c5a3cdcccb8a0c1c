"""The table of the run config's fields: one frozen dataclass a section, every field with its default, its
kind (type, range or choices), one line of doc and when the run reads it.

Everything about a field is here once: :func:`dyngap_jax.train.config.base_config` (the defaults
every ``configs/<dataset>.py`` starts from), :func:`~dyngap_jax.train.config.validate` (every value
and every unknown field checked; the sections built), the warnings about fields the chosen setup
ignores, the config module's docstring and the README's list of fields all come from these classes
(``tests/test_config.py`` fails when a field lacks its row or the README its line).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import hypergrad, methods
from dyngap_jax.hypergrad.hvp import REMAT_POLICIES
from dyngap_jax.train.fields import (
    REQUIRED,
    Bool,
    Choice,
    ConfigError,
    Each,
    Free,
    Int,
    Ints,
    Kind,
    Maybe,
    Names,
    Num,
    Pair,
    Sub,
    Text,
    When,
    field,
    section_dict,
)

# matmul / convolution precisions (jax.default_matmul_precision): "default" is the backend's (TF32 for float32 on
# NVIDIA GPUs), "highest" full float32; the 3-pass dot algorithms reach about 1e-5 on matmuls but leave
# convolutions at the default; the alpha step may also run its model and solve in "float64", or "refined": at
# "highest" with its CG's iterations at a reduced precision (iterative refinement; see hypergrad.CG.krylov_precision)
MATMUL_PRECISIONS = ("default", "high", "highest", "BF16_BF16_F32_X3", "TF32_TF32_F32_X3")
HYPERGRAD_PRECISIONS = MATMUL_PRECISIONS + ("float64", "refined")
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "none")

LEARNED = When("alpha.strategy", ("learned",), "the fixed alpha strategy {value!r}")
INFONCE = When("loss.mm", ("infonce",))
SGD = When("train.optimizer", ("sgd",))
PLATEAU = When("train.schedule", ("plateau",))
STEP = When("train.schedule", ("step",))


class Strategy(Kind):
    """A fixed alpha strategy's name (``dyngap_jax.alpha.fixed_strategy``) or ``learned``."""

    def check(self, value, path):
        if value != "learned":
            try:
                alpha_lib.fixed_strategy(value)
            except (ValueError, TypeError, AttributeError) as e:
                raise ConfigError(f"config.{path}: {e}; or 'learned'") from None
        return value

    def describe(self):
        return "constant:<a> \\| stepwise:<p> \\| heuristic \\| authors_exp \\| authors_fitted \\| polynomial:<c..> \\| learned"


class Options(Kind):
    """A method's options by name (``None``: the method's default); every registered option has a slot."""

    def __init__(self, names, owner: str):
        self.names, self.owner = names, owner

    def check(self, value, path):
        if not isinstance(value, dict) and not hasattr(value, "items"):
            raise ConfigError(f"config.{path}: must be a dict of options, got {value!r}")
        out = {k: None for k in self.names()}
        out.update(dict(value))
        return out

    def describe(self):
        return f"options of the chosen {self.owner} (None: its default)"


class Registered(Kind):
    def __init__(self, names, what: str):
        self.names, self.what = names, what

    def check(self, value, path):
        if value not in self.names():
            raise ConfigError(f"config.{path}: unknown {self.what} {value!r}; known: {', '.join(self.names())}")
        return value

    def describe(self):
        return f"a registered {self.what}"


@dataclasses.dataclass(frozen=True)
class FrameConfig:
    size: tuple | None = field(None, Maybe(Ints(1, 2, "[height, width] in pixels")),
                               "the frames' size after augmentation (None: as stored)")
    normalize: bool = field(True, Bool(), "normalise with ImageNet's mean and std (RGB frames)")
    select: tuple | None = field(None, Maybe(Ints(0, None, "a list of stored frame indices to keep")),
                                 "keep these stored frames of each clip (None: all)")
    random_resized_crop: bool = field(True, Bool(), "training: torchvision's random resized crop (off: the whole frame)")
    crop_scale: tuple = field((0.08, 1.0), Pair(), "training: the crop's area fraction range")
    flip: bool = field(True, Bool(), "training: a random horizontal flip (off for digits and text)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    standardize: bool = field(False, Bool(), "standardise tabular views with the converter's train mean and std")
    frames: dict = field({}, Each(FrameConfig, "frame settings by modality"),
                         "`{modality: {size, normalize, select}}` for image and video modalities")
    masks: tuple = field([], Names(nonempty=False), "modalities whose `<m>_mask` feature (text padding) is read too")
    worker_count: int | None = field(None, Maybe(Int(0)),
                                     "grain worker processes (None: the cores less two, at most 16; 0: in-process)")
    train_fraction: float = field(1.0, Num(0.0, 1.0, low_open=True),
                                  "< 1: a low-data run on a seeded subset of the training split")
    verify_checksums: bool = field(True, Bool(), "hash each split's shards against the manifest when first opened")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_classes: int = field(REQUIRED, Int(2), "classes of the task")
    modalities: tuple = field(REQUIRED, Names(), "the modalities, in the fusion head's and L_MM's pair order")
    encoders: dict = field(REQUIRED, Free("models.build_model"), "`{modality: {name, ...}}`: each modality's encoder")
    fusion: dict = field(REQUIRED, Free("models.build_model"), "`{name, ...}`: concat, sum, shared, weighted, film or gated")
    projection_dim: int | None = field(None, Maybe(Int(1)), "a common feature width for L_MM (encoders of other widths)")

    def to_dict(self) -> dict:
        return section_dict(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_epochs: int = field(REQUIRED, Int(1), "epochs to train")
    batch_size: int = field(REQUIRED, Int(1), "global examples in a train step (over processes and devices)")
    eval_batch_size: int | None = field(None, Maybe(Int(1)), "global examples in an evaluation step (None: batch_size)")
    optimizer: str = field("sgd", Choice("sgd", "adam"), "the parameters' optimiser")
    learning_rate: float = field(REQUIRED, Num(0.0, low_open=True), "the parameters' learning rate")
    momentum: float = field(0.9, Num(0.0, 1.0, high_open=True), "SGD's momentum", SGD)
    weight_decay: float = field(0.0, Num(0.0), "decoupled weight decay added to the gradient")
    schedule: str = field("plateau", Choice("plateau", "step", "constant"), "the learning-rate schedule")
    plateau_factor: float = field(0.1, Num(0.0, 1.0, True, True), "the rate's factor on a plateau of the epoch loss",
                                  PLATEAU)
    plateau_patience: int = field(10, Int(1), "epochs without improvement before the rate drops", PLATEAU)
    step_every_epochs: int | None = field(None, Maybe(Int(1)), "epochs between decays (required with step)", STEP)
    step_factor: float = field(0.1, Num(0.0, 1.0, low_open=True), "the rate's factor at each decay", STEP)
    step_at_epoch_start: bool = field(False, Bool(), "decay one epoch early, as StepLR stepped before the epoch "
                                      "(the authors' code)", STEP)
    checkpoint_every_steps: int = field(0, Int(0), "a checkpoint every this many steps too (0: one an epoch)")
    keep_checkpoints: int = field(2, Int(1), "the newest checkpoints kept (the best epoch's is kept besides)")
    select_metric: str = field("acc", Choice("acc", "map", "f1"), "the metric the best epoch is chosen by")
    select_split: str = field("validation", Choice("validation", "test"),
                              "the split the best epoch is chosen on ('test': the authors' protocol, flagged)")
    matmul_precision: str = field("default", Choice(*MATMUL_PRECISIONS),
                                  "every matmul and convolution of the train and evaluation steps")
    compute_dtype: str = field("float32", Choice(*COMPUTE_DTYPES), "the encoders' and heads' computation "
                               "(bfloat16: mixed precision; float64: everything, with JAX_ENABLE_X64=1)")
    log_every_steps: int = field(50, Int(1), "train steps between fetches of the step metrics from the device")
    preempt_signal: str = field("SIGTERM", Choice(*PREEMPT_SIGNALS), "the scheduler's warning: the run finishes its "
                                "step, checkpoints and exits 75 (SIGUSR1/2: also on SIGTERM; none: off)")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    mm: str = field("infonce", Choice("infonce", "js", "none"),
                    "L_MM: symmetric InfoNCE on features, the authors' JS alignment, or none")
    temperature: float = field(0.1, Num(0.0, low_open=True), "InfoNCE's temperature", INFONCE)
    scale: float = field(1.0, Num(0.0, low_open=True), "the train step descends scale x L_total (the authors: 2)")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    auto: bool = field(False, Bool(), "let jax.distributed.initialize read the cluster's variables (SLURM, MPI)")
    coordinator_address: str = field("", Text(what="host:port"), "the coordinator's host:port (with the two below)")
    num_processes: int | None = field(None, Maybe(Int(1)), "processes of the run")
    process_id: int | None = field(None, Maybe(Int(0)), "this process's index")
    heartbeat_timeout: int = field(30, Int(5), "seconds a process may go silent before the others stop, naming it")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int | None = field(None, Maybe(Int(1)), "devices the batches are split over (None: all)")
    model: int = field(1, Int(1), "devices large weight matrices are split over (with shard_params)")
    shard_params: bool = field(False, Bool(), "split large weight matrices over the model axis")
    distributed: DistributedConfig = field(DistributedConfig(), Sub(DistributedConfig),
                                           "JAX's multi-process runtime (README)")


@dataclasses.dataclass(frozen=True)
class LearnedConfig:
    init: float = field(alpha_lib.LearnedAlpha.init, Num(), "alpha's first value")
    learning_rate: float = field(alpha_lib.LearnedAlpha.learning_rate, Num(0.0, low_open=True), "alpha's step size")
    schedule: str = field("constant", Choice("constant", "authors"), "alpha's rate: constant, or the authors' "
                          "(1e-4 halved every 20 epochs)")
    clip: tuple = field(list(alpha_lib.LearnedAlpha.clip), Pair(), "the range alpha is projected onto")
    optimizer: str = field(alpha_lib.LearnedAlpha.optimizer, Choice("sgd", "adam"), "alpha's optimiser")
    per_pair: bool = field(False, Bool(), "one alpha per modality pair")
    precision: str = field(alpha_lib.LearnedAlpha.precision, Choice("float32", "float64"),
                           "alpha and its rate kept to float32 (a float64 run's: float64) or to double precision "
                           "(the authors' Python float)")


@dataclasses.dataclass(frozen=True)
class HypergradConfig:
    method: str = field("cg", Registered(lambda: hypergrad.METHODS, "hypergradient method"),
                        "the hypergradient's estimator (dyngap_jax.hypergrad)")
    options: dict = field({}, Options(lambda: tuple(hypergrad.option_types()), "method"),
                          "the method's options that are set")
    require_converged: bool | None = field(None, Maybe(Bool()), "apply only converged solves (None: the method's "
                                           "`exact`)")
    precision: str = field("highest", Choice(*HYPERGRAD_PRECISIONS), "every matmul and convolution of the alpha step "
                           "(float64: its model and solve in float64; refined: highest, with CG's iterations at "
                           "its krylov_precision, default 'default', and iterative refinement)")
    warm_start: bool = field(False, Bool(), "start each solve from the last solution (kept in the train state)")
    warm_power: bool = field(False, Bool(), "start the power iteration of a relative damping from the last step's "
                             "top direction (kept in the train state); with the method's power_tol it stops early")
    reuse_lambda: bool = field(False, Bool(), "a relative damping's |lambda|_max from the last step's solve (the top "
                               "Ritz value of its CG: no HVP; kept in the train state); the power iteration runs "
                               "only where none is kept (the first step)")
    remat: str = field("none", Choice(*REMAT_POLICIES), "what the forward pass under each HVP keeps")
    loop: str = field("auto", Choice("auto", "device", "host"), "where the solvers' iterations run: in one XLA "
                      "program (device) or one compiled iteration a call (host); auto: host on a CPU")
    # derived: the method object, its options checked (the authors' "first" tensor is resolved by setup)
    estimator: Any = None


@dataclasses.dataclass(frozen=True)
class AlphaConfig:
    strategy: str = field("constant:0.0", Strategy(), "alpha's strategy: a fixed schedule of the epoch, or learned")
    inner_iters: int = field(0, Int(0), "train steps between alpha steps, counted over the run (0: one an epoch)",
                             LEARNED)
    when: str = field("after_steps", Choice("after_steps", "epoch_start"), "an alpha step after train steps "
                      "(Algorithm 1) or before each epoch (the authors' code)", LEARNED)
    outer: str = field("validation", Choice("validation", "train", "heldout"), "the upper-level L_CLS's batches",
                       LEARNED)
    inner: str = field("train", Choice("train", "outer"), "the Hessian's batch: the train step's or the outer one",
                       LEARNED)
    heldout: int = field(0, Int(0), "training examples held out for alpha.outer='heldout' (the authors: 16)", LEARNED)
    batch_size: int | None = field(None, Maybe(Int(1)), "global examples in the alpha step's batches (None: the "
                                   "train batch)", LEARNED)
    batch_norm: str = field("batch", Choice("batch", "running", "authors"), "the alpha step's BatchNorm: batch "
                            "statistics, running averages, or the authors' (training mode until the first "
                            "evaluation)", LEARNED)
    learned: LearnedConfig = field(LearnedConfig(), Sub(LearnedConfig), "the learned alpha", LEARNED)
    hypergrad: HypergradConfig = field(HypergradConfig(), Sub(HypergradConfig), "the hypergradient", LEARNED)


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    method: str = field("lfm", Registered(lambda: tuple(methods.METHODS), "training method"),
                        "the training method: lfm (the paper's; loss.* and alpha.*) or a balancing method")
    options: dict = field({}, Options(methods.option_names, "training method"), "the method's options that are set")
    # derived: the chosen method's options, checked (an object of its `Options` class)
    resolved: Any = None


@dataclasses.dataclass(frozen=True)
class Precision:
    """Where every precision of a run is decided, once (:func:`dyngap_jax.train.config.resolve_precision`).

    ``compute_dtype`` and ``matmul``: the train and evaluation steps'. ``alpha_float64``: the alpha
    step's model, batches and solve in float64 (``alpha.hypergrad.precision='float64'``, or a float64
    run); ``alpha_matmul``: its matmuls otherwise. ``alpha_dtype``: what the learned alpha is kept
    to, its learning rate included (float64: a double under JAX's 64-bit mode, else a pair of
    float32s). ``x64``: the run needs JAX's 64-bit mode.
    """

    compute_dtype: str
    matmul: str
    alpha_float64: bool
    alpha_matmul: str
    alpha_dtype: str
    x64: bool


TOP = {
    "dataset": ("the data set's name (checked against the records' manifest)", Text(True, "data set name"), REQUIRED),
    "data_dir": ("the folder of the prepared records", Text(True, "folder of the prepared records"), REQUIRED),
    "seed": ("parameters, dropout, shuffling and the held-out draw", Int(), 0),
    "progress": ("a progress bar on a terminal", Bool(), True),
    "method": ("the config's method (configs/<dataset>.py:<method>), named in tables", Text(what="name"), ""),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated run config: every field checked, the sections as frozen dataclasses."""

    dataset: str = field(REQUIRED, TOP["dataset"][1], TOP["dataset"][0])
    data_dir: str = field(REQUIRED, TOP["data_dir"][1], TOP["data_dir"][0])
    seed: int = field(0, TOP["seed"][1], TOP["seed"][0])
    progress: bool = field(True, TOP["progress"][1], TOP["progress"][0])
    method: str = field("", TOP["method"][1], TOP["method"][0])
    data: DataConfig = field(DataConfig(), Sub(DataConfig), "the records and how they are read")
    model: ModelConfig = field(REQUIRED, Sub(ModelConfig), "the encoders and the fusion head")
    train: TrainConfig = field(TrainConfig(), Sub(TrainConfig), "the parameters' training")
    loss: LossConfig = field(LossConfig(), Sub(LossConfig), "L_MM and the loss's scale")
    parallel: ParallelConfig = field(ParallelConfig(), Sub(ParallelConfig), "devices and processes")
    alpha: AlphaConfig = field(AlphaConfig(), Sub(AlphaConfig), "alpha, the weight of L_MM (Eq. 1)")
    balance: BalanceConfig = field(BalanceConfig(), Sub(BalanceConfig), "the training method")
    # derived: the run's precisions, resolved once
    precision: Precision | None = None

    def to_dict(self) -> dict:
        """The config as ``config.json`` holds it (plain dicts and lists, derived values left out)."""
        return section_dict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "loss": LossConfig,
            "parallel": ParallelConfig, "alpha": AlphaConfig, "balance": BalanceConfig}

__all__ = ["AlphaConfig", "BalanceConfig", "COMPUTE_DTYPES", "Config", "DataConfig", "DistributedConfig",
           "FrameConfig", "HYPERGRAD_PRECISIONS", "HypergradConfig", "LearnedConfig", "LossConfig", "MATMUL_PRECISIONS",
           "ModelConfig", "ParallelConfig", "Precision", "SECTIONS", "TrainConfig"]
