"""Data parallelism (and optional parameter sharding) with ``jax.sharding``, and multi-host start-up.

A :func:`make_mesh` has a ``data`` axis (batches are split on it) and a ``model`` axis (size 1
unless large encoders' parameters are sharded). Steps are ``jax.jit``-compiled with explicit
in/out shardings; a global batch is assembled from each process's local part with
``jax.make_array_from_process_local_data``. Because the loss is a mean over the global batch
and BatchNorm statistics are taken over it too, one step on N devices computes what it computes
on one device, and so does the alpha step (its HVPs and CG are global computations).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dyngap_jax.parallel import liveness

__all__ = [
    "initialize",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "state_shardings",
    "shard_batch",
    "per_process_batch_size",
    "pad_to_multiple",
]

def initialize(cfg: Mapping[str, Any] | None = None) -> bool:
    """Start JAX's multi-host runtime when the config asks for it; returns whether it did.

    ``cfg``: ``{"coordinator_address": "host:port", "num_processes": N, "process_id": i}`` (all three),
    or ``{"auto": True}`` to let JAX read the cluster's variables (SLURM, Open MPI, ...). Nothing
    else starts it: a job step inside a SLURM allocation of several tasks (say, a one-GPU
    evaluation) stays a single process unless its config says ``auto``. Call it before anything
    else touches JAX. ``heartbeat_timeout`` (seconds, default 30): a process silent that long is lost,
    and the others stop naming it (:mod:`dyngap_jax.parallel.liveness`).
    """
    cfg = dict(cfg or {})
    timeout = cfg.get("heartbeat_timeout")
    timeout = 30 if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 5:
        raise ValueError(f"config.parallel.distributed.heartbeat_timeout: an integer >= 5 (seconds), got {timeout!r}")
    # JAX's own heartbeat is the backstop; dyngap_jax.parallel.liveness names a lost process first
    timeouts = {"heartbeat_timeout_seconds": 2 * timeout, "shutdown_timeout_seconds": 2 * timeout}
    if cfg.get("coordinator_address"):
        missing = [k for k in ("num_processes", "process_id") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config.parallel.distributed: coordinator_address given without {missing}")
        jax.distributed.initialize(coordinator_address=cfg["coordinator_address"], num_processes=int(cfg["num_processes"]),
                                   process_id=int(cfg["process_id"]), **timeouts)
    elif cfg.get("auto"):
        jax.distributed.initialize(**timeouts)
    else:
        return False
    liveness.start(timeout)
    return True


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh over ``data * model`` devices (default: every device on ``data``)."""
    devices = list(devices if devices is not None else jax.devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"config.parallel.model={model} does not divide the {len(devices)} devices")
    data = data or len(devices) // model
    if data * model > len(devices):
        raise ValueError(f"config.parallel: data={data} x model={model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _leaf_sharding(x, mesh: Mesh, shard_params: bool) -> NamedSharding:
    size = mesh.shape["model"]
    shape = getattr(x, "shape", ())
    if not shard_params or size == 1 or len(shape) < 2:
        return replicated(mesh)
    axis = int(np.argmax(shape))
    if shape[axis] % size:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[axis] = "model"
    return NamedSharding(mesh, P(*spec))


def state_shardings(state, mesh: Mesh, shard_params: bool = False):
    """A sharding per leaf of a train state: replicated, or (``shard_params``) each matrix split on its
    largest axis over ``model`` — parameters and the optimiser's same-shaped moments alike."""
    return jax.tree_util.tree_map(lambda x: _leaf_sharding(x, mesh, shard_params), state)


def per_process_batch_size(global_batch: int, mesh: Mesh) -> int:
    """The part of the global batch each process loads; the global size must divide over the data axis."""
    n_data = mesh.shape["data"]
    if global_batch % n_data:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {n_data} devices of the data axis")
    if global_batch % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {jax.process_count()} processes")
    return global_batch // jax.process_count()


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's numpy batch -> global arrays sharded on ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def pad_to_multiple(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], int]:
    """Repeat the last example until the batch divides over ``multiple`` devices; returns the real size too."""
    n = len(batch["label"])
    extra = (-n) % multiple
    if not extra:
        return dict(batch), n
    return {k: np.concatenate([v, np.repeat(v[-1:], extra, axis=0)]) for k, v in batch.items()}, n
