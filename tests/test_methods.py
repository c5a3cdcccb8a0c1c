"""The method interface: methods written against it change the train step, keep state, fuse evaluation and work
around the step, each in one module of its own, with nothing in the loop; LFM itself runs on it."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_data import make_tiny_records, tiny_config

from dyngap_jax import methods
from dyngap_jax.methods import LFM, Part
from dyngap_jax.train import ConfigError, load_run_state, setup, summary_table, train


@methods.register
class FreezeA(LFM):
    """LFM with modality a's encoder gradients scaled by 0 (OGM-GE's kind of change, taken to its limit)."""

    name = "test_freeze_a"

    def transform_gradients(self, ctx, grads, aux):
        return methods.scale_modalities(grads, {"a": 0.0}, ctx.modalities)


@methods.register
class ZeroTerm(LFM):
    """LFM plus a loss term on the model's outputs that is identically zero."""

    name = "test_zero_term"

    def terms(self, ctx, outputs):
        return {"zero": 0.0 * jnp.sum(outputs["modality_logits"]["b"])}


@dataclasses.dataclass(frozen=True)
class CountOptions:
    substeps: int = 2
    fuse_with: str = "fused"

    def __post_init__(self):
        if self.substeps < 1:
            raise ValueError(f"`substeps` must be >= 1, got {self.substeps}")
        if self.fuse_with not in ("fused", "a", "b"):
            raise ValueError(f"`fuse_with` must be fused, a or b, got {self.fuse_with!r}")


class Counter(Part):
    """A part with host state of its own: how many train steps it has seen, saved in every checkpoint."""

    name = "counter"
    history_keys = ("seen",)

    def __init__(self):
        self.seen = 0

    def open(self, run, state, saved, *, donate=True):
        self.seen = (saved or {}).get("seen", 0)

    def after_step(self, state, info):
        self.seen += 1
        return state

    def epoch_record(self, state):
        return {"seen": self.seen}

    def to_json(self):
        return {"seen": self.seen}


@methods.register
class Several(methods.Method):
    """Plain CE, ``substeps`` optimiser steps a batch, a step count of its own in the train state, evaluation
    fused by one modality's head, and a part with host state."""

    name = "test_several"
    Options = CountOptions
    modalities = (2, 2)

    def init_state(self, params):
        return {"updates": jnp.zeros((), jnp.int32)}

    def step(self, ctx):
        state, metrics = ctx.state, None
        for _ in range(self.options.substeps):
            sub = dataclasses.replace(ctx, state=state)
            grads, aux = self.gradients(sub)
            state = self.apply_gradients(sub, state, grads, aux)
            metrics = methods.finish_metrics(aux["metrics"], grads, state)
        state = state.replace(method_state={"updates": state.method_state["updates"] + self.options.substeps})
        return state, metrics

    def fuse(self, outputs, method_state):
        return outputs["logits"] if self.options.fuse_with == "fused" else outputs["modality_logits"][self.options.fuse_with]

    def parts(self):
        return [Counter()]


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


def plain_sgd(cfg, method=None, **options):
    """No momentum, no weight decay, a constant rate: a zero gradient leaves a parameter where it is."""
    with cfg.unlocked():
        cfg.train.update({"momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"})
        if method:
            cfg.balance.method = method
            cfg.balance.options.update(options)
    return cfg


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def test_a_method_that_scales_a_modalitys_gradients_by_zero_leaves_its_encoder_unchanged(tiny_records, tmp_path):
    cfg = plain_sgd(tiny_config(tiny_records, "ours_h"), "test_freeze_a")
    run = setup(cfg)
    start = run.create_train_state()
    train(cfg, str(tmp_path))
    _, end, _ = load_run_state(cfg, str(tmp_path), "latest")
    for before, after in zip(leaves(start.params["encoders_a"]), leaves(end.params["encoders_a"])):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    moved = [not np.array_equal(np.asarray(b), np.asarray(a))
             for b, a in zip(leaves(start.params["encoders_b"]), leaves(end.params["encoders_b"]))]
    assert all(moved)
    assert not np.array_equal(np.asarray(start.params["fusion"]["kernel"]), np.asarray(end.params["fusion"]["kernel"]))


def test_a_method_that_adds_a_zero_loss_changes_nothing(tiny_records, tmp_path):
    base = train(plain_sgd(tiny_config(tiny_records, "ours_lb")), str(tmp_path / "lfm"))
    zero = train(plain_sgd(tiny_config(tiny_records, "ours_lb"), "test_zero_term"), str(tmp_path / "zero"))
    for s in (base, zero):
        s.pop("compilations")
    zero_history = [{k: v for k, v in h.items()} for h in zero["history"]]
    assert zero_history == base["history"] and zero["best"] == base["best"]
    assert zero["final_alpha"] == base["final_alpha"] and zero["alpha_steps"] == base["alpha_steps"]
    (_, a, _), (_, b, _) = (load_run_state(None, str(tmp_path / d), "latest") for d in ("lfm", "zero"))
    for x, y in zip(leaves((a.params, a.opt_state, a.alpha)), leaves((b.params, b.opt_state, b.alpha))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_several_optimiser_steps_a_batch_state_of_its_own_a_part_and_its_fusion(tiny_records, tmp_path):
    cfg = plain_sgd(tiny_config(tiny_records, "concat", epochs=2), "test_several", substeps=2)
    summary = train(cfg, str(tmp_path / "full"))
    _, state, step = load_run_state(cfg, str(tmp_path / "full"), "latest")
    assert step == 6 and int(state.step) == 12  # 3 batches an epoch, two optimiser steps each
    assert int(state.method_state["updates"]) == 12
    assert [h["seen"] for h in summary["history"]] == [3, 6]
    # resumed from inside the second epoch: the method's state and its part's restored
    part = train(cfg, str(tmp_path / "resumed"), max_steps=4)
    assert part["stopped_at"] == 4
    resumed = train(cfg, str(tmp_path / "resumed"))
    assert [h["seen"] for h in resumed["history"]] == [3, 6]
    for h_full, h_res in zip(summary["history"], resumed["history"]):
        for k in h_full:
            np.testing.assert_allclose(h_res[k], h_full[k], rtol=1e-6, err_msg=k)
    # the end-of-run table of a method without alpha
    table = summary_table(summary, ["a", "b"])
    assert "best epoch" in table and "alpha" not in table
    # evaluation fuses as the method says: with modality b's head alone, the fused scores are b's
    with cfg.unlocked():
        cfg.balance.options.fuse_with = "b"
    by_b = train(cfg, str(tmp_path / "by_b"))
    for split in ("validation", "test"):
        assert by_b["best"][split]["acc"] == by_b["best"][split]["acc/b"]


def test_a_methods_options_and_modalities_are_checked_naming_the_field(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        cfg.balance.method = "test_several"
        cfg.balance.options.substeps = 0
    with pytest.raises(ConfigError, match=r"config\.balance\.options: test_several: `substeps` must be >= 1"):
        train(cfg, str(tmp_path / "a"))
    with cfg.unlocked():
        cfg.balance.options.substeps = None
        cfg.balance.method = "test_freeze_a"
        cfg.balance.options.fuse_with = "a"
    with pytest.raises(ConfigError, match=r"config\.balance\.options\.fuse_with: training method 'test_freeze_a' has "
                                          r"no option 'fuse_with' \(an option of test_several\)"):
        train(cfg, str(tmp_path / "b"))
    wrong_type = tiny_config(tiny_records, "concat").to_dict()
    wrong_type["balance"].update(method="test_several", options={"fuse_with": 3})
    with pytest.raises(ConfigError, match=r"config\.balance\.options\.fuse_with: test_several's option is a str, "
                                          r"got 3"):
        train(wrong_type, str(tmp_path / "e"))
    with cfg.unlocked():
        cfg.balance.method = "ogm_gee"
    with pytest.raises(ConfigError, match=r"config\.balance\.method: unknown training method 'ogm_gee'; known: lfm"):
        train(cfg, str(tmp_path / "c"))
    three = tiny_config(tiny_records, "concat")
    with three.unlocked():
        three.model.modalities = ["a", "b", "c"]
        three.model.encoders.c = three.model.encoders.b.to_dict()
        three.balance.method = "test_several"
    with pytest.raises(ConfigError, match=r"config\.balance\.method: 'test_several' takes 2 modalities; "
                                          r"config\.model\.modalities is \['a', 'b', 'c'\]"):
        train(three, str(tmp_path / "d"))
    assert not any(os.path.exists(tmp_path / d) for d in "abcde")


def test_lfm_is_a_method_on_the_interface_and_its_alpha_step_a_part(tiny_records):
    run = setup(tiny_config(tiny_records, "ours_lb"))
    assert isinstance(run.method, LFM) and run.method.name == run.cfg.balance.method == "lfm"
    assert [p.name for p in run.method.parts()] == ["alpha"]
    fixed = setup(tiny_config(tiny_records, "ours_h"))
    assert [type(p).__name__ for p in fixed.method.parts()] == ["FixedAlpha"]
    # the balancing methods' kind of method reads neither loss.* nor alpha.*: setting them is warned about
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        cfg.balance.method = "test_several"
        cfg.loss.temperature = 0.5
    assert setup(cfg).warnings == ["config.loss.temperature=0.5 is ignored with config.balance.method='test_several'"]


@methods.register
class Forgetful(LFM):
    """Puts state into the train state without declaring it in init_state."""

    name = "test_forgetful"

    def apply_gradients(self, ctx, state, grads, aux):
        return super().apply_gradients(ctx, state, grads, aux).replace(method_state={"n": jnp.zeros(())})


def test_a_step_that_changes_the_states_shape_is_refused_naming_the_method(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        cfg.balance.method = "test_forgetful"
    with pytest.raises(ValueError, match=r"config\.balance\.method='test_forgetful': its step changed the train "
                                         r"state's structure"):
        train(cfg, str(tmp_path))
