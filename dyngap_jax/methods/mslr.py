"""MSLR (Yao & Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion", Findings of
ACL 2022): a learning rate a modality, in its dynamic form, as the only released code computes it (the baseline in
the AGM authors' repository, lihong2303/AGM_ICCV2023, ``run/CREMAD_main.py``: the ``"MSLR"`` branch of ``train``
and the ``audio_lr_memory`` block of ``CREMAD_main``; the paper's own code was not released, and BalanceBenchmark
has no MSLR).

* Each modality's branch (its encoder, its projection and, with a ``sum`` or ``weighted`` head, its own linear head:
  their ``audio_net`` and ``audio_cls``) trains at ``c_m`` times the learning rate; the shared parameters (a concat
  head) at the learning rate.
* ``c_m = initial_m * ratio_m``: ``initial`` a multiplier a modality (their code hard-codes one per data set:
  CREMA-D audio 0.9 / video 1.1, AV-MNIST audio 1.3 / image 0.7, UR-Funny 0.9 / 1.4 / 0.7; the data sets' configs
  set them), ``ratio_m`` 1 until ``memory`` evaluations are kept, then the modality's validation accuracy of the
  last epoch over the mean of the ``memory`` before it (their 5); the newest replaces the oldest.
* ``c_m`` applies inside the epoch window ``modulation_starts <= epoch <= modulation_ends`` (from 0, both ends
  included; their ``--modulation_starts 0 --modulation_ends 20`` count epochs from 1, so their default window is
  epochs 0 to 19 here); outside it every branch trains at the learning rate. A modality whose kept accuracies
  are all 0 keeps the ratio 1 (their code would divide by zero).

``scale``: ``"learning_rate"`` (the paper's: the optimiser's update of a branch is scaled, which for SGD with
momentum and weight decay, or Adam, is exactly a learning rate of its own: a PyTorch parameter group) or
``"gradient"`` (their code: the gradient is scaled before the optimiser, so SGD's weight decay and Adam's
normalisation are not). The update is scaled rather than ``optax.multi_transform`` used, because ``c_m`` changes
between epochs with the validation accuracy: it lives in the train state (checkpointed), where a learning rate
of ``multi_transform`` is fixed when the optimiser is built.

The accuracies are each modality's own (its head's, or its block of a concat head): their CREMA-D script's
``test`` counts a correct *visual* prediction as a correct audio one (``acc_a`` is incremented on ``v``), so that
there both ratios move together; their AV-MNIST and UR-Funny scripts count each modality's own, as here.

Their model for it is the additive late fusion (``AVClassifier_Sum``: a linear head a modality, logits summed):
``configs/*.py:mslr`` sets the ``sum`` head with ``reduce="sum"``. Any number of modalities.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dyngap_jax.methods.base import Method, Part, StepContext, check_window, modality_keys, param_dtype

PER_MODALITY_HEADS = ("sum", "weighted")  # fusions with a linear head a modality (``fusion/head_<m>``)
SCORED = ("concat",) + PER_MODALITY_HEADS  # fusions with a validation accuracy a modality


def parse_initial(text: str) -> dict[str, float]:
    """``{modality: multiplier}`` from ``"audio=0.9,video=1.1"`` (empty: none); a ValueError names the bad item."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not name.strip() or not number > 0 or name.strip() in out:
            raise ValueError(f"`initial` takes 'modality=multiplier' items, each multiplier > 0 and each modality "
                             f"once, e.g. 'audio=0.9,video=1.1'; got {item!r} in {text!r}")
        out[name.strip()] = number
    return out


@dataclasses.dataclass(frozen=True)
class MSLROptions:
    """``config.balance.options`` of ``mslr``; defaults the AGM repository's baseline's."""

    initial: str = ""  # each modality's starting learning-rate multiplier, "audio=0.9,video=1.1" (unlisted: 1)
    memory: int = 5  # the epochs of validation accuracy the ratio compares with (their 5)
    scale: str = "learning_rate"  # "learning_rate" (the paper) or "gradient" (their code)
    modulation_starts: int = 0  # epochs from 0 (their --modulation_starts counts from 1)
    modulation_ends: int = 19  # included (their --modulation_ends 20)

    def __post_init__(self):
        parse_initial(self.initial)
        if self.memory < 1:
            raise ValueError(f"`memory` must be >= 1, got {self.memory}")
        if self.scale not in ("learning_rate", "gradient"):
            raise ValueError(f"`scale` must be 'learning_rate' or 'gradient', got {self.scale!r}")
        check_window(self)


def scale_branches(tree, factors, modalities, heads: bool) -> dict:
    """``tree`` (gradients or updates) with modality ``m``'s branch times ``factors[i]`` (``m = modalities[i]``): its
    encoder and projection, and with ``heads`` its ``fusion/head_<m>``."""
    keys = modality_keys(tree, modalities)
    out = dict(tree)
    for i, m in enumerate(modalities):
        times = lambda t, i=i: jax.tree_util.tree_map(lambda x: x * factors[i].astype(x.dtype), t)
        for k in keys[m]:
            out[k] = times(tree[k])
        if heads:
            out["fusion"] = {**out["fusion"], f"head_{m}": times(tree["fusion"][f"head_{m}"])}
    return out


class MSLR(Method):
    """MSLR's training step (the module docstring): the fused cross-entropy, a learning rate a modality."""

    name = "mslr"
    Options = MSLROptions
    modalities = (2, None)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        self.mods = tuple(cfg.model.modalities)
        self.heads = dict(cfg.model.fusion).get("name") in PER_MODALITY_HEADS
        self.logged = ("loss",) + tuple(f"mslr_coeff/{m}" for m in self.mods)

    @classmethod
    def check(cls, cfg, options) -> None:
        super().check(cfg, options)
        fusion = dict(cfg.model.fusion).get("name")
        if fusion not in SCORED:
            raise ValueError(f"config.model.fusion.name: {cls.name!r} reads each modality's validation accuracy, "
                             f"which a {fusion!r} head has not; use one of {', '.join(SCORED)}")
        unknown = sorted(set(parse_initial(options.initial)) - set(cfg.model.modalities))
        if unknown:
            raise ValueError(f"config.balance.options.initial: {unknown} not among config.model.modalities "
                             f"{list(cfg.model.modalities)}")

    def init_state(self, params):
        return {"coeff": jnp.ones((len(self.mods),), param_dtype(params))}

    def line(self, record: dict) -> str:
        if f"mslr_coeff/{self.mods[0]}" not in record:
            return ""
        return "lr x " + ", ".join(f"{m} {record[f'mslr_coeff/{m}']:.3f}" for m in self.mods)

    def transform_gradients(self, ctx: StepContext, grads, aux):
        coeff = ctx.state.method_state["coeff"]
        aux["metrics"].update({f"mslr_coeff/{m}": coeff[i] for i, m in enumerate(self.mods)})
        return scale_branches(grads, coeff, self.mods, self.heads) if self.options.scale == "gradient" else grads

    def transform_updates(self, ctx: StepContext, state, updates):
        if self.options.scale == "gradient":
            return updates
        return scale_branches(updates, state.method_state["coeff"], self.mods, self.heads)

    def parts(self):
        return [Rates(self)]


class Rates(Part):
    """The multipliers between epochs: each modality's validation accuracy kept (the last ``memory``), the ratio
    from each new one, ``c_m`` set in the train state before each epoch (its host state is in every checkpoint)."""

    name = "mslr"

    def __init__(self, method: MSLR):
        self.method, self.mods = method, method.mods
        initial = parse_initial(method.options.initial)
        self.initial = np.asarray([initial.get(m, 1.0) for m in self.mods])
        self.memory: list[list[float]] = []  # a row an epoch: each modality's validation accuracy
        self.ratio = np.ones(len(self.mods))
        self.run = None

    def open(self, run, state, saved, *, donate=True):
        self.run = run
        if saved:
            self.memory = [list(map(float, row)) for row in saved["memory"]]
            self.ratio = np.asarray(saved["ratio"], float)

    def coefficients(self, epoch: int) -> np.ndarray:
        o = self.method.options
        inside = o.modulation_starts <= epoch <= o.modulation_ends
        return self.initial * self.ratio if inside else np.ones(len(self.mods))

    def epoch_start(self, state, epoch):
        new = jnp.asarray(self.coefficients(epoch), state.method_state["coeff"].dtype)
        state = state.replace(method_state={**state.method_state, "coeff": new})
        return jax.device_put(state, self.run.shardings(state)[0])  # on the run's mesh, as the loop placed it

    def evaluated(self, evals):
        acc = np.asarray([evals["validation"][f"acc/{m}"] for m in self.mods], float)
        if len(self.memory) < self.method.options.memory:
            self.memory.append(acc.tolist())
            return
        mean = np.mean(np.asarray(self.memory), axis=0)
        self.ratio = np.where(mean > 0, acc / np.where(mean > 0, mean, 1.0), 1.0)  # never 0 kept: their code divides
        self.memory = self.memory[1:] + [acc.tolist()]

    def epoch_record(self, state):
        return {f"mslr_ratio/{m}": float(r) for m, r in zip(self.mods, self.ratio)}

    def to_json(self):
        return {"memory": self.memory, "ratio": self.ratio.tolist()}


__all__ = ["MSLR", "MSLROptions", "Rates", "parse_initial", "scale_branches"]
