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

    def __init__(self, unimodal_heads=False, additive=False, batch_norm=False):
        super().__init__()
        self.additive = additive  # the ``sum`` head (reduce "sum"): no concat head, the heads' logits summed
        norm = lambda: [torch.nn.BatchNorm1d(HIDDEN, eps=1e-5, momentum=0.1)] if batch_norm else []
        self.enc = torch.nn.ModuleDict({m: torch.nn.Sequential(torch.nn.Linear(d, HIDDEN), *norm(), torch.nn.ReLU(),
                                                               torch.nn.Linear(HIDDEN, FEATURES))
                                        for m, d in INPUTS.items()})
        if not additive:
            self.head = torch.nn.Linear(2 * FEATURES, CLASSES)
        if unimodal_heads or additive:
            self.heads = torch.nn.ModuleDict({m: torch.nn.Linear(FEATURES, CLASSES) for m in INPUTS})

    def forward(self, x):
        f = {m: self.enc[m](x[m]) for m in INPUTS}
        if self.additive:
            return f, sum(self.heads[m](f[m]) for m in INPUTS)
        return f, self.head(torch.cat([f["a"], f["b"]], 1))


def _layers(net: Net, params):
    """``(torch layer, our {kernel, bias})`` pairs."""
    pairs = [(layer, params[f"encoders_{m}"][name]) for m in INPUTS
             for layer, name in ((net.enc[m][0], "dense_0"), (net.enc[m][-1], "out"))]
    if hasattr(net, "head"):
        pairs.append((net.head, params["fusion"]))
    if hasattr(net, "heads"):
        pairs += [(net.heads[m], params["fusion"][f"head_{m}"]) for m in INPUTS]
    return pairs


def to_torch(params, unimodal_heads=False, additive=False, batch_norm=False) -> Net:
    t = lambda x: torch.from_numpy(np.array(x, np.float64))
    net = Net(unimodal_heads, additive, batch_norm).double()
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


def run_steps(cfg, count=3, edit=None, method_state=None):
    """``count`` train steps of ``cfg``'s method from its initial state (``edit(params)`` of it; ``method_state``
    replacing its own), in float64: ``(initial params, batches (as torch tensors) with each step's epoch and key,
    final state, metrics)``."""
    run = setup(cfg)
    state = run.create_train_state()
    if edit is not None:
        state = state.replace(params=edit(state.params))
    if method_state is not None:
        state = state.replace(method_state=method_state)
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
                for layer, draw in zip((net.enc[m][0], net.enc[m][-1]), z[m]):
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


# ---- MSLR (the AGM authors' baseline of it: lihong2303/AGM_ICCV2023, run/CREMAD_main.py)

def branches(net: Net, m: str) -> list:
    """Modality ``m``'s branch: its encoder and its own head (their ``audio_net`` and ``audio_cls``)."""
    return list(net.enc[m].parameters()) + list(net.heads[m].parameters())


def mslr_loop(net: Net, batches, coeff: dict, scale: str):
    """``learning_rate``: a PyTorch parameter group a branch at ``lr c_m`` (the paper's learning rate a modality);
    ``gradient``: their code, each branch's gradients times ``c_m`` after the backward, one SGD at ``lr``."""
    rate = lambda m: 0.5 * (coeff[m] if scale == "learning_rate" else 1.0)
    opt = torch.optim.SGD([{"params": branches(net, m), "lr": rate(m)} for m in INPUTS], lr=0.5, momentum=0.9,
                          weight_decay=1e-4)
    for x, y, _, _ in batches:
        opt.zero_grad()
        _, out = net(x)
        F.cross_entropy(out, y).backward()
        if scale == "gradient":
            for m in INPUTS:
                for p in branches(net, m):
                    p.grad = p.grad * coeff[m]
        opt.step()


@pytest.mark.parametrize("scale", ["learning_rate", "gradient"])
def test_mslr_trains_each_branch_at_its_own_rate(tiny_records, scale):
    coeff = {"a": 0.6, "b": 1.7}
    from dyngap_jax.methods.mslr import Rates

    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "mslr", scale=scale, initial="a=0.6,b=1.7")
        assert dict(cfg.model.fusion) == {"name": "sum", "reduce": "sum"}  # their AVClassifier_Sum
        run = setup(cfg)
        rates, state = Rates(run.method), run.create_train_state()
        rates.open(run, state, None)
        own = rates.epoch_start(state, 0).method_state  # the part sets the rates
        assert own["coeff"].dtype == jnp.float64  # in the run's precision: 0.6, not float32's 0.6000000238
        first, batches, state, metrics = run_steps(cfg, method_state=own)
    net = to_torch(first, additive=True)
    mslr_loop(net, batches, coeff, scale)
    assert_same_params(net, state.params)
    assert [(m["mslr_coeff/a"], m["mslr_coeff/b"]) for m in metrics] == [(0.6, 1.7)] * 3
    # the two readings differ (weight decay goes with the rate, not with the gradient), and both from the plain step
    for other, c in (("gradient" if scale == "learning_rate" else "learning_rate", coeff), (scale, {"a": 1, "b": 1})):
        net = to_torch(first, additive=True)
        mslr_loop(net, batches, c, other)
        with pytest.raises(AssertionError):
            assert_same_params(net, state.params, rtol=1e-8)


def their_mslr_schedule(initial, accuracies, memory=5, starts=0, ends=19):
    """Their multipliers epoch by epoch (epochs from 0 here; theirs from 1 with the window shifted): ``c_m =
    initial_m * ratio_m``, the ratios and the memory updated after each epoch's evaluation as their main loop does."""
    ratio = {m: 1.0 for m in initial}
    kept = {m: [] for m in initial}
    out = []
    for epoch, acc in enumerate(accuracies):
        out.append({m: initial[m] * ratio[m] if starts <= epoch <= ends else 1.0 for m in initial})
        if len(kept["a"]) < memory:
            for m in initial:
                kept[m].append(acc[m])
        else:
            for m in initial:
                ratio[m] = acc[m] / np.mean(kept[m])
                kept[m] = kept[m][1:] + [acc[m]]
    return out


def test_mslr_moves_each_rate_with_its_modalitys_validation_accuracy(tiny_records):
    from dyngap_jax.methods.mslr import Rates

    cfg = tiny_config(tiny_records, "mslr", epochs=12)
    with cfg.unlocked():
        cfg.balance.options.update({"initial": "a=0.9, b=1.1", "memory": 3, "modulation_ends": 9})
    run = setup(cfg)
    rates = Rates(run.method)
    state = run.create_train_state()
    rates.open(run, state, None)
    rng = np.random.default_rng(1)
    accuracies = [{"a": float(rng.uniform(0.3, 0.9)), "b": float(rng.uniform(0.2, 0.6))} for _ in range(12)]
    expected = their_mslr_schedule({"a": 0.9, "b": 1.1}, accuracies, memory=3, ends=9)
    seen = []
    for epoch, acc in enumerate(accuracies):
        if epoch == 6:  # a resume: a new part from the checkpoint's JSON
            saved, rates = rates.to_json(), Rates(run.method)
            rates.open(run, state, saved)
        state = rates.epoch_start(state, epoch)
        seen.append(np.asarray(state.method_state["coeff"], float))
        rates.evaluated({"validation": {"acc": 0.5, "acc/a": acc["a"], "acc/b": acc["b"]}})
    np.testing.assert_allclose(seen, [[e["a"], e["b"]] for e in expected], rtol=1e-6)
    assert len({tuple(np.round(s, 6)) for s in seen[4:10]}) == 6  # the rates moved: 0.9 / 1.1 until epoch 4
    np.testing.assert_allclose(seen[10:], 1.0)  # outside the window


@pytest.mark.parametrize("options,match", [
    ({"initial": "a=0.9,c=1.1"}, r"config\.balance\.options\.initial: \['c'\] not among config\.model\.modalities"),
    ({"initial": "a=-1"}, r"config\.balance\.options: mslr: `initial` takes 'modality=multiplier' items"),
    ({"scale": "momentum"}, r"config\.balance\.options: mslr: `scale` must be"),
    ({"modulation_starts": 2}, r"config\.balance\.options\.modulation_starts: 2 is past the run's last epoch \(1, "),
    ({"memory": 0}, r"config\.balance\.options: mslr: `memory` must be >= 1"),
])
def test_mslr_refuses_bad_options_naming_the_field(tiny_records, options, match):
    cfg = tiny_config(tiny_records, "mslr")
    with cfg.unlocked():
        cfg.balance.options.update(options)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
    cfg = tiny_config(tiny_records, "mslr")
    with cfg.unlocked():
        cfg.model.fusion = {"name": "gated"}
    with pytest.raises(ConfigError, match=r"config\.model\.fusion\.name: 'mslr' reads each modality's validation"):
        validate(cfg)


@pytest.mark.parametrize("method,options,match", [
    ("ogm_ge", {"alpha": -0.5}, r"config\.balance\.options: ogm_ge: `alpha` must be >= 0"),
    ("ogm_ge", {"modulation_starts": 5, "modulation_ends": 9}, r"options\.modulation_starts: 5 is past the run's last"),
    ("agm", {"alpha": -1.0}, r"config\.balance\.options: agm: `alpha` must be >= 0"),
    ("agm", {"modulation_starts": 2}, r"config\.balance\.options\.modulation_starts: 2 is past"),
    ("pmr", {"modulation_starts": 3, "modulation_ends": 4}, r"config\.balance\.options\.modulation_starts: 3 is past"),
    ("pmr", {"alpha": -2.0}, r"config\.balance\.options: pmr: `alpha` must be >= 0"),
    ("gblending", {"super_epoch": 1}, r"config\.balance\.options: gblending: `super_epoch` must be >= 2"),
    ("mla", {"projection": "owm"}, r"config\.balance\.options: mla: `projection` must be 'none' or 'first_commit'"),
    ("mmpareto", {"gamma": 0.0}, r"config\.balance\.options: mmpareto: `gamma` must be > 0"),
])
def test_a_balancing_methods_bad_options_fail_before_anything_runs(tiny_records, tmp_path, method, options, match):
    from dyngap_jax.train import train

    cfg = tiny_config(tiny_records, method)
    with cfg.unlocked():
        cfg.balance.options.update(options)
    with pytest.raises(ConfigError, match=match):
        train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written


# ---- every balancing method in a run: killed, resumed, restored

RESUMED = {"ogm_ge": {}, "mmpareto": {}, "mslr": {"memory": 1, "initial": "a=0.8,b=1.2"}, "agm": {},
           "pmr": {"proto_momentum": 0.5}, "mla": {"projection": "first_commit"},
           "gblending": {"super_epoch": 2}}


@pytest.mark.parametrize("method", sorted(RESUMED))
def test_a_balancing_run_killed_inside_an_epoch_resumes_to_the_uninterrupted_one(tiny_records, tmp_path, method):
    """Three epochs of 3 steps; the interrupted run stops after step 7 (inside the third epoch: MSLR's rates have
    moved by then) and resumes; its method state and its parts' come back from the checkpoint."""
    from tiny_data import assert_same_run

    from dyngap_jax.train import evaluate_checkpoint, load_run_state, train

    cfg = tiny_config(tiny_records, method, epochs=3)
    with cfg.unlocked():
        cfg.balance.options.update(RESUMED[method])
    full = train(cfg, str(tmp_path / "full"))
    assert train(cfg, str(tmp_path / "resumed"), max_steps=7)["stopped_at"] == 7
    train(cfg, str(tmp_path / "resumed"))
    assert_same_run(str(tmp_path / "resumed"), str(tmp_path / "full"), epochs=3)
    (_, sa, _), (_, sb, _) = (load_run_state(cfg, str(tmp_path / d), 9) for d in ("full", "resumed"))
    for x, y in zip(jax.tree_util.tree_leaves((sa.params, sa.method_state)),
                    jax.tree_util.tree_leaves((sb.params, sb.method_state))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    if method == "mslr":
        coeff = np.asarray(sa.method_state["coeff"])
        assert np.all(coeff != np.asarray([0.8, 1.2]))  # the third epoch trained at rates the ratios moved
    step, res = evaluate_checkpoint(None, str(tmp_path / "resumed"), "test", "best")
    assert step == 3 * full["best"]["epoch"]
    assert res["acc"] == pytest.approx(full["best"]["test"]["acc"], abs=1e-6)
    if method == "mla":  # the script, as a user runs it, with the method's own fusion (entropy weights)
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "scripts.evaluate", "--workdir", str(tmp_path / "resumed"),
                               "--split", "test"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = next(line for line in proc.stdout.splitlines() if line.startswith("test ") and " acc " in line)
        assert float(row.split()[2]) == pytest.approx(full["best"]["test"]["acc"], abs=1e-4)


# ---- AGM (lihong2303/AGM_ICCV2023: model/CREMAD_net.py GradMod, run/CREMAD_main.py train)

class GradMod(torch.nn.Module):
    """Their wrapper, restated on the tiny model: the full pass, the passes with one modality zeroed (evaluation
    mode), ``m_a = (f(ab) - f(b) + f(a)) / 2`` and ``m_b`` likewise through identity modules whose backward hooks
    scale the gradient by ``scale_a`` / ``scale_b``; the output ``m_a + m_b``."""

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    def __init__(self, net: Net):
        super().__init__()
        self.net, self.scale = net, {"a": 1.0, "b": 1.0}
        self.out = torch.nn.ModuleDict({m: self.Identity() for m in INPUTS})
        for m in INPUTS:
            self.out[m].register_full_backward_hook(lambda mod, gin, gout, m=m: (gin[0].clone() * self.scale[m],))

    def forward(self, x):
        total = self.net(x)[1]
        self.net.eval()
        pad_b = self.net({"a": x["a"], "b": torch.zeros_like(x["b"])})[1]  # f(a)
        pad_a = self.net({"a": torch.zeros_like(x["a"]), "b": x["b"]})[1]  # f(b)
        self.net.train()
        m_a = self.out["a"](0.5 * (total - pad_a + pad_b))
        m_b = self.out["b"](0.5 * (total - pad_b + pad_a))
        return 0.5 * (total - pad_a + pad_b), 0.5 * (total - pad_b + pad_a), m_a + m_b


def agm_loop(net: Net, batches, alpha, starts, ends, steps_per_epoch=2):
    """Their train loop: the scores (floored at 1e-8), the ratios against the running scores, the scales updated
    inside the window before the backward (their epochs from 1: the window shifted by one), the clip when the
    head's weight gradient leaves [-1, 1], SGD."""
    model = GradMod(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    train_a = train_b = 0.0
    seen = []
    for i, (x, y, epoch, _) in enumerate(batches):
        iteration = i + 1
        out_a, out_b, out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        score = {}
        for m, o in (("a", out_a), ("b", out_b)):
            p = F.softmax(o, dim=1)
            score[m] = sum(-torch.log(torch.tensor(1e-8, dtype=o.dtype)) if p[k][y[k]] < 1e-8 else -torch.log(p[k][y[k]])
                           for k in range(len(y))) / len(y)
        ratio_a = np.exp(score["b"].item() - score["a"].item())
        ratio_b = np.exp(score["a"].item() - score["b"].item())
        coeff_a = np.exp(alpha * min(np.exp(train_b - train_a) - ratio_a, 10))
        coeff_b = np.exp(alpha * min(np.exp(train_a - train_b) - ratio_b, 10))
        train_a = train_a * (iteration - 1) / iteration + score["a"].item() / iteration
        train_b = train_b * (iteration - 1) / iteration + score["b"].item() / iteration
        if starts <= epoch + 1 <= ends:
            model.scale = {"a": coeff_a, "b": coeff_b}
        loss.backward()
        g = net.head.weight.grad
        clipped = bool(g.max() > 1 or g.min() < -1)
        if clipped:
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        opt.step()
        seen.append({"scale": dict(model.scale), "score": {m: v.item() for m, v in score.items()}, "clipped": clipped})
    return seen


@pytest.mark.parametrize("features,batch_norm", [(0.2, False), (30.0, False), (0.2, True)],
                         ids=["unclipped", "clipped", "batch_norm"])
def test_agm_follows_the_original_update(tiny_records, features, batch_norm):
    """Three steps, the window the first epoch only (their 1 to 1): the scales set at the first two steps, kept at
    the third; with the encoders' outputs 30 times larger the head's gradient leaves [-1, 1] and is clipped, 5 times
    smaller it stays inside. With BatchNorm in the encoders, the zeroed passes read the running statistics the full
    pass has just moved, and no gradient flows through them (PyTorch's buffers)."""
    def louder(params):
        return {**params, **{f"encoders_{m}": {**params[f"encoders_{m}"], "out": jax.tree_util.tree_map(
            lambda w: w * features, params[f"encoders_{m}"]["out"])} for m in INPUTS}}

    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "agm", alpha=1.0, modulation_starts=0, modulation_ends=0)
        if batch_norm:
            with cfg.unlocked():
                for m in INPUTS:
                    cfg.model.encoders[m].norm = "batch"
        first, batches, state, metrics = run_steps(cfg, edit=louder)
    net = to_torch(first, batch_norm=batch_norm)
    seen = agm_loop(net, batches, alpha=1.0, starts=1, ends=1)
    assert_same_params(net, state.params)
    if batch_norm:
        for m in INPUTS:
            bn, stats = net.enc[m][1], state.model_state["batch_stats"][f"encoders_{m}"]["norm_0"]
            np.testing.assert_allclose(np.asarray(stats["mean"]), bn.running_mean.numpy(), rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(np.asarray(stats["var"]), bn.running_var.numpy(), rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(np.asarray(state.params[f"encoders_{m}"]["norm_0"]["scale"]),
                                       bn.weight.detach().numpy(), rtol=1e-10, atol=1e-13)
    for m, s in zip(metrics, seen):
        for mod in INPUTS:
            np.testing.assert_allclose(m[f"agm_coeff/{mod}"], s["scale"][mod], rtol=1e-10)
            np.testing.assert_allclose(m[f"agm_score/{mod}"], s["score"][mod], rtol=1e-10)
    first_scores = seen[0]["score"]  # at the first step the running scores are 0: r(t) = 1
    assert seen[0]["scale"]["a"] == pytest.approx(np.exp(1 - np.exp(first_scores["b"] - first_scores["a"])), rel=1e-10)
    assert abs(seen[1]["scale"]["a"] - 1) > 1e-3 and seen[2]["scale"] == seen[1]["scale"]  # kept after the window
    assert [s["clipped"] for s in seen] == [features > 1] * 3
    np.testing.assert_allclose(np.asarray(state.method_state["scale"]), [seen[1]["scale"]["a"], seen[1]["scale"]["b"]])


def test_agm_contributions_are_shapley_values_and_sum_to_the_full_pass():
    """The weights against the Shapley formula by enumeration (three modalities: their UR-Funny thirds and
    sixths), each contribution's weights summing to f(all) over the modalities with the empty set left out."""
    from dyngap_jax.methods import agm

    plan = agm.shapley_weights(3)
    assert plan[0][0] == (0, 1, 2) and len(plan) == 7
    w = {s: ws for s, ws in plan}
    # theirs for audio (index 0): (f(avt) - f(vt) + f(a)) / 3 + (f(at) - f(v) + f(av) - f(t)) / 6
    expected = {(0, 1, 2): 1 / 3, (1, 2): -1 / 3, (0,): 1 / 3, (0, 2): 1 / 6, (1,): -1 / 6, (0, 1): 1 / 6, (2,): -1 / 6}
    assert {s: pytest.approx(ws[0]) for s, ws in w.items()} == expected
    for s, ws in w.items():  # sum over modalities: f(all) once, every other subset cancels
        assert sum(ws.values()) == pytest.approx(1.0 if s == (0, 1, 2) else 0.0, abs=1e-12)
    k = agm.coefficients(jnp.asarray([1.0, 2.0]), jnp.asarray([1.5, 1.5]), 0.5, 10.0)
    np.testing.assert_allclose(k, [np.exp(0.5 * (1 - np.exp(1.0))), np.exp(0.5 * (1 - np.exp(-1.0)))], rtol=1e-6)
    np.testing.assert_allclose(agm.coefficients(jnp.asarray([30.0, 0.0]), jnp.asarray([0.0, 30.0]), 1.0, 10.0)[0],
                               np.exp(10.0), rtol=1e-6)  # the cap


# ---- PMR (fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py)

def pmr_loop(net: Net, batches, protos, alpha, starts, ends):
    """Their step with ``--modulation Proto``: ``sim = -EU_dist(feature, prototypes)`` (a dot of differences, then
    its square root), the summed true-class softmax scores, ``ratio = score_a / score_b``, the hard switch, ``loss =
    CE(out) + beta PCE_a + lam PCE_b`` inside the window, SGD."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    seen = []
    for x, y, epoch, _ in batches:
        opt.zero_grad()
        f, out = net(x)
        sim = {m: -torch.stack([torch.stack([torch.sqrt(torch.dot(f[m][i] - protos[m][j], f[m][i] - protos[m][j]))
                                             for j in range(CLASSES)]) for i in range(len(y))]) for m in INPUTS}
        score = {m: sum(F.softmax(sim[m], dim=1)[i][y[i]] for i in range(len(y))) for m in INPUTS}
        ratio = score["a"] / score["b"]
        beta, lam = (0.0, alpha) if ratio > 1 else (alpha, 0.0) if ratio < 1 else (0.0, 0.0)
        loss = F.cross_entropy(out, y)
        if starts <= epoch <= ends:
            loss = loss + beta * F.cross_entropy(sim["a"], y) + lam * F.cross_entropy(sim["b"], y)
        else:
            beta = lam = 0.0
        loss.backward()
        opt.step()
        seen.append({"ratio": ratio.item(), "a": beta, "b": lam})
    return seen


def test_pmr_follows_the_original_update(tiny_records):
    """Three steps from given prototypes, the window the first epoch: the weaker modality's prototype loss at the
    first two steps, none at the third."""
    rng = np.random.default_rng(3)
    protos = {m: rng.standard_normal((CLASSES, FEATURES)) for m in INPUTS}
    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "pmr", alpha=2.0, modulation_starts=0, modulation_ends=0)
        first, batches, state, metrics = run_steps(
            cfg, method_state={"prototypes": {m: jnp.asarray(p) for m, p in protos.items()}})
    net = to_torch(first)
    seen = pmr_loop(net, batches, {m: torch.from_numpy(p) for m, p in protos.items()}, 2.0, 0, 0)
    assert_same_params(net, state.params)
    for m, s in zip(metrics, seen):
        np.testing.assert_allclose(m["pmr_ratio"], s["ratio"], rtol=1e-10)
        assert (m["pmr_weight/a"], m["pmr_weight/b"]) == (s["a"], s["b"])
    assert all(max(s["a"], s["b"]) == 2.0 for s in seen[:2]) and seen[2]["a"] == seen[2]["b"] == 0.0


def test_pmr_prototypes_are_class_means_in_evaluation_mode_averaged_from_the_third_epoch(tiny_records):
    """The part's prototypes against class means of the PyTorch model's features over the same batch (the first
    of the prototype pass's shuffle: 3 steps an epoch, one batch), the second epoch's fresh, the third's averaged."""
    from dyngap_jax.methods.pmr import PROTO_LOADER_EPOCH, Prototypes

    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "pmr", proto_momentum=0.25)
        with cfg.unlocked():
            cfg.train.batch_size = 16
        run = setup(cfg)
        part = Prototypes(run.method)
        state = run.create_train_state()
        part.open(run, state, None)
        assert part.batches() == 1
        seen, expected = [], []
        for epoch in range(3):
            params = jax.tree_util.tree_map(lambda w, e=epoch: w * (1 + 0.1 * e), state.params)  # training moved it
            state = part.epoch_start(state.replace(params=params), epoch)
            seen.append({m: np.asarray(v) for m, v in state.method_state["prototypes"].items()})
            batch = run.prepare_batch(next(iter(run.loader("train", train=True, epoch=PROTO_LOADER_EPOCH + epoch))))
            with torch.no_grad():
                f, _ = to_torch(params).eval()({m: torch.from_numpy(np.asarray(batch[m], np.float64)) for m in INPUTS})
            y = np.asarray(batch["label"])
            assert set(y) == {0, 1, 2}
            expected.append({m: np.stack([f[m].numpy()[y == c].mean(0) for c in range(CLASSES)]) for m in INPUTS})
        assert part.made_for == 2 and part.to_json() == {"made_for": 2}
        assert part.epoch_start(state, 2) is state  # resumed inside the epoch: the checkpoint's prototypes stay
    for m in INPUTS:
        np.testing.assert_allclose(seen[0][m], expected[0][m], rtol=1e-10)
        np.testing.assert_allclose(seen[1][m], expected[1][m], rtol=1e-10)  # not averaged (their epoch-0 call)
        np.testing.assert_allclose(seen[2][m], 0.75 * expected[2][m] + 0.25 * seen[1][m], rtol=1e-10)


def test_pmr_refuses_three_modalities_and_bad_options(tiny_records):
    from configs import cremad, nvgesture

    with pytest.raises(ConfigError, match=r"'pmr' takes 2 modalities; config.model.modalities is \['rgb', 'depth'"):
        validate(nvgesture.get_config("pmr"))
    cfg = cremad.get_config("pmr")
    assert (cfg.balance.options.alpha, cfg.balance.options.proto_momentum) == (2.0, 0.0)  # their CREMA-D runs
    with cfg.unlocked():
        cfg.balance.options.proto_momentum = 1.0
    with pytest.raises(ConfigError, match=r"config\.balance\.options: pmr: `proto_momentum` must be in \[0, 1\)"):
        validate(cfg)


# ---- MLA (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, main.py --gs_flag, utils/utils.py)

class SharedNet(torch.nn.Module):
    """The tiny model with their shared head: the encoders of :class:`Net` and one ``Linear(FEATURES, CLASSES)``."""

    def __init__(self, params):
        super().__init__()
        self.enc = Net().double().enc
        self.head = torch.nn.Linear(FEATURES, CLASSES).double()
        t = lambda x: torch.from_numpy(np.array(x, np.float64))
        with torch.no_grad():
            for m in INPUTS:
                for layer, name in ((self.enc[m][0], "dense_0"), (self.enc[m][-1], "out")):
                    layer.weight.copy_(t(params[f"encoders_{m}"][name]["kernel"]).T)
                    layer.bias.copy_(t(params[f"encoders_{m}"][name]["bias"]))
            self.head.weight.copy_(torch.from_numpy(np.array(params["fusion"]["head"]["kernel"], np.float64)).T)
            self.head.bias.copy_(torch.from_numpy(np.array(params["fusion"]["head"]["bias"], np.float64)))


def mla_loop(net: SharedNet, batches, projection: bool, steps_per_epoch=2):
    """Their batch: one forward of both encoders; for a then b the head's cross-entropy on that modality's features,
    its backward, (first commit) ``before_update`` on the head's weight gradient, SGD's step, ``zero_grad`` to
    None (a parameter without a gradient is skipped: PyTorch 2's default and their ``del p.grad``; the 1.8.1 they
    pin zeroes instead, which the port does not follow, see mla.py)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    P, count = torch.eye(FEATURES, dtype=torch.float64), 0
    losses_seen = []
    for b, (x, y, _, _) in enumerate(batches):
        f = {m: net.enc[m](x[m]) for m in INPUTS}
        for m in INPUTS:
            loss = F.cross_entropy(net.head(f[m]), y)
            loss.backward()
            if projection and count != 0:  # GSPlugin.before_update as 4735bbc has it
                alpha = 1.0 * 0.1 ** ((b % steps_per_epoch) / steps_per_epoch + 1)
                r = torch.mean(f[m].detach(), 0, True)
                k = torch.mm(P, torch.t(r))
                P = torch.sub(P, torch.mm(k, torch.t(k)) / (alpha + torch.mm(k, r)))
                P = P / torch.norm(P, p="fro")
                net.head.weight.grad = torch.mm(net.head.weight.grad, torch.t(P))
            opt.step()
            opt.zero_grad(set_to_none=True)
            count += 1
            losses_seen.append(loss.item())
    return losses_seen, P


@pytest.mark.parametrize("projection", ["none", "first_commit"])
def test_mla_follows_the_original_update(tiny_records, projection):
    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "mla", projection=projection)
        assert dict(cfg.model.fusion) == {"name": "shared"}
        first, batches, state, metrics = run_steps(cfg)
    # the projection divides element by element by (a + k r), some entries small: rounding reaches 1e-11 absolute
    ATOL = 1e-11 if projection == "first_commit" else 1e-13
    net = SharedNet(first)
    seen, P = mla_loop(net, batches, projection == "first_commit")
    n = lambda t: t.detach().numpy()
    for m in INPUTS:
        for layer, name in ((net.enc[m][0], "dense_0"), (net.enc[m][-1], "out")):
            np.testing.assert_allclose(np.asarray(state.params[f"encoders_{m}"][name]["kernel"]), n(layer.weight).T,
                                       rtol=1e-10, atol=ATOL)
    np.testing.assert_allclose(np.asarray(state.params["fusion"]["head"]["kernel"]), n(net.head.weight).T, rtol=1e-10,
                               atol=ATOL)
    np.testing.assert_allclose(np.asarray(state.params["fusion"]["head"]["bias"]), n(net.head.bias), rtol=1e-10,
                               atol=ATOL)
    np.testing.assert_allclose([[m["mla_loss/a"], m["mla_loss/b"]] for m in metrics], np.reshape(seen, (3, 2)),
                               rtol=1e-10)
    if projection == "first_commit":
        assert int(state.method_state["count"]) == 6
        # P is renormalised after each element-wise division by (a + k r), whose small entries amplify rounding:
        # equal to 1e-7 of its largest entry (a wrong update differs in the leading digits)
        np.testing.assert_allclose(np.asarray(state.method_state["P"]), n(P), rtol=0, atol=1e-7 * np.abs(n(P)).max())
        assert np.abs(n(P) - np.eye(FEATURES) / np.sqrt(FEATURES)).max() > 1e-3  # it moved from the identity


def test_mla_fuses_by_each_examples_entropy_or_fixed_weights():
    from dyngap_jax.methods import mla

    rng = np.random.default_rng(4)
    za, zb = rng.standard_normal((5, 3)) * 3, rng.standard_normal((5, 3))
    p = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    e = np.stack([-(p(z) * np.log(p(z))).sum(1) for z in (za, zb)])
    w = np.exp(e.max(0) - e) / np.exp(e.max(0) - e).sum(0)
    np.testing.assert_allclose(mla.entropy_weights([jnp.asarray(za), jnp.asarray(zb)]), w, rtol=1e-5)
    np.testing.assert_allclose(w[0], 1 / (1 + np.exp(e[0] - e[1])), rtol=1e-10)  # two modalities: a sigmoid

    class Cfg:
        class model:
            modalities = ("a", "b")

    outputs = {"modality_logits": {"a": jnp.asarray(za), "b": jnp.asarray(zb)}}
    fixed = mla.MLA(Cfg, None, mla.MLAOptions(fusion="fixed")).fuse(outputs, None)
    np.testing.assert_allclose(fixed, 0.55 * za + 0.45 * zb, rtol=1e-5, atol=1e-6)
    dynamic = mla.MLA(Cfg, None).fuse(outputs, None)
    np.testing.assert_allclose(dynamic, w[0][:, None] * za + w[1][:, None] * zb, rtol=1e-5, atol=1e-6)  # float32


def test_mla_needs_the_shared_head_of_one_width(tiny_records):
    cfg = tiny_config(tiny_records, "mla")
    with cfg.unlocked():
        cfg.model.fusion = {"name": "concat"}
    with pytest.raises(ConfigError, match=r"config\.model\.fusion\.name: 'mla' trains one head shared"):
        validate(cfg)
    cfg = tiny_config(tiny_records, "mla")
    with cfg.unlocked():
        cfg.model.encoders.b.out_features = 4
    with pytest.raises(ValueError, match=r"config\.model\.projection_dim: encoders give features of different widths"):
        setup(cfg)
    from dyngap_jax.models.fusion import SharedFusion

    head = SharedFusion(num_classes=3, modalities=("a", "b"))
    with pytest.raises(ValueError, match=r"config\.model\.fusion: the 'shared' head takes every modality's features"):
        head.init(jax.random.PRNGKey(0), {"a": jnp.ones((2, 8)), "b": jnp.ones((2, 4))})


# ---- Gradient-Blending (the paper's online algorithm; BalanceBenchmark's GBlending_trainer.py)

def torch_heads(net: Net, x):
    """``[fused, a, b]`` logits of the tiny model with its unimodal heads."""
    f, out = net(x)
    return [out] + [net.heads[m](f[m]) for m in INPUTS]


def test_gblending_weights_from_copies_trained_on_each_head(tiny_records):
    """The estimate before the first epoch against PyTorch: for each head a copy of the model trained on that head's
    loss alone for two epochs (fresh SGD, the same batches), the mean training losses of the two epochs and the
    validation losses after each, ``|G / O^2|`` normalised (computed here in NumPy from the PyTorch losses)."""
    from dyngap_jax.methods.gblending import Blend

    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "gblending", super_epoch=2)
        assert dict(cfg.model.fusion) == {"name": "concat", "unimodal_heads": True}
        run = setup(cfg)
        state = run.create_train_state()
        first = jax.tree_util.tree_map(np.asarray, state.params)
        part = Blend(run.method)
        part.open(run, state, None)
        state = part.epoch_start(state, 0)
        weights = np.asarray(state.method_state["weights"])
        as_torch = lambda b: ({m: torch.from_numpy(np.asarray(b[m], np.float64)) for m in INPUTS},
                              torch.from_numpy(np.asarray(b["label"], np.int64)))
        epochs = [[as_torch(run.prepare_batch(b)) for b in run.loader("train", train=True, epoch=e)] for e in range(2)]
        val = [as_torch(run.prepare_batch(b)) for b in run.loader("validation", train=False)]
    four = np.zeros((4, 3))
    for k in range(3):
        net = to_torch(first, unimodal_heads=True)
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
        for e, batches in enumerate(epochs):
            seen = []
            for x, y in batches:
                opt.zero_grad()
                loss = F.cross_entropy(torch_heads(net, x)[k], y)
                loss.backward()
                opt.step()
                seen.append(loss.item())
            with torch.no_grad():
                v = torch.cat([F.cross_entropy(torch_heads(net, x)[k], y, reduction="none") for x, y in val]).mean()
            four[e, k], four[2 + e, k] = np.mean(seen), v.item()
    g = four[2] - four[3]
    o = (four[3] - four[1]) - (four[2] - four[0])
    expected = np.abs(g / o**2) / np.abs(g / o**2).sum()
    np.testing.assert_allclose(np.asarray(part.estimates[0]["losses"]), four, rtol=1e-9)
    np.testing.assert_allclose(weights, expected, rtol=1e-8)
    assert weights.std() > 0.01  # not the equal weights it starts from
    assert part.epoch_start(state, 1) is state and part.epoch_start(state, 0) is state  # between estimates; resumed


def test_gblending_step_weights_the_heads_losses(tiny_records):
    w = np.asarray([0.5, 0.2, 0.3])
    with jax.enable_x64(True):
        cfg = balance_config(tiny_records, "gblending")
        first, batches, state, metrics = run_steps(cfg, method_state={"weights": jnp.asarray(w)})
    net = to_torch(first, unimodal_heads=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    for x, y, _, _ in batches:
        opt.zero_grad()
        sum(wk * F.cross_entropy(z, y) for wk, z in zip(w, torch_heads(net, x))).backward()
        opt.step()
    assert_same_params(net, state.params)
    assert metrics[0]["blend_weight/b"] == 0.3
