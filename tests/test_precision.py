"""Precision is the config's, never the backend's default: every dot and convolution the alpha step (HVPs,
the Krylov solve, the cross term) and the train step lower to carries the configured precision.

Checked on the lowered StableHLO, so it holds on any device: on an NVIDIA GPU "default" means TF32 for
float32 matmuls and convolutions (relative error ~3e-4), which an exact solve must not inherit.
"""
import re

import jax
import numpy as np
import pytest

from configs import _base
from dyngap_jax.train import setup


def image_config(precision, train_precision="default", conv=True):
    """A ResNet18 image view (convolutions: the stem, basic blocks, a downsampling shortcut; one block a stage,
    narrow, so that lowering it is quick) beside an MLP view; ``conv=False``: an MLP on the images' pixels."""
    c = _base.base("tinyimg", "/nonexistent")
    image = ({"name": "resnet18", "depths": [1, 1], "hidden_sizes": [4, 8], "embedding_size": 4} if conv
             else {"name": "mlp", "hidden": [8], "out_features": 8, "in_features": 768})
    c.model = {"num_classes": 3, "modalities": ["img", "vec"], "projection_dim": 8,
               "encoders": {"img": image,
                            "vec": {"name": "mlp", "hidden": [8], "out_features": 8, "in_features": 5, "dropout": 0.1}},
               "fusion": {"name": "concat"}}
    c.train.update({"num_epochs": 1, "batch_size": 4, "learning_rate": 0.1, "matmul_precision": train_precision})
    c = _base.apply_method(c, "ours_lb")
    c.alpha.hypergrad.precision = precision
    return c


def batch(n=4, conv=True):
    rng = np.random.default_rng(0)
    return {"img": rng.standard_normal((n, 16, 16, 3) if conv else (n, 768)).astype(np.float32),
            "vec": rng.standard_normal((n, 5)).astype(np.float32), "label": np.arange(n, dtype=np.int32) % 3}


def ops(text):
    """``(op, its operands' precisions as "A, B", result type)`` of every dot_general and convolution in a lowering."""
    found = []
    for line in text.splitlines():
        m = re.search(r"stablehlo\.(dot_general|convolution)", line)
        if m:
            attr = re.search(r"precision(?:_config)? = \[([^\]]*)\]", line)
            prec = ", ".join(re.findall(r"\b(DEFAULT|HIGHEST|HIGH)\b", attr.group(1))) if attr else ""
            found.append((m.group(1), prec, line.rsplit("->", 1)[-1]))
    return found


@pytest.fixture(scope="module")
def lowered():
    """Lowered alpha and train steps for each precision (one model: compiling is not needed)."""
    out = {}
    for precision in ("highest", "default", "float64"):
        conv = precision != "default"  # lowering HVPs through a ResNet takes a while: twice is enough
        run = setup(image_config(precision, train_precision="highest" if precision == "default" else "default",
                                 conv=conv), data=False, example=batch(2, conv))
        state = run.create_train_state(jax.random.PRNGKey(0))
        train_step, _, alpha_step = run.compile_steps(state, donate=False)
        b = batch(4, conv)
        out[precision] = (ops(alpha_step.lower(state, b, b).as_text()),
                          ops(train_step.lower(state, b).as_text()))
    return out


@pytest.mark.parametrize("precision,expected", [("highest", "HIGHEST, HIGHEST"), ("default", "DEFAULT, DEFAULT"),
                                                ("float64", "HIGHEST, HIGHEST")])
def test_every_dot_and_convolution_of_the_alpha_step_has_the_configured_precision(lowered, precision, expected):
    alpha_ops, _ = lowered[precision]
    kinds = {op for op, _, _ in alpha_ops}
    assert kinds == ({"dot_general"} if precision == "default" else {"dot_general", "convolution"}), kinds
    assert len(alpha_ops) > 50
    # the Krylov solvers' inner products (optax's tree_vdot: vector x vector -> scalar) are always HIGHEST
    scalar = lambda result: re.search(r"tensor<f(32|64)>", result) is not None
    wrong = [(op, prec, r) for op, prec, r in alpha_ops if prec != ("HIGHEST, HIGHEST" if scalar(r) else expected)]
    assert wrong == [], wrong[:5]
    assert sum(not scalar(r) for _, _, r in alpha_ops) > 50
    if precision == "float64":  # the model and the solve in float64: no float32 product anywhere
        assert all("f64" in result and "f32" not in result for _, _, result in alpha_ops)
    else:
        assert all("f32" in result for _, _, result in alpha_ops)


def test_the_train_step_has_its_own_precision(lowered):
    # config.train.matmul_precision, independent of the alpha step's
    for precision, expected in (("highest", "DEFAULT, DEFAULT"), ("default", "HIGHEST, HIGHEST")):
        _, train_ops = lowered[precision]
        assert train_ops and {prec for _, prec, _ in train_ops} == {expected}


def test_a_float64_alpha_step_updates_a_float32_state():
    cfg = image_config("float64", conv=False)
    cfg.alpha.hypergrad.warm_start = True  # the kept solution goes back to float32
    run = setup(cfg, data=False, example=batch(2, False))
    state = run.create_train_state(jax.random.PRNGKey(0))
    _, _, alpha_step = run.compile_steps(state, donate=False)
    new, res, applied = alpha_step(state, batch(4, False), batch(4, False))
    assert new.alpha.value.dtype == state.alpha.value.dtype == np.float32
    assert res.info["residual"].dtype == np.float64
    leaves = jax.tree_util.tree_leaves(new.alpha_solution)
    assert leaves and all(x.dtype == np.float32 for x in leaves)
    assert bool(res.info["converged"]) == bool(applied)


def test_bfloat16_compute_keeps_float32_parameters_losses_and_a_float32_alpha_step():
    """config.train.compute_dtype=bfloat16: every matmul and convolution of the model (encoders, projections,
    fusion head) runs in bfloat16 on float32 parameters; the state, the losses and the gradients stay
    float32; the alpha step keeps its own (float32, highest) precision."""
    cfg = image_config("highest")
    cfg.train.compute_dtype = "bfloat16"
    run = setup(cfg, data=False, example=batch(2))
    state = run.create_train_state(jax.random.PRNGKey(0))
    b = batch(4)
    variables = {"params": state.params, **state.model_state}
    model_ops = ops(jax.jit(lambda v, x: run.compute_model.apply(v, x, train=False)).lower(variables, b).as_text())
    assert len(model_ops) >= 12 and all("bf16" in result for _, _, result in model_ops), \
        [o for o in model_ops if "bf16" not in o[2]][:3]
    train_step, eval_step, alpha_step = run.compile_steps(state, donate=False)
    train_ops = ops(train_step.lower(state, b).as_text())
    # the only float32 products of the train step are the InfoNCE similarities of the float32 features ([B, B])
    assert {result for _, _, result in train_ops if "bf16" not in result} <= {" tensor<4x4xf32>", " tensor<4x8xf32>"}
    assert sum("bf16" in result for _, _, result in train_ops) >= 30  # forward and backward of every layer
    alpha_ops = ops(alpha_step.lower(state, b, b).as_text())
    assert alpha_ops and all("f32" in result and "bf16" not in result for _, _, result in alpha_ops)
    new, m = train_step(state, b)
    leaves = jax.tree_util.tree_leaves((new.params, new.opt_state, new.model_state))
    assert leaves and all(x.dtype == np.float32 for x in leaves if np.issubdtype(x.dtype, np.floating))
    assert m["loss"].dtype == np.float32 and bool(m["finite"]) and bool(m["params_finite"])
    out = eval_step(state, b)
    assert np.asarray(out["logits"]).dtype == np.float32 and np.asarray(out["features"]["img"]).dtype == np.float32
    # the same step in float32 computes nearly the same loss (bfloat16 keeps 8 bits of mantissa)
    run32 = setup(image_config("highest"), data=False, example=batch(2))
    _, m32 = run32.compile_steps(state, donate=False)[0](state, b)
    np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=3e-2)
    assert float(m["loss"]) != float(m32["loss"])


def test_a_refined_alpha_step_iterates_at_the_reduced_precision_and_checks_at_highest():
    """alpha.hypergrad.precision='refined': the step at highest, its CG's HVPs at the reduced precision."""
    cfg = image_config("refined", conv=False)
    run = setup(cfg, data=False, example=batch(2, False))
    assert run.cfg.precision.alpha_matmul == "highest" and run.method.estimator.krylov_precision == "default"
    state = run.create_train_state(jax.random.PRNGKey(0))
    _, _, alpha_step = run.compile_steps(state, donate=False)
    found = [prec for _, prec, r in ops(alpha_step.lower(state, batch(4, False), batch(4, False)).as_text())
             if not re.search(r"tensor<f(32|64)>", r)]
    assert found.count("DEFAULT, DEFAULT") > 20 and found.count("HIGHEST, HIGHEST") > 20, set(found)
    for bad, match in ((("method", "minres"), "refines a CG"), (("options", {"scalar_tol": 0.1}), "scalar_tol")):
        c = image_config("refined", conv=False)
        setattr(c.alpha.hypergrad, *bad) if bad[0] == "method" else c.alpha.hypergrad.options.update(bad[1])
        with pytest.raises(ValueError, match=match):
            setup(c, data=False, example=batch(2, False))
    c = image_config("float64", conv=False)  # a float32 precision inside a float64 step is refused by name
    c.alpha.hypergrad.options.krylov_precision = "default"
    with pytest.raises(ValueError, match="krylov_precision.*float64"):
        setup(c, data=False, example=batch(2, False))
