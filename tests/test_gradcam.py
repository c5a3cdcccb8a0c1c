"""Grad-CAM against its closed form for concat fusion, for an image and a video encoder."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngap_jax import gradcam
from dyngap_jax.models import ConcatFusion, MLPEncoder, MultimodalClassifier, ResNet, VideoEncoder, init_variables

# comparisons with PyTorch and closed forms: full float32, whatever the backend's default (TF32 on GPUs)
pytestmark = pytest.mark.usefixtures("highest_precision")


def tiny_resnet(modality):
    return ResNet(depths=(1, 1), hidden_sizes=(8, 16), embedding_size=8, num_channels=3, modality=modality)


def build(video=False):
    rng = np.random.default_rng(0)
    img = VideoEncoder(backbone=tiny_resnet("img"), num_frames=2, modality="img") if video else tiny_resnet("img")
    model = MultimodalClassifier(("img", "vec"), {"img": img, "vec": MLPEncoder(hidden=(8,), out_features=16, in_features=5,
                                                                                  modality="vec")},
                                 ConcatFusion(3, ("img", "vec")))
    shape = (2, 2, 32, 32, 3) if video else (2, 32, 32, 3)
    batch = {"img": jnp.asarray(rng.standard_normal(shape), jnp.float32),
             "vec": jnp.asarray(rng.standard_normal((2, 5)), jnp.float32), "label": jnp.asarray([1, 2])}
    variables = init_variables(model, jax.random.PRNGKey(0), batch)
    return model, variables, batch


def reference(variables, batch, cls, video):
    """With concat fusion, d logit_c / d A_k(i, j) = W[k, c] / (h w): Grad-CAM in closed form."""
    enc_vars = {k: v["encoders_img"] for k, v in variables.items() if "encoders_img" in v}
    x = batch["img"]
    net = tiny_resnet("img")
    if video:
        x = x.reshape((-1,) + x.shape[2:])
        enc_vars = {k: v["backbone"] for k, v in enc_vars.items()}
    _, fmap = net.apply(enc_vars, x, train=False, return_map=True)
    h, w = fmap.shape[1:3]
    kernel = np.asarray(variables["params"]["fusion"]["kernel"])[:16]  # the image block of the concat head
    c = np.repeat(cls, 2) if video else cls
    weights = kernel[:, c].T / (h * w)  # [N, 16]
    cam = np.maximum(np.einsum("nhwk,nk->nhw", np.asarray(fmap), weights), 0)
    if video:
        cam = cam.reshape(2, 2, h, w)
    peak = cam.max(axis=(-2, -1), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)


@pytest.mark.parametrize("video", [False, True])
def test_grad_cam_equals_closed_form(video):
    model, variables, batch = build(video)
    for target, head in (("label", "fused"), (0, "modality")):
        cam = gradcam.grad_cam(model, variables, batch, "img", target=target, head=head, upsample=False)
        cls = np.asarray(batch["label"]) if target == "label" else np.zeros(2, int)
        ref = reference(variables, batch, cls, video)
        assert cam.shape == ref.shape
        np.testing.assert_allclose(cam, ref, atol=1e-5)
    up = gradcam.grad_cam(model, variables, batch, "img")
    assert up.shape == ((2, 2, 32, 32) if video else (2, 32, 32))
    assert float(up.min()) >= 0 and float(up.max()) <= 1 + 1e-6


def test_grad_cam_errors_and_overlay():
    model, variables, batch = build()
    with pytest.raises(ValueError, match="Grad-CAM needs a ResNet"):
        gradcam.grad_cam(model, variables, batch, "vec")
    with pytest.raises(ValueError, match="class indices"):
        gradcam.grad_cam(model, variables, batch, "img", target=7)
    with pytest.raises(ValueError, match="no modality 'audio'"):
        gradcam.grad_cam(model, variables, batch, "audio")
    # init_variables keeps the perturbation placeholders out of the model state
    assert set(variables) == {"params", "batch_stats"}
    rgb = gradcam.overlay(np.asarray(batch["img"][0]), np.ones((32, 32)) * 0.5)
    assert rgb.shape == (32, 32, 3) and 0 <= rgb.min() and rgb.max() <= 1


CONFIG = '''
from configs import _base


def get_config(arg="ours_h"):
    c = _base.base("tinyimg", {data!r})
    c.progress = False
    c.model = {{"num_classes": 3, "modalities": ["img", "vec"], "projection_dim": 16,
               "encoders": {{"img": {{"name": "resnet18", "hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1],
                                       "embedding_size": 8}},
                            "vec": {{"name": "mlp", "hidden": [16], "out_features": 16, "in_features": 5}}}},
               "fusion": {{"name": "concat"}}}}
    c.data.frames = {{"img": {{"size": [32, 32], "normalize": True}}}}
    c.train.update({{"num_epochs": 2, "batch_size": 16, "eval_batch_size": 16, "learning_rate": 0.05,
                    "weight_decay": 1e-4, "schedule": "constant", "keep_checkpoints": 10}})
    return _base.apply_method(c, arg)
'''


def test_gradcam_script_draws_chosen_epochs(tmp_path):
    import importlib.util
    import subprocess

    from data_prep.common import convert
    from dyngap_jax.data.records import FeatureSpec
    from dyngap_jax.train import train

    rng = np.random.default_rng(0)
    ex = lambda i: {"img": rng.integers(0, 256, (32, 32, 3), np.uint8), "vec": rng.standard_normal(5).astype(np.float32),
                    "label": np.int32(i % 3)}
    data = str(tmp_path / "rec")
    convert(name="tinyimg", version="1", out_dir=data, splits={s: [ex(i) for i in range(n)] for s, n in
                                                                (("train", 32), ("validation", 16), ("test", 16))},
            load=lambda e: e, features={"img": FeatureSpec("uint8", [32, 32, 3]), "vec": FeatureSpec("float32", [5]),
                                        "label": FeatureSpec("int32", [])}, class_names=["x", "y", "z"], params={})
    cfg_file = tmp_path / "tinyimg.py"
    cfg_file.write_text(CONFIG.format(data=data))
    spec = importlib.util.spec_from_file_location("tinyimg_cfg", cfg_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    work = str(tmp_path / "run")
    train(module.get_config("ours_h"), work)
    out = str(tmp_path / "cam.png")
    script = [sys.executable, "-m", "scripts.gradcam"]
    proc = subprocess.run(script + ["--config", f"{cfg_file}:ours_h", "--workdir", work, "--epochs", "1,2",
                                    "--which", "best", "--num_examples", "2", "--out", out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.getsize(out) > 5000 and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    # without --config: the run's recorded config
    proc = subprocess.run(script + ["--workdir", work, "--epochs", "7", "--out", out], capture_output=True, text=True)
    assert proc.returncode != 0 and "available epochs: [1, 2]" in proc.stderr
