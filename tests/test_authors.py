"""The authors' recipe against a PyTorch re-statement of their training loop (njustkmg/NeurIPS24-LFM,
Crema_epoch_learnable.py), written here from its description: a tiny two-modality model with BatchNorm,
the same weights, the same batches, three epochs, in float64."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import make_tiny_records

from configs import mfeat as mfeat_config
from dyngap_jax import alpha as alpha_lib
from dyngap_jax.data import loader as data_loader
from dyngap_jax.train import setup, train

EPOCHS = 3


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


def authors_config(data_dir, epochs=EPOCHS):
    """configs/mfeat.py:authors_learned on the tiny two-view records, a model small enough to restate in PyTorch."""
    c = mfeat_config.get_config("authors_learned")
    with c.unlocked():
        c.dataset, c.data_dir, c.progress = "tiny", data_dir, False
        c.data.standardize = False
        c.model.modalities = ["a", "b"]
        c.model.num_classes = 3
        c.model.encoders = {m: {"name": "mlp", "hidden": [6], "out_features": 4, "in_features": d, "norm": "batch"}
                            for m, d in (("a", 6), ("b", 5))}
        c.train.num_epochs = epochs
        c.train.batch_size = 8  # 48 - 16 held out = 32 training examples: 4 steps an epoch, no partial batch
        c.train.eval_batch_size = 8
        c.train.compute_dtype = "float64"
        c.alpha.learned.init = 0.5  # inside the clip range, so that no step is clipped away in these three epochs
    return c


class Encoder(torch.nn.Module):
    def __init__(self, d_in):
        super().__init__()
        self.fc = torch.nn.Linear(d_in, 6)
        self.bn = torch.nn.BatchNorm1d(6, momentum=0.1, eps=1e-5)
        self.out = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.fc(x))))


class AVClassifier(torch.nn.Module):
    """model/AudioVideo.py's shape: an encoder and a linear head per modality, registered in that order."""

    def __init__(self):
        super().__init__()
        self.enc_a, self.enc_b = Encoder(6), Encoder(5)
        self.cls_a, self.cls_b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, a, b):
        return self.cls_a(self.enc_a(a)), self.cls_b(self.enc_b(b))


def copy_weights(net, params, stats):
    """Our initial parameters (flax: kernels [in, out]) into the PyTorch modules (weights [out, in])."""
    t = lambda x: torch.from_numpy(np.asarray(x, np.float64))
    with torch.no_grad():
        for m, enc in (("a", net.enc_a), ("b", net.enc_b)):
            p, s = params[f"encoders_{m}"], stats[f"encoders_{m}"]
            enc.fc.weight.copy_(t(p["dense_0"]["kernel"]).T)
            enc.fc.bias.copy_(t(p["dense_0"]["bias"]))
            enc.bn.weight.copy_(t(p["norm_0"]["scale"]))
            enc.bn.bias.copy_(t(p["norm_0"]["bias"]))
            enc.bn.running_mean.copy_(t(s["norm_0"]["mean"]))
            enc.bn.running_var.copy_(t(s["norm_0"]["var"]))
            enc.out.weight.copy_(t(p["out"]["kernel"]).T)
            enc.out.bias.copy_(t(p["out"]["bias"]))
        for m, head in (("a", net.cls_a), ("b", net.cls_b)):
            head.weight.copy_(t(params["fusion"][f"head_{m}"]["kernel"]).T)
            head.bias.copy_(t(params["fusion"][f"head_{m}"]["bias"]))


def alignment(p, q):
    """Their Alignment(): F.kl_div(p.log(), m, 'batchmean') and the same for q, halved."""
    p, q = F.softmax(p, dim=-1), F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def authors_loop(net, heldout, epoch_batches, alpha_init, lr_alpha=1e-4):
    """Their loop: each epoch the alpha step on the first half of the held-out batch (in whatever mode the
    model is: training before any evaluation, evaluation after), then an epoch of SGD on 2 L_total,
    then evaluation (which leaves the model in evaluation mode). Returns alpha and the estimate, per epoch."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    cls_k = [1.0 - alpha_init, alpha_init]
    x = lambda b, k: torch.from_numpy(np.asarray(b[k], np.float64))
    y = lambda b: torch.from_numpy(np.asarray(b["label"], np.int64))
    trajectory, estimates = [], []
    for epoch, batches in enumerate(epoch_batches):
        # getAlpha_Learnable: H_total . g_cls on the same examples, reduced by the first parameter tensor's mean
        half = len(heldout["label"]) // 2
        o_a, o_b = net(x(heldout, "a")[:half], x(heldout, "b")[:half])
        loss_align = alignment(o_a, o_b)
        loss_cls = F.cross_entropy(0.5 * o_b + 0.5 * o_a, y(heldout)[:half])
        total = cls_k[0] * loss_cls + cls_k[1] * loss_align
        theta_grads = torch.autograd.grad(total, params, create_graph=True)
        cls_grads = torch.autograd.grad(loss_cls, params, retain_graph=True, create_graph=True)
        hvp = torch.autograd.grad(theta_grads, params, grad_outputs=cls_grads, retain_graph=True)
        alpha_grad = hvp[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        cls_k[1] -= lr_alpha * alpha_grad
        cls_k[1] = max(0.05, min(0.95, cls_k[1]))
        cls_k[0] = 1.0 - cls_k[1]
        estimates.append(alpha_grad)
        trajectory.append(cls_k[1])
        net.train()
        for b in batches:
            opt.zero_grad()
            o_a, o_b = net(x(b, "a"), x(b, "b"))
            loss = 2 * (cls_k[0] * F.cross_entropy(0.5 * o_b + 0.5 * o_a, y(b)) + cls_k[1] * alignment(o_a, o_b))
            loss.backward()
            opt.step()
        net.eval()
    return trajectory, estimates


def test_the_authors_recipe_follows_their_alpha_trajectory_in_float64(tiny_records, tmp_path):
    import jax

    with jax.enable_x64(True):
        cfg = authors_config(tiny_records)
        run = setup(cfg)
        state = run.create_train_state()
        assert run.info.parameter_order[0] == "encoders_a/dense_0/kernel"  # PyTorch's first: enc_a.fc.weight
        assert run.method.estimator.tensor == "encoders_a/dense_0/kernel"
        assert len(run.heldout) == 16 and len(run.heldout_batch()["label"]) == 8
        # their val_batch: the 16 held-out examples, in the order drawn (the alpha step takes its first half)
        heldout = data_loader.load_examples(tiny_records, "train", run.heldout, seed=0)
        np.testing.assert_array_equal(heldout["a"][:8], run.heldout_batch()["a"])
        epoch_batches = [list(run.loader("train", train=True, epoch=e)) for e in range(EPOCHS)]
        assert [len(b) for b in epoch_batches] == [4] * EPOCHS
        # the held-out examples are not trained on
        held = {tuple(np.round(r, 6)) for r in heldout["a"]}
        assert not any(tuple(np.round(r, 6)) in held for bs in epoch_batches for b in bs for r in b["a"])
        summary = train(cfg, str(tmp_path / "run"))
    torch.manual_seed(0)
    net = AVClassifier().double()
    copy_weights(net, state.params, state.model_state["batch_stats"])
    want, estimates = authors_loop(net, heldout, epoch_batches, alpha_init=0.5)
    got = [h["alpha"] for h in summary["history"]]
    got_estimates = [h["hypergrad_hypergradient"] for h in summary["history"]]
    np.testing.assert_allclose(got_estimates, estimates, rtol=1e-12, atol=0)
    # to a few units in the last place: alpha's learning rate is a double too (a float32 1e-4, 9.999999747e-05,
    # was off by 2.5e-8 of every step, ~4e-14 here)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    # alpha moved every epoch (the comparison is not of three clipped constants)
    assert len(set(np.round(want, 12))) == EPOCHS and min(abs(np.diff([0.5] + want))) > 1e-9


def test_the_alpha_step_before_the_first_evaluation_moves_the_running_averages_once(tiny_records, tmp_path):
    """Their epoch-0 alpha step runs the model in training mode: BatchNorm's running averages move once
    on the held-out half before any training; from epoch 1 on the step leaves them alone."""
    import jax

    cfg = authors_config(tiny_records, epochs=1)
    with cfg.unlocked():
        cfg.train.compute_dtype = "float32"
    run = setup(cfg)
    state = run.create_train_state()
    state = jax.device_put(state, run.shardings(state)[0])
    _, _, alpha_step = run.compile_steps(state, donate=False)
    batch = jax.device_put(run.heldout_batch())
    before = np.asarray(state.model_state["batch_stats"]["encoders_a"]["norm_0"]["mean"])
    first, _, _ = alpha_step(state, batch, batch, True)
    later, _, _ = alpha_step(state, batch, batch, False)
    moved = np.asarray(first.model_state["batch_stats"]["encoders_a"]["norm_0"]["mean"])
    assert not np.allclose(moved, before)
    np.testing.assert_array_equal(np.asarray(later.model_state["batch_stats"]["encoders_a"]["norm_0"]["mean"]), before)
    # the move is one training-mode forward's: 0.1 of the way to the batch mean of the first layer's output
    x = np.asarray(batch["a"], np.float64)
    p = state.params["encoders_a"]["dense_0"]
    h = x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(moved, 0.9 * before + 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)


def test_the_fitted_polynomial_is_their_curve_and_dips_below_zero():
    coef = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11]
    theirs = lambda e: sum(c * (e ** i) for i, c in enumerate(coef))
    values = np.asarray([float(alpha_lib.authors_fitted(e)) for e in range(200)])
    np.testing.assert_allclose(values, [theirs(e) for e in range(200)], rtol=1e-6)
    negative = [e for e in range(200) if values[e] < 0]
    assert negative and negative[0] >= 170 and negative[-1] <= 190
    strategy = alpha_lib.fixed_strategy("authors_fitted")
    assert float(strategy(1, 200)) == pytest.approx(theirs(0), rel=1e-6)  # epoch t = 1 is their epoch 0
    exp = alpha_lib.fixed_strategy("authors_exp")
    assert float(exp(1, 200)) == pytest.approx(0.95) and float(exp(2, 200)) == pytest.approx(np.exp(-0.3), rel=1e-6)


@pytest.mark.parametrize("at_start", [True, False])
def test_the_step_schedule_decays_as_torch_steplr_stepped_where_the_authors_step_it(at_start):
    """train.step_at_epoch_start: StepLR.step() before each epoch's training (their code), so the first decay
    comes one epoch early; without it, after each epoch (PyTorch's usual place)."""
    import jax.numpy as jnp

    import dataclasses

    from dyngap_jax.train import make_optimizer
    from dyngap_jax.train.sections import TrainConfig

    every, epochs, per_epoch = 3, 10, 2
    tcfg = dataclasses.replace(TrainConfig(), learning_rate=0.5, schedule="step", step_every_epochs=every,
                               step_factor=0.1, step_at_epoch_start=at_start, num_epochs=epochs, weight_decay=0.0,
                               optimizer="sgd", momentum=0.0)
    tx = make_optimizer(tcfg, per_epoch)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    ours = []
    for _ in range(epochs * per_epoch):  # with a gradient of 1 and no momentum the update is -lr
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        ours.append(-float(updates["w"]))
    w = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, every, 0.1)
    theirs = []
    for _ in range(epochs):
        if at_start:
            sched.step()  # Crema_epoch_learnable.py: scheduler.step() before train_audio_video(...)
        theirs += [opt.param_groups[0]["lr"]] * per_epoch
        if not at_start:
            sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
