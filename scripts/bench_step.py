"""Our jit-compiled train step against PyTorch's, same architecture and batch, at matched precisions.

    python -m scripts.bench_step                                           # CPU-sized batches
    python -m scripts.bench_step --av_batch=64 --ti_batch=32 --steps=20    # on a GPU

Cases (the paper's architectures, randomly initialised; shapes as our converters write them):
  av: ResNet18 on 257x299 one-channel spectrograms + ResNet18 on 3 RGB frames of 224x224 (temporal
      mean), concat fusion, SGD with momentum 0.9 and weight decay (CREMA-D's configs/cremad.py).
  ti: ResNet50 on 224x224 images + BERT-base on 128 tokens, 512-d projections, concat fusion, Adam
      (Sarcasm / Twitter2015's configs/_text_image.py).
Both sides compute L_total = (1 - a) CE + a InfoNCE (a = 0.5, temperature 0.1) on the same batch in
training mode (batch norm statistics updated, dropout on) and take one optimiser step. Ours is
``dyngap_jax.train.make_train_step`` (what training runs, its state donated); the reference is
transformers' ``ResNetModel`` / ``BertModel`` in PyTorch, eagerly and under ``torch.compile``.

Precisions, each a row for every side (the sides run the same arithmetic in a row):
  default  float32 with TF32 matmuls and convolutions: JAX's default on NVIDIA GPUs; PyTorch with
           ``allow_tf32`` on for cuBLAS and cuDNN (its own default leaves matmuls in full float32)
  highest  full float32: JAX ``train.matmul_precision=highest``; PyTorch with TF32 off everywhere
  bf16     mixed precision: ours ``train.compute_dtype=bfloat16`` (float32 parameters, optimiser state
           and losses); PyTorch ``torch.autocast(dtype=torch.bfloat16)``
On a CPU TF32 does not exist: default and highest are the same arithmetic there.
Compilation is timed apart; throughput is over ``--steps`` steps after a warm-up step. Target on a
GPU: ours >= 1.2x the fastest PyTorch row at each precision.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import cremad, sarcasm
from dyngap_jax.train import make_train_step, setup
from scripts import common

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["av", "ti"], "av: ResNet18 audio + video (CREMA-D); ti: ResNet50 + BERT-base (text-image).")
flags.DEFINE_list("precisions", ["default", "highest", "bf16"], "Which precision rows.")
flags.DEFINE_integer("av_batch", 4, "Batch of the audio-video case (CPU: keep small).")
flags.DEFINE_integer("ti_batch", 4, "Batch of the text-image case.")
flags.DEFINE_integer("steps", 6, "Timed steps after the warm-up step.")
flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: every CPU core, as XLA uses).")
flags.DEFINE_bool("torch_compile", True, "Also time PyTorch under torch.compile (a row that says why where it fails).")

ALPHA, TAU = 0.5, 0.1
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
PRECISIONS = ("default", "highest", "bf16")


def case_config(case: str, precision: str = "default"):
    c = cremad.get_config("ours_h") if case == "av" else sarcasm.get_config("ours_h")
    with c.unlocked():
        if case == "ti":
            c.model.encoders.text = {"name": "bert", "pooling": "cls", "max_length": 128, **BERT_BASE}  # no checkpoint
        c.loss.temperature = TAU
        c.data.frames = {}  # the synthetic batches are the model's inputs (both sides see the same tensors)
        c.train.matmul_precision = "highest" if precision == "highest" else "default"
        c.train.compute_dtype = "bfloat16" if precision == "bf16" else "float32"
    return c


def synthetic_batch(case: str, batch: int, num_classes: int):
    rng = np.random.default_rng(0)
    if case == "av":
        b = {"audio": rng.standard_normal((batch, 257, 299, 1)).astype(np.float32),
             "video": rng.standard_normal((batch, 3, 224, 224, 3)).astype(np.float32)}
    else:
        b = {"image": rng.standard_normal((batch, 224, 224, 3)).astype(np.float32),
             "text": rng.integers(1000, 30000, (batch, 128)).astype(np.int32),
             "text_mask": np.ones((batch, 128), np.int32)}
    b["label"] = (np.arange(batch) % num_classes).astype(np.int32)
    return b


def ours(case: str, batch: dict, steps: int, precision: str):
    """(seconds a step, compile seconds, parameters, last loss) of our train step."""
    config = case_config(case, precision)
    # the config's model (at its compute dtype), optimiser and method (LFM: L_MM)
    run = setup(config, data=False, example={k: v[:2] for k, v in batch.items()})
    state = run.create_train_state(jax.random.PRNGKey(0))
    state = state.replace(alpha=state.alpha.replace(value=jnp.asarray(ALPHA, state.alpha.value.dtype)))
    step = make_train_step(model=run.compute_model, tx=run.tx, method=run.method, precision=run.cfg.precision.matmul,
                           donate=True)
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t0) / steps, compile_s, n_params, float(m["loss"])


def torch_net(case: str, dev: str):
    import torch
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = case_config(case).to_dict()
    num_classes = cfg["model"]["num_classes"]
    r18 = lambda ch: ResNetConfig(num_channels=ch, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                  layer_type="basic", hidden_act="relu")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if case == "av":
                self.a, self.b = ResNetModel(r18(1)), ResNetModel(r18(3))
                dims, self.proj = (512, 512), None
            else:
                self.a = ResNetModel(ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                                                  depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_act="relu"))
                self.b = BertModel(BertConfig(**BERT_BASE))  # with the pooler: cls pooling is dense + tanh on [CLS]
                self.proj = torch.nn.ModuleList([torch.nn.Linear(2048, 512), torch.nn.Linear(768, 512)])
                dims = (512, 512)
            self.head = torch.nn.Linear(sum(dims), num_classes)

        def forward(self, x):
            if case == "av":
                za = self.a(x["audio"]).pooler_output.flatten(1)
                v = x["video"]
                zb = self.b(v.flatten(0, 1)).pooler_output.flatten(1).view(v.shape[0], v.shape[1], -1).mean(1)
            else:
                za = self.proj[0](self.a(x["image"]).pooler_output.flatten(1))
                zb = self.proj[1](self.b(input_ids=x["text"], attention_mask=x["text_mask"]).pooler_output)
            return za, zb, self.head(torch.cat([za, zb], 1))

    return Net().to(dev).train()


def set_torch_precision(precision: str) -> None:
    """TF32 on for cuBLAS and cuDNN (what JAX does by default on NVIDIA GPUs) or off (full float32)."""
    import torch

    tf32 = precision != "highest"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def torch_side(case: str, batch: dict, steps: int, precision: str, compiled: bool, dev: str):
    """(seconds a step, compile seconds or None, parameters, last loss) of PyTorch's train step."""
    import torch
    import torch.nn.functional as F

    set_torch_precision(precision)
    net = torch_net(case, dev)
    tcfg = case_config(case).to_dict()["train"]
    if tcfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=tcfg["learning_rate"], momentum=tcfg["momentum"],
                              weight_decay=tcfg["weight_decay"])
    else:
        opt = torch.optim.Adam(net.parameters(), lr=tcfg["learning_rate"])
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    if case == "av":
        x = {"audio": to(batch["audio"].transpose(0, 3, 1, 2)), "video": to(batch["video"].transpose(0, 1, 4, 2, 3))}
    else:
        x = {"image": to(batch["image"].transpose(0, 3, 1, 2)), "text": to(batch["text"]).long(),
             "text_mask": to(batch["text_mask"]).long()}
    y = to(batch["label"]).long()
    autocast = (lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def loss_of(x, y):
        with autocast():
            za, zb, logits = net(x)
        za, zb, logits = za.float(), zb.float(), logits.float()  # losses in float32, as ours
        na, nb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
        sim = na @ nb.T / TAU
        target = torch.arange(sim.shape[0], device=dev)
        l_mm = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
        return (1 - ALPHA) * F.cross_entropy(logits, y) + ALPHA * l_mm

    forward = torch.compile(loss_of) if compiled else loss_of

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()  # warm-up (allocator, kernels; torch.compile compiles here)
    sync()
    compile_s = time.perf_counter() - t0 if compiled else None
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    n_params = sum(p.numel() for p in net.parameters())
    return (time.perf_counter() - t0) / steps, compile_s, n_params, float(loss)


def card() -> str:
    import torch

    d = jax.devices()[0]
    gpu = (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
           if torch.cuda.is_available() else "no CUDA device for PyTorch")
    return (f"JAX {jax.__version__} on {d.platform} ({d.device_kind}); PyTorch {torch.__version__} ({gpu}), "
            f"{torch.get_num_threads()} threads; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); "
            f"Python {platform.python_version()}")


def main(argv):
    del argv
    import torch

    torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
    dev = "cuda" if torch.cuda.is_available() and jax.devices()[0].platform == "gpu" else "cpu"
    for p in FLAGS.precisions:
        if p not in PRECISIONS:
            raise app.UsageError(f"--precisions: unknown {p!r} ({', '.join(PRECISIONS)})")
    rows = []
    for case in FLAGS.cases:
        if case not in ("av", "ti"):
            raise app.UsageError(f"--cases: unknown case {case!r} (av, ti)")
        bs = FLAGS.av_batch if case == "av" else FLAGS.ti_batch
        batch = synthetic_batch(case, bs, case_config(case).model.num_classes)
        for precision in FLAGS.precisions:
            t, c, n, _ = ours(case, batch, FLAGS.steps, precision)
            rows.append((case, bs, precision, "ours (jax.jit)", n, bs / t, c, ""))
            t, _, n, _ = torch_side(case, batch, FLAGS.steps, precision, False, dev)
            rows.append((case, bs, precision, "pytorch eager", n, bs / t, None, ""))
            if FLAGS.torch_compile:
                try:
                    t, c, n, _ = torch_side(case, batch, FLAGS.steps, precision, True, dev)
                    rows.append((case, bs, precision, "pytorch torch.compile", n, bs / t, c, ""))
                except Exception as e:  # noqa: BLE001 - a row saying why, not a crash
                    rows.append((case, bs, precision, "pytorch torch.compile", 0, float("nan"), None,
                                 f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"))
            print(f"  measured {case} {precision}", flush=True)
    print(f"\n{card()}; PyTorch on {dev}; {FLAGS.steps} timed steps after a warm-up")
    print(f"{'case':<5} {'batch':>5} {'precision':<9} {'side':<22} {'params':>12} {'ex/s':>9} {'ours / fastest torch':>21} "
          f"{'compile s':>10}")
    for case, bs, precision, side, n, rate, c, note in rows:
        torch_rates = [r[5] for r in rows if r[0] == case and r[2] == precision and r[3] != "ours (jax.jit)"
                       and np.isfinite(r[5])]
        ratio = ""
        if side == "ours (jax.jit)" and torch_rates:
            ratio = f"{rate / max(torch_rates):.2f}" + ("" if rate / max(torch_rates) >= 1.2 else " < 1.2x target")
        print(f"{case:<5} {bs:>5} {precision:<9} {side:<22} {n:>12,} {rate:>9.2f} {ratio:>21} "
              f"{'' if c is None else f'{c:.1f}':>10} {note}")


if __name__ == "__main__":
    common.run(main)
