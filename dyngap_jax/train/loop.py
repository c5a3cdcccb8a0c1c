"""Algorithm 1 end to end: data, model, optimiser, alpha strategy, evaluation, logging, checkpoints.

``train(config, workdir)`` runs (or resumes) a run. Per epoch: ``steps_per_epoch`` train steps on
L_total with the current alpha; for the learned strategy an alpha step every ``inner_iters``
train steps (0: once per epoch) with the hypergradient method of the config; evaluation of
every metric on validation and test; the best epoch chosen on validation (never on test).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import losses, metrics, models, parallel
from dyngap_jax.data import loader as data_loader
from dyngap_jax.data.records import atomic_write_text, load_manifest
from dyngap_jax.train import checkpoint, plots
from dyngap_jax.train.steps import TrainState, make_alpha_step, make_eval_step, make_train_step, mm_loss_fn


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def _cfg(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def make_optimizer(tcfg: dict, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum, weight decay, plateau x0.1 or the authors' step decay) or Adam, as the paper's Sec. 4.1."""
    name = tcfg.get("optimizer", "sgd")
    schedule_name = tcfg.get("schedule", "plateau")
    lr = tcfg["learning_rate"]
    if schedule_name == "step":
        lr = optax.exponential_decay(lr, transition_steps=tcfg.get("step_every_epochs", 70) * steps_per_epoch,
                                     decay_rate=tcfg.get("step_factor", 0.1), staircase=True)
    elif schedule_name not in ("plateau", "constant"):
        raise ValueError(f"config.train.schedule: unknown {schedule_name!r}; known: plateau, step, constant")
    parts = []
    if tcfg.get("weight_decay", 0.0):
        parts.append(optax.add_decayed_weights(tcfg["weight_decay"]))
    if name == "sgd":
        parts.append(optax.sgd(lr, momentum=tcfg.get("momentum", 0.9)))
    elif name == "adam":
        parts.append(optax.adam(lr))
    else:
        raise ValueError(f"config.train.optimizer: unknown {name!r}; known: sgd, adam")
    if schedule_name == "plateau":
        # the decision is taken on the mean training loss of each epoch
        parts.append(optax.contrib.reduce_on_plateau(factor=tcfg.get("plateau_factor", 0.1),
                                                     patience=tcfg.get("plateau_patience", 10),
                                                     accumulation_size=steps_per_epoch))
    return optax.chain(*parts)


@dataclasses.dataclass
class Strategy:
    """The alpha strategy of a config: a fixed schedule, or the learned one with its hypergradient method."""

    name: str
    fixed: Any = None
    learned: alpha_lib.LearnedAlpha | None = None

    def value(self, epoch: int, num_epochs: int):
        return self.fixed(epoch, num_epochs)


def make_strategy(acfg: dict, num_pairs: int, steps_per_epoch: int) -> Strategy:
    spec = acfg["strategy"]
    if spec != "learned":
        return Strategy(spec, fixed=alpha_lib.fixed_strategy(spec))
    lcfg = acfg.get("learned", {})
    alpha_steps_per_epoch = max(1, steps_per_epoch // acfg["inner_iters"]) if acfg.get("inner_iters") else 1
    schedule = lcfg.get("schedule", "constant")
    if schedule == "authors":
        lr = alpha_lib.authors_lr_schedule(alpha_steps_per_epoch)
    elif schedule == "constant":
        lr = lcfg.get("learning_rate", 1e-2)
    else:
        raise ValueError(f"config.alpha.learned.schedule: unknown {schedule!r}; known: constant, authors")
    learned = alpha_lib.LearnedAlpha(init=lcfg.get("init", 0.5), learning_rate=lr, clip=tuple(lcfg.get("clip", (0.0, 1.0))),
                                     num_pairs=num_pairs if lcfg.get("per_pair") else None,
                                     optimizer=lcfg.get("optimizer", "sgd"))
    return Strategy("learned", learned=learned)


def _frames(dcfg: dict) -> dict:
    return {m: data_loader.FrameAugment(size=tuple(f["size"]) if f.get("size") else None, normalize=f.get("normalize", True))
            for m, f in (dcfg.get("frames") or {}).items()}


def _loader(cfg: dict, split: str, *, train: bool, epoch: int = 0, infinite: bool = False, batch_size=None):
    dcfg, mcfg = cfg["data"], cfg["model"]
    return data_loader.make_loader(
        cfg["data_dir"], split, batch_size=batch_size or cfg["train"].get("local_batch_size", cfg["train"]["batch_size"]),
        train=train,
        seed=(cfg["seed"] * 1009 + epoch) % (2**31), num_epochs=None if infinite else 1,
        modalities=list(mcfg["modalities"]) + [f"{m}_mask" for m in dcfg.get("masks", [])],
        frames=_frames(dcfg), standardize=dcfg.get("standardize", False),
        worker_count=dcfg.get("worker_count", 0),
        expect={"name": cfg["dataset"], "num_classes": mcfg["num_classes"],
                "modalities": {m: None for m in mcfg["modalities"]}},
    )


def _set_iter_state(it, state):
    if state is None:
        return
    it.set_state(state.encode() if isinstance(state, str) else state)


def _get_iter_state(it):
    s = it.get_state()
    return s.decode() if isinstance(s, bytes) else s


def evaluate(state: TrainState, eval_step, cfg: dict, split: str, mesh=None) -> dict[str, float]:
    """Every metric on ``split`` (each example once), plus the mean L_CLS."""
    logits, per, feats, labels = predict(state, eval_step, cfg, split, mesh)
    res = metrics.evaluate_predictions(logits, per, labels, feats)
    res["l_cls"] = float(np.mean(-_log_softmax_at(logits.astype(np.float64), labels)))
    return res


def predict(state: TrainState, eval_step, cfg: dict, split: str, mesh=None):
    """``(logits, modality_logits, features, labels)`` on every example of ``split`` once, as NumPy.

    On a mesh each batch is padded (last example repeated) to divide over the data axis and the
    padding is dropped from the outputs; with several processes the outputs are gathered.
    """
    bs = cfg["train"].get("eval_batch_size", cfg["train"]["batch_size"])
    logits, per, feats, labels = [], {}, {}, []
    for batch in _loader(cfg, split, train=False, batch_size=bs):
        n = len(batch["label"])
        if mesh is not None:
            padded, _ = parallel.pad_to_multiple(batch, mesh.shape["data"] // jax.process_count())
            out = eval_step(state, parallel.shard_batch(padded, mesh))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                out = multihost_utils.process_allgather(out, tiled=True)
                batch = multihost_utils.process_allgather(padded, tiled=True)
                n = len(batch["label"])
            out = jax.tree_util.tree_map(lambda x: np.asarray(x)[:n], jax.device_get(out))
        else:
            out = jax.device_get(eval_step(state, batch))
        logits.append(out["logits"])
        labels.append(np.asarray(batch["label"])[:n])
        for m, v in out["modality_logits"].items():
            per.setdefault(m, []).append(v)
        for m, v in out["features"].items():
            feats.setdefault(m, []).append(v)
    return (np.concatenate(logits), {m: np.concatenate(v) for m, v in per.items()},
            {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels))


def _log_softmax_at(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(labels)), labels]


class _Logger:
    """JSONL and TensorBoard in the workdir (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict, step: int):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _finite_info(info) -> dict:
    out = {}
    for k, v in jax.device_get(info).items():
        v = np.asarray(v)
        out[k] = bool(v) if v.dtype == bool else float(v)
    return out


def train(config, workdir: str, max_steps: int | None = None) -> dict:
    """Run (or resume) a training run; returns the final summary (best-on-validation epoch and its metrics).

    ``max_steps`` stops after that many train steps in all, with a checkpoint (data iterators
    included) from which a later call resumes exactly; the summary then has ``"stopped_at"``.
    """
    cfg = _cfg(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        _record_config(cfg, workdir)
    mcfg, tcfg, acfg = cfg["model"], cfg["train"], cfg["alpha"]
    pcfg = cfg.get("parallel") or {}
    mesh = parallel.make_mesh(pcfg.get("data"), pcfg.get("model", 1))
    local_batch = parallel.per_process_batch_size(tcfg["batch_size"], mesh)  # the config's batch is global
    cfg = {**cfg, "train": {**tcfg, "local_batch_size": local_batch}}
    manifest = load_manifest(cfg["data_dir"])
    n_train = manifest.splits["train"]["num_examples"] // jax.process_count()
    steps_per_epoch = n_train // local_batch
    if steps_per_epoch < 1:
        raise ValueError(f"config.train.batch_size={tcfg['batch_size']} is larger than the training split ({n_train})")
    num_epochs = tcfg["num_epochs"]
    modalities = list(mcfg["modalities"])
    per_pair = acfg.get("strategy") == "learned" and acfg.get("learned", {}).get("per_pair", False)
    if len(modalities) < 2 and cfg["loss"]["mm"] != "none":
        raise ValueError(f"config.loss.mm={cfg['loss']['mm']!r} needs two modalities or more; use 'none' for unimodal runs")
    mm_loss = mm_loss_fn(cfg["loss"]["mm"], modalities, cfg["loss"].get("temperature", 0.1), per_pair)
    strategy = make_strategy(acfg, losses.num_pairs(len(modalities)) if len(modalities) > 1 else 1, steps_per_epoch)

    model, pretrained = models.build_model(mcfg)
    example = next(iter(_loader(cfg, "train", train=False, batch_size=2)))
    key = jax.random.PRNGKey(cfg["seed"])
    variables = models.init_variables(model, key, example, pretrained)
    params = variables.pop("params")
    tx = make_optimizer(tcfg, steps_per_epoch)
    learned = strategy.learned or alpha_lib.LearnedAlpha(init=0.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables, opt_state=tx.init(params),
                       alpha=learned.create(), rng=jax.random.fold_in(key, 1))
    state_sh = parallel.state_shardings(state, mesh, pcfg.get("shard_params", False))
    shardings = (state_sh, parallel.batch_sharding(mesh), parallel.replicated(mesh))
    state = jax.device_put(state, state_sh)
    train_step = make_train_step(model, tx, mm_loss, shardings)
    eval_step = make_eval_step(model, shardings)
    alpha_step = None
    if strategy.learned is not None:
        hcfg = acfg.get("hypergrad", {})
        alpha_step = make_alpha_step(model, mm_loss, strategy.learned, hcfg.get("method", "cg"),
                                     dict(hcfg.get("options", {})), hcfg.get("require_converged", False), shardings)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tcfg.get("keep_checkpoints", 2))
    best_ckpt = checkpoint.Checkpointer(os.path.join(workdir, "best"), max_to_keep=1)
    extra = {"epoch": 0, "step_in_epoch": 0, "train_iter": None, "outer_iter": None, "history": [], "best": None}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, extra = restored
        logging.info("resumed from step %d (epoch %d)", int(state.step), extra["epoch"] + 1)
        print(f"resuming {workdir} at step {int(state.step)} (epoch {extra['epoch'] + 1})")

    log = _Logger(workdir)
    outer_it = None
    if alpha_step is not None:
        outer_split = "validation" if acfg.get("outer", "validation") == "validation" else "train"
        alpha_bs = acfg.get("batch_size") or local_batch
        if alpha_bs > local_batch or alpha_bs % (mesh.shape["data"] // jax.process_count()):
            raise ValueError(f"config.alpha.batch_size={alpha_bs} must be at most the per-process batch {local_batch} "
                             "and divide over the local devices")
        outer_it = iter(_loader(cfg, outer_split, train=True, infinite=True, batch_size=alpha_bs))
        _set_iter_state(outer_it, extra["outer_iter"])
    every = tcfg.get("checkpoint_every_steps", 0)
    inner_iters = acfg.get("inner_iters", 0) or steps_per_epoch
    select = tcfg.get("select_metric", "acc")

    if max_steps is not None and int(state.step) >= max_steps and extra["epoch"] < num_epochs:
        # resumed at or past the requested stop: nothing to train
        ckpt.close()
        best_ckpt.close()
        log.close()
        return {"stopped_at": int(state.step), "best": extra["best"], "history": extra["history"]}
    for epoch in range(extra["epoch"], num_epochs):
        t_epoch = epoch + 1  # the paper's t counts from 1
        if strategy.fixed is not None:
            state = state.replace(alpha=state.alpha.replace(value=jnp.asarray(strategy.value(t_epoch, num_epochs),
                                                                              state.alpha.value.dtype)))
            state = jax.device_put(state, state_sh)
        train_it = iter(_loader(cfg, "train", train=True, epoch=epoch))
        _set_iter_state(train_it, extra["train_iter"] if extra["step_in_epoch"] else None)
        bar = tqdm(total=steps_per_epoch, initial=extra["step_in_epoch"], desc=f"epoch {t_epoch}/{num_epochs}",
                   unit="step", dynamic_ncols=True, disable=jax.process_index() != 0 or not cfg.get("progress", True))
        # a resumed epoch continues the epoch's running sums from the checkpoint
        partial = extra.get("partial") if extra["step_in_epoch"] else None
        sums, count, hyper_log = (dict(partial["sums"]), partial["count"], list(partial["hyper_log"])) if partial else ({}, 0, [])
        t0, count0 = time.time(), count
        for i in range(extra["step_in_epoch"], steps_per_epoch):
            local_np = next(train_it)
            batch = parallel.shard_batch(local_np, mesh)
            new_state, m = train_step(state, batch, state.alpha.value)
            m = jax.device_get(m)
            if not m["finite"]:
                bar.close()
                last = ckpt.latest_step()
                raise TrainingDiverged(
                    f"non-finite loss at step {int(state.step) + 1} (epoch {t_epoch}, batch {i + 1}); "
                    f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else
                    f"non-finite loss at step {int(state.step) + 1} (epoch {t_epoch}, batch {i + 1}); no checkpoint yet")
            state = new_state
            for k in ("loss", "l_cls", "l_mm"):
                sums[k] = sums.get(k, 0.0) + float(m[k])
            count += 1
            if alpha_step is not None and (i + 1) % inner_iters == 0:
                # the hypergradient's inner batch: the first alpha.batch_size examples of this step's batch
                inner = batch if alpha_bs == local_batch else parallel.shard_batch(
                    {k: v[:alpha_bs] for k, v in local_np.items()}, mesh)
                state, res, usable = alpha_step(state, inner, parallel.shard_batch(next(outer_it), mesh))
                info = _finite_info(res.info)
                info["hypergradient"] = float(np.mean(np.asarray(res.value)))
                info["applied"] = bool(usable)
                hyper_log.append(info)
                if not info["applied"]:
                    logging.warning("alpha step at %d skipped: %s", int(state.step), info)
            alpha_now = np.asarray(state.alpha.value)
            bar.set_postfix(loss=f"{m['loss']:.4f}", alpha=np.array2string(alpha_now, precision=3),
                            rate=f"{(count - count0) / max(time.time() - t0, 1e-9):.1f}/s")
            bar.update(1)
            stop = max_steps is not None and int(state.step) >= max_steps
            if (stop or (every and int(state.step) % every == 0)) and i + 1 < steps_per_epoch:
                extra.update(epoch=epoch, step_in_epoch=i + 1, train_iter=_get_iter_state(train_it),
                             outer_iter=_get_iter_state(outer_it) if outer_it is not None else None,
                             partial={"sums": sums, "count": count, "hyper_log": hyper_log})
                ckpt.save(int(state.step), state, extra)
            if stop and i + 1 < steps_per_epoch:
                bar.close()
                ckpt.close()
                best_ckpt.close()
                log.close()
                return {"stopped_at": int(state.step), "best": extra["best"], "history": extra["history"]}
        bar.close()
        record = {"epoch": t_epoch, "split": "train", "step": int(state.step),
                  "alpha": np.asarray(state.alpha.value).tolist(), "alpha_mean": float(np.mean(state.alpha.value)),
                  "alpha_skipped": int(state.alpha.skipped),
                  **{k: v / max(count, 1) for k, v in sums.items()},
                  "steps_per_s": (count - count0) / max(time.time() - t0, 1e-9)}
        if hyper_log:
            for k in ("iterations", "residual", "hvp_count", "hypergradient"):
                vals = [h[k] for h in hyper_log if k in h]
                if vals:
                    record[f"hypergrad_{k}"] = float(np.mean(vals))
            record["hypergrad_skipped"] = sum(not h["applied"] for h in hyper_log)
        log.write(record, int(state.step))
        evals = {}
        for split in ("validation", "test"):
            if split in manifest.splits:
                evals[split] = evaluate(state, eval_step, cfg, split, mesh)
                log.write({"epoch": t_epoch, "split": split, "step": int(state.step), **evals[split]}, int(state.step))
        history_entry = {"epoch": t_epoch, "alpha": record["alpha"], "train_loss": record.get("loss"),
                         "alpha_skipped": record["alpha_skipped"],
                         **{f"{s}/{k}": v for s, e in evals.items() for k, v in e.items()}}
        extra["history"].append(history_entry)
        sel_split = "validation" if "validation" in evals else None
        if sel_split is None:
            raise ValueError(f"{cfg['data_dir']}: no validation split to select the best epoch on (never on test)")
        score = evals[sel_split][select]
        if extra["best"] is None or score > extra["best"]["score"]:
            extra["best"] = {"epoch": t_epoch, "score": score, "metric": f"validation/{select}",
                             "validation": evals["validation"], "test": evals.get("test")}
            best_ckpt.save(int(state.step), state, {"epoch": t_epoch})
        extra.update(epoch=epoch + 1, step_in_epoch=0, train_iter=None, partial=None,
                     outer_iter=_get_iter_state(outer_it) if outer_it is not None else None)
        ckpt.save(int(state.step), state, extra)
        if jax.process_index() == 0:
            plots.write_all(workdir, extra["history"], modalities, num_epochs)
        if max_steps is not None and int(state.step) >= max_steps and epoch + 1 < num_epochs:
            ckpt.close()
            best_ckpt.close()
            log.close()
            return {"stopped_at": int(state.step), "best": extra["best"], "history": extra["history"]}
    ckpt.close()
    best_ckpt.close()
    log.close()
    summary = {"best": extra["best"], "final_alpha": np.asarray(state.alpha.value).tolist(), "history": extra["history"]}
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


# fields that may change between a run and its resumption (display, input workers, device layout)
_RESUMABLE_CHANGES = ("progress", "data.worker_count", "parallel")


def _write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float))


def _comparable(cfg: dict) -> dict:
    out = json.loads(json.dumps(cfg, default=str))
    for key in _RESUMABLE_CHANGES:
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.get(p, {})
        d.pop(leaf, None)
    return out


def _record_config(cfg: dict, workdir: str) -> None:
    """Write the run's config to ``config.json``; refuse a workdir that holds a run of another config."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = _comparable(json.load(f))
        new = _comparable(cfg)
        if old != new:
            flat = lambda d, pre="": {k2: v2 for k, v in d.items() for k2, v2 in
                                      (flat(v, f"{pre}{k}.").items() if isinstance(v, dict) else [(f"{pre}{k}", v)])}
            fo, fn = flat(old), flat(new)
            diff = sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
            raise ValueError(f"{workdir} holds a run of another config (differs in {', '.join(diff[:8])}); "
                             "use a new --workdir, or the same config to resume")
        return
    _write_json(path, cfg)


def summary_table(summary: dict, modalities, metric_names=("acc", "map", "f1")) -> str:
    """The end-of-run table: fused and per-modality metrics at the best validation epoch, the gap, final alpha."""
    best = summary["best"]
    lines = [f"best epoch {best['epoch']} by {best['metric']} (test never used for selection)", ""]
    head = f"{'split':<11} {'metric':<6} {'fused':>8} " + " ".join(f"{m:>8}" for m in modalities) + f" {'gap':>8}"
    lines += [head, "-" * len(head)]
    for split in ("validation", "test"):
        res = best.get(split)
        if not res:
            continue
        for name in metric_names:
            row = f"{split:<11} {name:<6} {res[name]:>8.4f} " + " ".join(f"{res[f'{name}/{m}']:>8.4f}" for m in modalities)
            lines.append(row + f" {res[f'gap_{name}']:>8.4f}")
    alpha = summary["final_alpha"]
    lines += ["", f"final alpha: {np.array2string(np.asarray(alpha), precision=4)}"]
    if "modality_gap" in best["validation"]:
        lines.append(f"modality-gap distance (validation): {best['validation']['modality_gap']:.4f}")
    return "\n".join(lines)
