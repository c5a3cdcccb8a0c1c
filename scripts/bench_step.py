"""Our jit-compiled train step against a PyTorch eager step of the same architecture and batch, side by side.

    python -m scripts.bench_step                          # both cases, CPU-sized batches
    python -m scripts.bench_step --cases=av --av_batch=64 --steps=20    # on a GPU

Cases (the paper's architectures, randomly initialised; shapes as our converters write them):
  av: ResNet18 on 257x299 one-channel spectrograms + ResNet18 on 3 RGB frames of 224x224 (temporal
      mean), concat fusion, SGD with momentum 0.9 and weight decay (CREMA-D's configs/cremad.py).
  ti: ResNet50 on 224x224 images + BERT-base on 128 tokens, 512-d projections, concat fusion, Adam
      (Sarcasm / Twitter2015's configs/_text_image.py).
Both sides compute L_total = (1 - a) CE + a InfoNCE (a = 0.5, temperature 0.1) on the same batch in
training mode (batch norm statistics updated, dropout on) and take one optimiser step. Ours is
``dyngap_jax.train.make_train_step`` (what training runs); the reference is transformers'
``ResNetModel`` / ``BertModel`` in PyTorch eager mode. Compilation is timed apart; throughput is over
``--steps`` steps after one warm-up step each. Target: ours >= 1.2x PyTorch's examples/s.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import cremad, sarcasm
from dyngap_jax.train import make_train_step, setup

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["av", "ti"], "av: ResNet18 audio + video (CREMA-D); ti: ResNet50 + BERT-base (text-image).")
flags.DEFINE_integer("av_batch", 4, "Batch of the audio-video case (CPU: keep small).")
flags.DEFINE_integer("ti_batch", 4, "Batch of the text-image case.")
flags.DEFINE_integer("steps", 6, "Timed steps after the warm-up step.")
flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: every CPU core, as XLA uses).")

ALPHA, TAU = 0.5, 0.1
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


def case_config(case: str):
    if case == "av":
        return cremad.get_config("ours_h")
    c = sarcasm.get_config("ours_h")
    with c.unlocked():
        c.model.encoders.text = {"name": "bert", "pooling": "cls", "max_length": 128, **BERT_BASE}  # no checkpoint
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


def ours(case: str, batch: dict, steps: int):
    config = case_config(case)
    with config.unlocked():
        config.loss.temperature = TAU
    run = setup(config, data=False)  # the config's model, optimiser and L_MM (InfoNCE, temperature TAU)
    state = run.create_train_state({k: v[:2] for k, v in batch.items()}, jax.random.PRNGKey(0))
    step = make_train_step(run.model, run.tx, run.mm_loss)
    batch = jax.device_put(batch)
    a = jnp.float32(ALPHA)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, a).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch, a)  # warm-up
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch, a)
    jax.block_until_ready(m["loss"])
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return (time.perf_counter() - t0) / steps, compile_s, n_params, float(m["loss"])


def torch_reference(case: str, batch: dict, steps: int):
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

    dev = "cuda" if torch.cuda.is_available() and jax.devices()[0].platform == "gpu" else "cpu"
    torch.manual_seed(0)
    cfg = case_config(case).to_dict()
    num_classes, tcfg = cfg["model"]["num_classes"], cfg["train"]
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

    net = Net().to(dev).train()
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

    def step():
        opt.zero_grad(set_to_none=True)
        za, zb, logits = net(x)
        na, nb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
        sim = na @ nb.T / TAU
        target = torch.arange(sim.shape[0], device=dev)
        l_mm = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
        loss = (1 - ALPHA) * F.cross_entropy(logits, y) + ALPHA * l_mm
        loss.backward()
        opt.step()
        return loss.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    step()  # warm-up (allocator, kernels)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    n_params = sum(p.numel() for p in net.parameters())
    return (time.perf_counter() - t0) / steps, n_params, float(loss), dev


def main(argv):
    del argv
    import torch

    torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
    rows = []
    for case in FLAGS.cases:
        if case not in ("av", "ti"):
            raise app.UsageError(f"--cases: unknown case {case!r} (av, ti)")
        bs = FLAGS.av_batch if case == "av" else FLAGS.ti_batch
        batch = synthetic_batch(case, bs, case_config(case).model.num_classes)
        t_ours, compile_s, p_ours, _ = ours(case, batch, FLAGS.steps)
        t_torch, p_torch, _, dev = torch_reference(case, batch, FLAGS.steps)
        rows.append((case, bs, p_ours, p_torch, bs / t_ours, bs / t_torch, compile_s, dev))
        print(f"  measured {case}", flush=True)
    d = jax.devices()[0]
    print(f"\nJAX device: {d.platform} ({d.device_kind}); PyTorch {torch.__version__} on {rows[0][7] if rows else '-'}, "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPU cores; {FLAGS.steps} timed steps after a warm-up")
    print(f"{'case':<5} {'batch':>5} {'params ours':>12} {'params torch':>13} {'ours ex/s':>10} {'torch ex/s':>11} "
          f"{'ratio':>6} {'compile s':>10}")
    for case, bs, po, pt, eo, et, cs, _ in rows:
        flag = "" if eo / et >= 1.2 else "  < 1.2x target"
        print(f"{case:<5} {bs:>5} {po:>12,} {pt:>13,} {eo:>10.2f} {et:>11.2f} {eo / et:>6.2f} {cs:>10.1f}{flag}")


if __name__ == "__main__":
    app.run(main)
