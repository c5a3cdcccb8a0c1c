"""Alpha strategies: values at given epochs, and the learned update (Algorithm 1's alpha step)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dyngap_jax import alpha


def test_heuristic_values():
    for t in (1, 2, 5, 100):
        np.testing.assert_allclose(alpha.heuristic(t), 1 - math.exp(-1 / t), rtol=1e-6)
    np.testing.assert_allclose(alpha.heuristic(1), 0.6321205588, rtol=1e-6)
    with pytest.raises(ValueError, match="epoch"):
        alpha.heuristic(0)


def test_stepwise_halves():
    # 10 epochs: epochs 1..5 are the first half, 6..10 the second
    vals = [float(alpha.stepwise(0.05, e, 10)) for e in range(1, 11)]
    np.testing.assert_allclose(vals, [0.05] * 5 + [0.95] * 5, rtol=1e-6)
    # odd count: epoch 3 of 5 is still "less than half" in 0-based terms (2 < 2.5)
    assert [float(alpha.stepwise(1.0, e, 5)) for e in range(1, 6)] == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="p"):
        alpha.stepwise(1.5, 1, 10)


def test_authors_variants():
    for t in (0, 1, 3, 10, 20):
        np.testing.assert_allclose(alpha.authors_exp(t), min(max(math.exp(-0.3 * t), 0.05), 0.95), rtol=1e-6)
    epochs = np.arange(1, 31, dtype=float)
    traj = 0.9 * np.exp(-epochs / 10) + 0.05
    coeffs = alpha.fit_polynomial(epochs, traj, degree=5)
    np.testing.assert_allclose(alpha.polynomial(epochs, coeffs), np.polyval(coeffs, epochs), rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(np.asarray(alpha.polynomial(epochs, coeffs)) - traj)) < 0.01
    with pytest.raises(ValueError, match="more than 5 points"):
        alpha.fit_polynomial([1, 2, 3], [0.1, 0.2, 0.3])


def test_fixed_strategy_specs():
    assert float(alpha.fixed_strategy("constant:0.5")(3, 10)) == 0.5
    assert float(alpha.fixed_strategy("stepwise:0.05")(8, 10)) == pytest.approx(0.95)
    assert float(alpha.fixed_strategy("heuristic")(2, 10)) == pytest.approx(1 - math.exp(-0.5))
    with pytest.raises(ValueError, match="known"):
        alpha.fixed_strategy("cosine")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        alpha.fixed_strategy("constant:1.5")


def test_learned_update_steps_and_clips():
    learned = alpha.LearnedAlpha(init=0.5, learning_rate=0.1)
    state = learned.create()
    state = learned.update(state, 2.0)  # 0.5 - 0.1 * 2
    np.testing.assert_allclose(state.value, 0.3, rtol=1e-6)
    state = learned.update(state, 10.0)  # 0.3 - 1 -> clipped to 0
    assert float(state.value) == 0.0
    state = learned.update(state, -100.0)  # -> clipped to 1
    assert float(state.value) == 1.0
    assert int(state.updates) == 3 and int(state.skipped) == 0


def test_learned_authors_settings_and_schedule():
    sched = alpha.authors_lr_schedule()
    np.testing.assert_allclose([sched(0), sched(19), sched(20), sched(40)], [1e-4, 1e-4, 5e-5, 2.5e-5], rtol=1e-6)
    learned = alpha.LearnedAlpha(init=0.95, learning_rate=sched, clip=(0.05, 0.95))
    state = learned.create()
    state = learned.update(state, -1.0)  # would go above 0.95
    np.testing.assert_allclose(state.value, 0.95)
    for _ in range(25):
        state = learned.update(state, 100.0)
    # the first update used step 0; steps 1..19 move 1e-4 * 100 = 0.01 each, steps 20..25 0.005
    np.testing.assert_allclose(state.value, 0.95 - 19 * 0.01 - 6 * 0.005, rtol=1e-5)


def test_learned_vector_and_jit_and_nonfinite():
    learned = alpha.LearnedAlpha(init=0.5, learning_rate=0.1, num_pairs=3)
    state = learned.create()
    assert state.value.shape == (3,)
    step = jax.jit(learned.update)
    state = step(state, jnp.asarray([1.0, -1.0, 10.0]))
    np.testing.assert_allclose(state.value, [0.4, 0.6, 0.0], rtol=1e-6)
    state2 = step(state, jnp.asarray([jnp.nan, 0.0, 0.0]))
    np.testing.assert_allclose(state2.value, state.value)
    assert int(state2.skipped) == 1 and int(state2.updates) == 1
    with pytest.raises(ValueError, match="hypergradient"):
        learned.update(state, 1.0)


def test_learned_config_errors():
    with pytest.raises(ValueError, match="clip"):
        alpha.LearnedAlpha(clip=(0.5, 0.2))
    with pytest.raises(ValueError, match="init"):
        alpha.LearnedAlpha(init=0.99, clip=(0.05, 0.95))
    with pytest.raises(ValueError, match="optimizer"):
        alpha.LearnedAlpha(optimizer="lbfgs")
    adam = alpha.LearnedAlpha(init=0.5, learning_rate=0.01, optimizer="adam")
    s = adam.update(adam.create(), 5.0)
    np.testing.assert_allclose(s.value, 0.49, rtol=1e-5)  # Adam's first step has size lr
    assert isinstance(adam._tx(), optax.GradientTransformation)


def test_a_float64_alpha_keeps_updates_below_float32_spacing_as_the_authors_python_float_does():
    """The authors' alpha is a Python double moved by 1e-4 x a hypergradient: near 0.95 (float32 spacing
    6e-8) most of those steps vanish in float32; kept as a pair of float32s they add up as in double."""
    sched = alpha.authors_lr_schedule()
    grads = 3e-4 * np.cos(np.arange(60) / 7.0) - 1e-4  # steps of ~1e-8: below float32's spacing at 0.95
    kept, lost = (alpha.LearnedAlpha(init=0.9, learning_rate=sched, clip=(0.05, 0.95), precision=p)
                  for p in ("float64", "float32"))
    s64, s32 = kept.create(), lost.create()
    step64, step32 = jax.jit(kept.update), jax.jit(lost.update)
    ref, lr = 0.9, 1e-4
    for epoch, g in enumerate(grads):  # their getAlpha_Learnable, in Python floats
        if epoch % 20 == 0 and epoch != 0:
            lr = lr / 2
        ref = max(0.05, min(0.95, ref - lr * float(np.float32(g))))
        s64, s32 = step64(s64, jnp.float32(g)), step32(s32, jnp.float32(g))
    assert abs(float(s64.exact()) - ref) < 1e-12
    assert abs(float(s32.exact()) - ref) > 1e-8  # the float32 alpha lost most of the steps' sum
    assert s64.value.dtype == np.float32 and abs(float(s64.value) - ref) < 6e-8  # the train step reads the float32
    with pytest.raises(ValueError, match="precision"):
        alpha.LearnedAlpha(precision="float16")


def test_the_authors_learning_rate_is_a_double_where_alpha_is_one():
    """Under JAX's 64-bit mode alpha is a double and so is its rate: 1e-4 exactly, halved every 20 epochs (as their
    Python float), not float32's 9.999999747e-05 (optax's exponential_decay on its int32 step count)."""
    with jax.enable_x64(True):
        sched = alpha.authors_lr_schedule(3)
        assert [float(sched(jnp.asarray(c, jnp.int32))) for c in (0, 59, 60, 120)] == [1e-4, 1e-4, 5e-5, 2.5e-5]
        learned = alpha.LearnedAlpha(init=0.5, learning_rate=sched, clip=(0.05, 0.95), precision="float64")
        g = 0.0123456789
        s = learned.update(learned.create(), jnp.asarray(g, jnp.float64))
        assert float(s.exact()) == 0.5 - 1e-4 * g  # the authors' cls_k[1] -= lr_alpha * alpha_grad, bit for bit
    assert sched(0).dtype == jnp.float32  # outside the 64-bit mode the default float, as alpha's


@pytest.mark.parametrize("rate", ["authors", 3e-4])
def test_a_float32_pair_alpha_takes_each_step_at_its_double_rate(rate):
    """Without the 64-bit mode a float64 alpha is a pair of float32s; each SGD step -eta g is added exactly, eta at
    its double value (1e-4, not float32's 9.999999747e-05) and the product with g exact: 60 steps of ~1e-4 follow
    the authors' Python doubles to 1e-13 (a float32 rate and a float32 step would be ~1e-10 off)."""
    sched = alpha.authors_lr_schedule() if rate == "authors" else rate
    kept = alpha.LearnedAlpha(init=0.5, learning_rate=sched, clip=(0.05, 0.95), precision="float64")
    step = jax.jit(kept.update)
    s = kept.create()
    assert s.low is not None and s.value.dtype == np.float32
    grads = (np.cos(np.arange(60) / 3.0) + 0.3).astype(np.float32)
    ref, lr = 0.5, 1e-4 if rate == "authors" else rate
    for epoch, g in enumerate(grads):
        if rate == "authors" and epoch % 20 == 0 and epoch != 0:
            lr = lr / 2
        ref = max(0.05, min(0.95, ref - lr * float(g)))
        s = step(s, jnp.float32(g))
    assert abs(float(s.exact()) - ref) < 1e-13
    lost = alpha.LearnedAlpha(init=0.5, learning_rate=sched, clip=(0.05, 0.95))
    s32 = lost.create()
    for g in grads:
        s32 = lost.update(s32, jnp.float32(g))
    assert abs(float(s32.exact()) - ref) > 1e-9
