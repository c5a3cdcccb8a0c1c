"""The field's balancing methods (issue 23) against PyTorch re-statements of their original code's update, written
here from the papers and the originals (GeWu-Lab/OGM-GE_CVPR2022 ``main.py``, ...): a tiny two-modality model with
the same weights and batches, three train steps in float64, the parameters equal within 1e-10."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import make_tiny_records, tiny_config

from dyngap_jax.methods import mmpareto, ogm_ge
from dyngap_jax.train import ConfigError, setup, validate

HIDDEN, FEATURES, CLASSES = 16, 8, 3
INPUTS = {"a": 6, "b": 5}


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


def balance_config(records, method, **options):
    """``method`` on the tiny records: MLP encoders without normalisation (Dense-ReLU-Dense), the concat head, SGD
    with momentum and weight decay at a constant rate, float64, 2 steps an epoch (48 examples, batches of 24)."""
    c = tiny_config(records, method)
    with c.unlocked():
        c.model.encoders = {m: {"name": "mlp", "hidden": [HIDDEN], "out_features": FEATURES, "in_features": d,
                                "norm": "none"} for m, d in INPUTS.items()}
        c.train.update({"compute_dtype": "float64", "optimizer": "sgd", "learning_rate": 0.5, "momentum": 0.9,
                        "weight_decay": 1e-4, "schedule": "constant", "batch_size": 24})
        c.balance.options.update(options)
    return c


class Net(torch.nn.Module):
    """The tiny model in PyTorch: an encoder a modality, a linear head on their concatenation (``a`` first), and
    with ``unimodal_heads`` a linear head a modality (``heads``)."""

    def __init__(self, unimodal_heads=False):
        super().__init__()
        self.enc = torch.nn.ModuleDict({m: torch.nn.Sequential(torch.nn.Linear(d, HIDDEN), torch.nn.ReLU(),
                                                               torch.nn.Linear(HIDDEN, FEATURES))
                                        for m, d in INPUTS.items()})
        self.head = torch.nn.Linear(2 * FEATURES, CLASSES)
        if unimodal_heads:
            self.heads = torch.nn.ModuleDict({m: torch.nn.Linear(FEATURES, CLASSES) for m in INPUTS})

    def forward(self, x):
        f = {m: self.enc[m](x[m]) for m in INPUTS}
        return f, self.head(torch.cat([f["a"], f["b"]], 1))


def _layers(net: Net, params):
    """``(torch layer, our {kernel, bias})`` pairs."""
    pairs = [(layer, params[f"encoders_{m}"][name]) for m in INPUTS
             for layer, name in ((net.enc[m][0], "dense_0"), (net.enc[m][2], "out"))]
    pairs.append((net.head, params["fusion"]))
    if hasattr(net, "heads"):
        pairs += [(net.heads[m], params["fusion"][f"head_{m}"]) for m in INPUTS]
    return pairs


def to_torch(params, unimodal_heads=False) -> Net:
    t = lambda x: torch.from_numpy(np.array(x, np.float64))
    net = Net(unimodal_heads).double()
    with torch.no_grad():
        for layer, p in _layers(net, params):
            layer.weight.copy_(t(p["kernel"]).T)
            layer.bias.copy_(t(p["bias"]))
    return net


def assert_same_params(net: Net, params, rtol=1e-10):
    n = lambda x: x.detach().numpy()
    for layer, p in _layers(net, params):
        np.testing.assert_allclose(np.asarray(p["kernel"]), n(layer.weight).T, rtol=rtol, atol=1e-13)
        np.testing.assert_allclose(np.asarray(p["bias"]), n(layer.bias), rtol=rtol, atol=1e-13)


def run_steps(cfg, count=3, edit=None):
    """``count`` train steps of ``cfg``'s method from its initial state (``edit(params)`` of it), in float64:
    ``(initial params, batches (as torch tensors) with each step's epoch and key, final state, metrics)``."""
    run = setup(cfg)
    state = run.create_train_state()
    if edit is not None:
        state = state.replace(params=edit(state.params))
    first = jax.tree_util.tree_map(np.asarray, state.params)
    step = run.train_step(state, donate=False)
    epochs = [b for e in range(2) for b in run.loader("train", train=True, epoch=e)]
    batches, metrics = [], []
    for i, batch in enumerate(epochs[:count]):
        key = jax.random.fold_in(state.rng, state.step)  # the step's key (dyngap_jax.train.steps)
        inputs = run.prepare_batch(batch)
        batches.append(({m: torch.from_numpy(np.asarray(inputs[m], np.float64)) for m in INPUTS},
                        torch.from_numpy(np.asarray(inputs["label"], np.int64)), i // run.steps_per_epoch, key))
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    assert run.steps_per_epoch == 2
    return first, batches, state, metrics


# ---- OGM-GE (GeWu-Lab/OGM-GE_CVPR2022, main.py, train_epoch)

def ogm_ge_loop(net: Net, batches, draws, alpha, starts, ends, noise=True):
    """Their step: backward of the fused CE alone; the scores from the concat head's blocks plus half its bias;
    ``ratio_v = score_v / score_a`` (b / a here); the higher one's encoder kernels ``k g + N(0, std(g) + 1e-8)``
    (the noise for both) inside the epoch window; SGD. The standard normal draws are given (``draws``: the JAX
    side's, as PyTorch weights), so the noise is the same numbers scaled by PyTorch's own ``std``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    coeffs = []
    for (x, y, epoch, _), z in zip(batches, draws):
        opt.zero_grad()
        f, out = net(x)
        F.cross_entropy(out, y).backward()
        w, bias = net.head.weight, net.head.bias
        out_a = torch.mm(f["a"], w[:, :FEATURES].T) + bias / 2
        out_b = torch.mm(f["b"], w[:, FEATURES:].T) + bias / 2
        score_a = sum(F.softmax(out_a, dim=1)[i][y[i]] for i in range(len(y)))
        score_b = sum(F.softmax(out_b, dim=1)[i][y[i]] for i in range(len(y)))
        ratio_b = score_b / score_a
        if ratio_b > 1:
            k = {"a": 1.0, "b": 1 - torch.tanh(alpha * F.relu(ratio_b))}
        else:
            k = {"a": 1 - torch.tanh(alpha * F.relu(1 / ratio_b)), "b": 1.0}
        coeffs.append({m: float(torch.as_tensor(v).detach()) for m, v in k.items()})
        if starts <= epoch <= ends:
            for m in INPUTS:
                for layer, draw in zip((net.enc[m][0], net.enc[m][2]), z[m]):
                    g = layer.weight.grad
                    layer.weight.grad = g * k[m] + (draw * (g.std().item() + 1e-8) if noise else 0.0)
        opt.step()
    return coeffs


@pytest.mark.parametrize("noise", [True, False], ids=["ogm_ge", "ogm"])
def test_ogm_ge_follows_the_original_update(tiny_records, noise):
    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "ogm_ge", alpha=0.8, modulation_starts=0, modulation_ends=0, noise=noise)
        first, batches, state, metrics = run_steps(cfg)
        like = jax.tree_util.tree_map(jnp.asarray, first)
        draws = []
        for *_, key in batches:  # each step's draws, in the order the method takes the kernels (a then b)
            z = [torch.from_numpy(np.array(d)).T for d in ogm_ge.noise_draws(key, like, ("a", "b"))]
            draws.append({"a": z[:2], "b": z[2:]})
    assert [ep for _, _, ep, _ in batches] == [0, 0, 1]  # the third step is outside the window (epoch 0 only)
    net = to_torch(first)
    coeffs = ogm_ge_loop(net, batches, draws, alpha=0.8, starts=0, ends=0, noise=noise)
    assert_same_params(net, state.params)
    # the modulation did something: one modality damped at each step in the window, as the metrics report
    for c, m in zip(coeffs[:2], metrics[:2]):
        assert min(c.values()) < 0.9
        np.testing.assert_allclose([m["ogm_coeff/a"], m["ogm_coeff/b"]], [c["a"], c["b"]], rtol=1e-12)
    assert metrics[2]["ogm_coeff/a"] == metrics[2]["ogm_coeff/b"] == 1.0  # outside the window


def test_ogm_ge_coefficients_follow_eq_10_and_the_tie_damps_the_first_modality():
    k_a, k_b = ogm_ge.coefficients(jnp.asarray(2.0), jnp.asarray(3.0), 0.5)
    assert float(k_a) == 1.0 and float(k_b) == pytest.approx(1 - np.tanh(0.5 * 1.5))
    k_a, k_b = ogm_ge.coefficients(jnp.asarray(3.0), jnp.asarray(2.0), 0.5)
    assert float(k_b) == 1.0 and float(k_a) == pytest.approx(1 - np.tanh(0.5 * 1.5))
    k_a, k_b = ogm_ge.coefficients(jnp.asarray(2.0), jnp.asarray(2.0), 0.5)
    assert float(k_b) == 1.0 and float(k_a) == pytest.approx(1 - np.tanh(0.5))


def test_a_two_modality_method_refuses_three_and_a_head_without_modality_logits():
    from configs import nvgesture

    with pytest.raises(ConfigError, match=r"'ogm_ge' takes 2 modalities; config.model.modalities is \['rgb', 'depth', 'flow'\]"):
        validate(nvgesture.get_config("ogm_ge"))
    from configs import cremad

    cfg = cremad.get_config("ogm_ge")
    assert cfg.balance.options.alpha == 0.8  # their README's recommendation for CREMA-D
    with cfg.unlocked():
        cfg.model.fusion = {"name": "gated"}
    with pytest.raises(ConfigError, match=r"config.model.fusion.name: 'ogm_ge' scores each modality"):
        validate(cfg)
    with cfg.unlocked():
        cfg.model.fusion = {"name": "concat", "unimodal_heads": True}
    with pytest.raises(ConfigError, match=r"config.model.fusion.unimodal_heads: 'ogm_ge'"):
        validate(cfg)
    cfg = cremad.get_config("ogm_ge")
    with cfg.unlocked():
        cfg.balance.options.modulation_ends = -1
    with pytest.raises(ConfigError, match=r"config.balance.options: ogm_ge: the window needs"):
        validate(cfg)


# ---- MMPareto (GeWu-Lab/MMPareto_ICML2024, code/MMPareto.py, train_epoch)

def mmpareto_loop(net: Net, batches, gamma=1.5):
    """Their step: a backward a loss (the fused head's CE, then each modality's head's), the gradients zeroed in
    between, each encoder's two kept; per encoder the cosine over all its tensors, (1/2, 1/2) above 0 else
    their two-task min-norm weights; the summed loss's backward; each encoder tensor
    ``gamma max(1, |g_sum| / |d|) d`` with ``d = 2 (c g_mm + (1 - c) g_m)``; the heads as the sum leaves them."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    seen = []
    for x, y, _, _ in batches:
        opt.zero_grad()
        f, out = net(x)
        losses = [F.cross_entropy(out, y)] + [F.cross_entropy(net.heads[m](f[m]), y) for m in INPUTS]
        grads = []
        for loss in losses:
            loss.backward(retain_graph=True)
            grads.append({m: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.enc[m].parameters()]
                          for m in INPUTS})
            opt.zero_grad()
        weights = {}
        for i, m in enumerate(INPUTS):
            g_mm, g_u = grads[0][m], grads[1 + i][m]
            flat_mm, flat_u = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_u])
            cos = F.cosine_similarity(flat_mm, flat_u, dim=0)
            if cos > 0:
                c = 0.5
            else:  # MinNormSolver._min_norm_element_from2(v1v1, v1v2, v2v2)
                v11, v12, v22 = flat_mm @ flat_mm, flat_mm @ flat_u, flat_u @ flat_u
                c = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else float(-((v12 - v22) / (v11 + v22 - 2 * v12)))
            weights[m] = (c, float(cos))
        sum(losses).backward()
        for i, m in enumerate(INPUTS):
            c = weights[m][0]
            for p, a, b in zip(net.enc[m].parameters(), grads[0][m], grads[1 + i][m]):
                d = 2 * c * a + 2 * (1 - c) * b
                diff = p.grad.norm() / d.norm()
                p.grad = diff * d * gamma if diff > 1 else d * gamma
        opt.step()
        seen.append(weights)
    return seen


def test_mmpareto_follows_the_original_update(tiny_records):
    """Three steps, one with a conflicting modality: modality b's own head starts as the negative of its block of
    the fused head, so its unimodal gradient opposes the multimodal one (cosine < 0, the min-norm weights)."""
    def conflict(params):
        fusion = dict(params["fusion"])
        fusion["head_b"] = {"kernel": -fusion["kernel"][FEATURES:], "bias": jnp.zeros_like(fusion["bias"])}
        return {**params, "fusion": fusion}

    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "mmpareto")
        assert dict(cfg.model.fusion) == {"name": "concat", "unimodal_heads": True}
        first, batches, state, metrics = run_steps(cfg, edit=conflict)
    net = to_torch(first, unimodal_heads=True)
    seen = mmpareto_loop(net, batches)
    assert_same_params(net, state.params)
    cos = [w[m][1] for w in seen for m in INPUTS]
    assert min(cos) < 0 < max(cos), cos  # both branches taken: equal weights and the min-norm ones
    # b conflicts from the second step on (cosine < 0): min-norm weights inside (0, 1), not the equal ones
    assert all(w["b"][1] < 0 and 0.001 < w["b"][0] < 0.999 and w["b"][0] != 0.5 for w in seen[1:])
    for w, m in zip(seen, metrics):
        for mod in INPUTS:
            np.testing.assert_allclose(m[f"pareto_weight/{mod}"], w[mod][0], rtol=1e-10)
            np.testing.assert_allclose(m[f"pareto_cos/{mod}"], w[mod][1], rtol=1e-10)


def test_min_norm_weight_minimises_the_combination():
    """The closed form against a bounded scalar minimisation of ``|c g1 + (1 - c) g2|`` (scipy)."""
    import scipy.optimize

    rng = np.random.default_rng(0)
    for _ in range(5):
        g1, g2 = rng.standard_normal(7), rng.standard_normal(7)
        g2 = g2 - 2 * max(0.0, g1 @ g2) / (g1 @ g1) * g1  # a conflict: <g1, g2> <= 0
        ref = scipy.optimize.minimize_scalar(lambda c: np.sum((c * g1 + (1 - c) * g2) ** 2), bounds=(0, 1),
                                             method="bounded", options={"xatol": 1e-12}).x
        assert float(mmpareto.min_norm_weight(g1 @ g1, g1 @ g2, g2 @ g2)) == pytest.approx(ref, abs=1e-6)
    # the clamps: g2 a multiple of g1 beyond it, and the reverse
    g = np.asarray([1.0, 2.0])
    assert float(mmpareto.min_norm_weight(g @ g, 2 * g @ g, 4 * g @ g)) == pytest.approx(0.999)
    assert float(mmpareto.min_norm_weight(4 * g @ g, 2 * g @ g, g @ g)) == pytest.approx(0.001)


@pytest.mark.parametrize("method,words", [("ogm_ge", r"ogm b/a \d\.\d\d, k a \d\.\d{3} b \d\.\d{3}"),
                                          ("mmpareto", r"pareto cos a [+-]\d\.\d\d \(w \d\.\d\d\), b [+-]\d\.\d\d")])
def test_a_balancing_run_says_what_its_method_did_each_epoch(tiny_records, tmp_path, capsys, method, words):
    import re

    from dyngap_jax.train import train

    summary = train(tiny_config(tiny_records, method, epochs=1), str(tmp_path / method))
    out = capsys.readouterr().out
    assert re.search(r"epoch 1/1 .*" + words, out), out
    assert "alpha" not in out.split("epoch 1/1")[1].split("\n")[0]  # LFM's words are LFM's
    assert "final_alpha" not in summary
