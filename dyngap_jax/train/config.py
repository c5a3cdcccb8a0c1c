"""The run config: its defaults (:func:`base_config`) and its validation (:func:`validate`), before anything runs.

Every field is a row of the table in :mod:`dyngap_jax.train.sections`; :func:`validate` checks each
value, refuses unknown fields, builds the sections as frozen dataclasses (:class:`Config`), resolves
the hypergradient method and the training method to their objects and the run's precisions to one
:class:`Precision`, and warns about fields the chosen setup ignores. A mistake raises
:class:`ConfigError` naming the field (and the valid choices). What needs the records, the devices
or the model (batch sizes against the split and the mesh, the encoders by name, the authors' first
tensor, ``dense``'s size limit) is checked by :func:`dyngap_jax.train.setup.setup`, still before
anything is written.

Batch sizes are **global**: ``train.batch_size``, ``train.eval_batch_size`` and ``alpha.batch_size``
count the examples of one step over all processes and devices.

The fields (kind, default, what; "read when": the setups that read it; set otherwise, a field is
warned about):

"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
from ml_collections.config_dict import placeholder

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import hypergrad, methods
from dyngap_jax.train.fields import (
    REQUIRED,
    Bool,
    Choice,
    ConfigError,
    Each,
    Int,
    Maybe,
    Num,
    Sub,
    Text,
    build_section,
    describe_default,
    plain,
    rows,
    specs,
)
from dyngap_jax.train.sections import (
    MATMUL_PRECISIONS,
    Config,
    FrameConfig,
    Options,
    Precision,
    Registered,
    Strategy,
)


def _python_type(kind):
    kind = kind.inner if isinstance(kind, Maybe) else kind
    if isinstance(kind, Int):
        return int
    if isinstance(kind, Num):
        return float
    if isinstance(kind, Bool):
        return bool
    if isinstance(kind, (Text, Choice, Registered, Strategy)):
        return str
    return None


def _config_dict(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for name, s in specs(cls).items():
        if isinstance(s.kind, Sub):
            c[name] = ml_collections.ConfigDict() if s.default is REQUIRED else _config_dict(s.kind.cls)
        elif isinstance(s.kind, Options):
            types = hypergrad.option_types() if s.kind.owner == "method" else methods.option_types()
            c[name] = ml_collections.ConfigDict({k: placeholder(t) for k, t in types.items()})
        elif s.default is REQUIRED or s.default is None:
            t = _python_type(s.kind)
            c[name] = placeholder(t) if t else None
        else:
            c[name] = list(s.default) if isinstance(s.default, tuple) else s.default
    return c


def base_config(dataset: str, data_dir: str) -> ml_collections.ConfigDict:
    """Every field of a run config with its default from the table (``None`` placeholders: unset or required;
    ``model`` empty: a data set's config sets it whole)."""
    c = _config_dict(Config)
    c.dataset, c.data_dir = dataset, data_dir
    return c


# --------------------------------------------------------------------------- validation


def validate(config) -> tuple[Config, list[str]]:
    """``(cfg, warnings)``: the config as a :class:`Config`, every field checked, or a :class:`ConfigError`.

    Fields the config leaves out take the table's defaults (a required one left unset fails).
    """
    raw = plain(config)
    if not isinstance(raw, dict):
        raise ConfigError(f"config: must be a dict of fields, got {config!r}")
    cfg = build_section(Config, raw, "")
    _check_data(cfg)
    _check_train(cfg)
    cfg = _check_alpha(cfg)
    if len(cfg.model.modalities) < 2 and cfg.loss.mm != "none":
        raise ConfigError(f"config.loss.mm: {cfg.loss.mm!r} needs two modalities or more; use 'none' for unimodal runs")
    cfg = _check_balance(cfg)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg))
    return cfg, ignored(cfg)


def _check_data(cfg: Config) -> None:
    mods = list(cfg.model.modalities)
    for m in cfg.data.frames:
        if m not in mods:
            raise ConfigError(f"config.data.frames.{m}: not a modality of config.model.modalities {mods}")
        lo, hi = cfg.data.frames[m].crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"config.data.frames.{m}.crop_scale: an area fraction range 0 < lo <= hi <= 1, got {(lo, hi)}")
    for m in cfg.data.masks:
        if m not in mods:
            raise ConfigError(f"config.data.masks: {m!r} is not a modality of config.model.modalities {mods}")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    if t.schedule == "step" and t.step_every_epochs is None:
        raise ConfigError("config.train.step_every_epochs: required with config.train.schedule='step' "
                          "(epochs between decays by config.train.step_factor)")


def _check_alpha(cfg: Config) -> Config:
    a = cfg.alpha
    if a.when == "epoch_start" and a.inner_iters:
        raise ConfigError(f"config.alpha.inner_iters={a.inner_iters}: alpha.when='epoch_start' takes one alpha step "
                          "before each epoch; set inner_iters to 0")
    if a.outer == "heldout" and (a.batch_size is None or a.heldout < a.batch_size):
        raise ConfigError(f"config.alpha.heldout={a.heldout}: alpha.outer='heldout' takes its batch of "
                          f"alpha.batch_size={a.batch_size} from the held-out examples; hold out at least that many "
                          "(and set alpha.batch_size)")
    lc = a.learned
    try:
        alpha_lib.LearnedAlpha(init=lc.init, learning_rate=lc.learning_rate, clip=tuple(lc.clip),
                               optimizer=lc.optimizer, precision=lc.precision)
    except ValueError as e:  # LearnedAlpha names its argument: `init`, `learning_rate`, `clip`, ...
        field = next((f for f in ("init", "learning_rate", "clip", "optimizer", "precision") if f"`{f}`" in str(e)), "")
        raise ConfigError(f"config.alpha.learned.{field}: {e}") from None
    h = a.hypergrad
    try:  # raises naming config.alpha.hypergrad.<field>
        estimator = hypergrad.method_from_config({"method": h.method, "options": h.options})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    float64 = h.precision == "float64" or cfg.train.compute_dtype == "float64"
    if float64 and getattr(estimator, "krylov_precision", None) is not None:
        raise ConfigError(f"config.alpha.hypergrad.options.krylov_precision={estimator.krylov_precision!r}: a float32 "
                          "precision in a float64 alpha step (its products would be cast down); leave it unset")
    if h.precision == "refined":  # the step at highest, its CG's iterations at the reduced precision
        if not isinstance(estimator, hypergrad.CG) or estimator.scalar_tol is not None:
            raise ConfigError(f"config.alpha.hypergrad.precision='refined' refines a CG solve stopped on its "
                              f"residual; config.alpha.hypergrad.method={h.method!r}"
                              + (" with options.scalar_tol set" if isinstance(estimator, hypergrad.CG) else ""))
        estimator = dataclasses.replace(estimator, krylov_precision=estimator.krylov_precision or "default")
    return dataclasses.replace(cfg, alpha=dataclasses.replace(a, hypergrad=dataclasses.replace(h, estimator=estimator)))


def _check_balance(cfg: Config) -> Config:
    b = cfg.balance
    try:
        options = methods.options_from_config(b.method, b.options)
        methods.get(b.method).check(cfg, options)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, balance=dataclasses.replace(b, resolved=options))


def resolve_precision(cfg: Config) -> Precision:
    """The run's precisions, decided once (:class:`Precision`); contradictory settings are refused by name.

    A float64 run (``train.compute_dtype='float64'``) computes every number in float64: its alpha
    step runs in float64 (``alpha.hypergrad.precision`` may be ``float64`` or the default
    ``highest``; a reduced one contradicts it), its matmuls take no float32 dot algorithm, alpha and
    its learning rate are doubles, and JAX's 64-bit mode must be on. Otherwise the alpha step runs at
    ``alpha.hypergrad.precision`` (``float64``: its own model and solve in float64) and alpha is kept
    to ``alpha.learned.precision``.
    """
    t, h = cfg.train, cfg.alpha.hypergrad
    float64 = t.compute_dtype == "float64"
    if float64:
        if h.precision not in ("highest", "float64"):
            raise ConfigError(f"config.alpha.hypergrad.precision={h.precision!r} contradicts "
                              "config.train.compute_dtype='float64' (a float64 run's alpha step is float64): set it "
                              "to 'float64' or leave it at 'highest'")
        if t.matmul_precision not in ("default", "high", "highest"):
            raise ConfigError(f"config.train.matmul_precision={t.matmul_precision!r} is a float32 dot algorithm; it "
                              "contradicts config.train.compute_dtype='float64'")
        if not jax.config.jax_enable_x64:
            raise ConfigError("config.train.compute_dtype='float64' needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 "
                              "(or run inside jax.enable_x64(True))")
    alpha_float64 = float64 or h.precision == "float64"
    return Precision(compute_dtype=t.compute_dtype, matmul=t.matmul_precision, alpha_float64=alpha_float64,
                     alpha_matmul="highest" if alpha_float64 or h.precision == "refined" else h.precision,
                     alpha_dtype="float64" if float64 or cfg.alpha.learned.precision == "float64" else "float32",
                     x64=float64)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unread(cfg: Config) -> dict[str, str]:
    """``{dotted field: why}`` for every field the chosen setup does not read (the table's "read when")."""
    reasons: dict[str, str] = {}
    method = methods.get(cfg.balance.method)
    for path, s in all_rows():
        prefix = path.split(".")[0]
        if prefix in ("loss", "alpha") and prefix not in method.reads:
            reasons[path] = f"config.balance.method={cfg.balance.method!r}"
        elif s.reads is not None and not s.reads.holds(cfg):
            reasons[path] = s.reads.why(cfg)
    return reasons


def ignored(cfg: Config) -> list[str]:
    """A warning for each field the chosen setup does not read (the table's "read when") set to other than its default."""
    defaults = _flat(plain(base_config("", "")))
    values = _flat(cfg.to_dict())
    reasons = unread(cfg)
    out = []
    if cfg.train.select_split == "test":
        out.append("config.train.select_split='test': the best epoch is chosen on the test split (the authors' code's "
                   "protocol), so its test score is no estimate of the test error")
    for key in sorted(values):
        owner = next((p for p in reasons if key == p or key.startswith(p + ".")), None)
        if owner is not None and values[key] != defaults.get(key):
            out.append(f"config.{key}={values[key]!r} is ignored with {reasons[owner]}")
    return out


# --------------------------------------------------------------------------- the table as text


def all_rows():
    """Every leaf field: ``(dotted path, spec)``; a frame modality's fields as ``data.frames.<m>.<field>``."""
    out = []
    for path, s in rows(Config):
        if isinstance(s.kind, Each):
            out += [(f"{path}.<m>.{p}", sp) for p, sp in rows(FrameConfig)]
        out.append((path, s))
    return out


def fields_markdown() -> str:
    """The table as the README's list of fields (``python -m scripts.config_fields --write README.md``)."""
    lines = ["| field | kind | default | read when | what |", "| --- | --- | --- | --- | --- |"]
    for path, s in all_rows():
        lines.append(f"| `{path}` | {s.kind.describe()} | {describe_default(s)} | "
                     f"{s.reads.describe() if s.reads else 'always'} | {s.doc} |")
    return "\n".join(lines)


def fields_text() -> str:
    """The table as plain text (this module's docstring)."""
    out = []
    for path, s in all_rows():
        kind = s.kind.describe().replace("\\|", "|")
        read = f"; read when {s.reads.describe().replace('`', '')}" if s.reads else ""
        out.append(f"  {path}: {kind}, {describe_default(s).replace('`', '')}{read}. {s.doc}")
    return "\n".join(out) + "\n"


__doc__ += fields_text()
__all__ = ["Config", "ConfigError", "MATMUL_PRECISIONS", "Precision", "all_rows", "base_config", "fields_markdown",
           "fields_text", "ignored", "resolve_precision", "validate"]
