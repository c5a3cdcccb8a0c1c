"""PMR (Fan, Xu, Wu, Li & Li, "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023), as the
authors' code computes it (fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py``: ``calculate_prototype``,
``EU_dist``, ``train_epoch`` with ``--modulation Proto``).

* **Prototypes.** Before each epoch, each modality's per-class mean feature (the encoder's output the fusion head
  takes: their pooled ResNet features), from the first ``steps_per_epoch // proto_divisor`` batches (at least one)
  of a shuffled pass over the training split with its augmentation (their 10 % of the training loader for
  CREMA-D, Kinetics-Sounds and VGGSound; for AVE and CG-MNIST they take the whole validation split), the
  model in evaluation mode, no gradient. From the third epoch on they are averaged with the last ones,
  ``P = (1 - proto_momentum) P_new + proto_momentum P_old`` (their ``calculate_prototype(epoch > 0)``, which
  the call after the first epoch skips: the second epoch's prototypes are fresh). A class with no example in
  those batches keeps its last prototype (theirs divides 0 by 0). The prototypes are state (checkpointed).
* **The loss.** ``sim_m = -|z_m - P_m[c]|`` (Euclidean distance, not squared; no temperature) over the classes,
  ``PCE_m`` its cross-entropy; ``s_m`` the batch's sum of ``softmax(sim_m)`` at the true class, ``rho = s_a / s_b``
  (the config's modality order). Inside the window ``modulation_starts <= epoch <= modulation_ends`` (from 0,
  both ends included) the loss is ``CE(fused) + alpha PCE_weak``, the weaker modality the one with the lower
  score (``rho > 1``: ``b``; ``rho < 1``: ``a``; a tie neither): their hard switch, no tanh. Outside the window,
  the fused cross-entropy alone.

The paper also describes an entropy regulariser on the dominant modality; the released script has none (its
``bash.sh`` names a ``main_Proto_PER.py`` that is not in the repository), so neither has this port. Defaults are
their ``argparse`` defaults; their CREMA-D runs (``bash.sh``) use ``alpha`` 2 (concat), ``proto_momentum`` 0 and
the window 0 to 70, which ``configs/cremad.py:pmr`` sets. Two modalities, as their code (BalanceBenchmark's
three-modality variant drops the prototype loss for OGM-GE's scaling: a different method).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dyngap_jax import losses, parallel
from dyngap_jax.methods.base import Method, Part, StepContext, check_window, param_dtype

PROTO_LOADER_EPOCH = 500_009  # the prototype pass of epoch e shuffles as the loader's epoch PROTO_LOADER_EPOCH + e


@dataclasses.dataclass(frozen=True)
class PMROptions:
    """``config.balance.options`` of ``pmr``; defaults the original's ``argparse`` defaults."""

    alpha: float = 1.0  # --alpha: the weaker modality's prototype cross-entropy weight
    proto_momentum: float = 0.2  # --momentum_coef
    modulation_starts: int = 0  # --modulation_starts (epochs from 0)
    modulation_ends: int = 100  # --modulation_ends (included)
    proto_divisor: int = 10  # prototypes from the first steps_per_epoch // proto_divisor training batches

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {self.alpha}")
        if not 0 <= self.proto_momentum < 1:
            raise ValueError(f"`proto_momentum` must be in [0, 1), got {self.proto_momentum}")
        check_window(self)
        if self.proto_divisor < 1:
            raise ValueError(f"`proto_divisor` must be >= 1, got {self.proto_divisor}")


def distances(z, prototypes):
    """``[B, C]`` Euclidean distances of each feature to each class's prototype (their ``EU_dist``)."""
    return jnp.sqrt(jnp.sum(jnp.square(z[:, None, :] - prototypes[None].astype(z.dtype)), axis=-1))


class PMR(Method):
    """PMR's training step (the module docstring); the prototypes come from :class:`Prototypes`."""

    name = "pmr"
    Options = PMROptions
    modalities = (2, 2)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        self.mods = tuple(cfg.model.modalities)
        self.logged = ("loss", "l_cls", "pmr_ratio") + tuple(f"pmr_weight/{m}" for m in self.mods)

    def init_state(self, params):
        dtype = param_dtype(params)
        classes = self.cfg.model.num_classes
        return {"prototypes": {m: jnp.zeros((classes, self.info.feature_dims[m]), dtype) for m in self.mods}}

    def line(self, record: dict) -> str:
        if "pmr_ratio" not in record:
            return ""
        a, b = self.mods
        return (f"pmr {a}/{b} {record['pmr_ratio']:.2f}, PCE weight {a} {record[f'pmr_weight/{a}']:.2f} "
                f"{b} {record[f'pmr_weight/{b}']:.2f}")

    def loss(self, ctx: StepContext, params):
        value, aux = super().loss(ctx, params)
        o, (a, b), labels = self.options, self.mods, ctx.labels
        protos = ctx.state.method_state["prototypes"]
        sims = {m: -distances(aux["outputs"]["features"][m], protos[m]) for m in self.mods}
        pce = {m: losses.cross_entropy(sims[m], labels) for m in self.mods}
        rows = jnp.arange(labels.shape[0])
        score = {m: jax.lax.stop_gradient(jnp.sum(jax.nn.softmax(sims[m], -1)[rows, labels])) for m in self.mods}
        ratio = score[a] / score[b]
        inside = self.in_window(ctx.state.step)
        weight = {a: jnp.where(inside & (ratio < 1), o.alpha, 0.0), b: jnp.where(inside & (ratio > 1), o.alpha, 0.0)}
        aux["metrics"].update({"l_cls": value, "pmr_ratio": ratio, **{f"pmr_weight/{m}": weight[m] for m in self.mods}})
        value = value + weight[a].astype(value.dtype) * pce[a] + weight[b].astype(value.dtype) * pce[b]
        aux["metrics"]["loss"] = value
        return value, aux

    def parts(self):
        return [Prototypes(self)]


class Prototypes(Part):
    """Each epoch's prototypes (the module docstring), set in ``state.method_state`` before the epoch; the epoch
    they were made for is its host state, so a run resumed inside an epoch keeps that epoch's."""

    name = "pmr"

    def __init__(self, method: PMR):
        self.method, self.mods, self.made_for = method, method.mods, None
        self.run, self.features, self.sums = None, None, None

    def open(self, run, state, saved, *, donate=True):
        self.run = run
        self.made_for = (saved or {}).get("made_for")
        self.features = run.eval_step(state)  # evaluation mode, the run's mesh and precision
        classes = run.cfg.model.num_classes

        @jax.jit
        def sums(features, labels):  # at full precision (no TF32 on a GPU): class sums and counts
            def dot(z):
                dtype = jnp.result_type(z.dtype, jnp.float32)
                onehot = jax.nn.one_hot(labels, classes, dtype=dtype)
                return jnp.matmul(onehot.T, z.astype(dtype), precision=jax.lax.Precision.HIGHEST)
            return {m: dot(features[m]) for m in self.mods}, jnp.sum(jax.nn.one_hot(labels, classes), axis=0)

        self.sums = sums

    def batches(self) -> int:
        """The prototype pass's batches: their ``len(train_loader) // 10``, at least one."""
        return max(1, self.run.steps_per_epoch // self.method.options.proto_divisor)

    def compute(self, state, epoch: int) -> dict:
        """``{modality: [C, D]}`` class means over the epoch's prototype batches (NaN rows where a class is absent)."""
        run, total, count = self.run, None, None
        loader = iter(run.loader("train", train=True, epoch=PROTO_LOADER_EPOCH + epoch))
        for _ in range(self.batches()):
            batch = parallel.shard_batch(next(loader), run.mesh)
            feats = self.features(state, batch)["features"]
            s, n = self.sums(feats, batch["label"])
            total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
            count = n if count is None else count + n
        return {m: total[m] / count[:, None].astype(total[m].dtype) for m in self.mods}

    def epoch_start(self, state, epoch):
        if self.made_for == epoch:  # resumed inside the epoch: its prototypes are the checkpoint's
            return state
        old = state.method_state["prototypes"]
        new = self.compute(state, epoch)
        m = self.method.options.proto_momentum if epoch >= 2 else 0.0
        protos = {k: jnp.where(jnp.isnan(new[k]), old[k], (1 - m) * new[k] + m * old[k]).astype(old[k].dtype)
                  for k in self.mods}
        self.made_for = epoch
        state = state.replace(method_state={**state.method_state, "prototypes": protos})
        return jax.device_put(state, self.run.shardings(state)[0])  # on the run's mesh, as the loop placed it

    def to_json(self):
        return {"made_for": self.made_for}


__all__ = ["PMR", "PMROptions", "Prototypes", "distances"]
