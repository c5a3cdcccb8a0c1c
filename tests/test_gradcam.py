"""Grad-CAM against its closed form for concat fusion, for an image and a video encoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngap_jax import gradcam
from dyngap_jax.models import ConcatFusion, MLPEncoder, MultimodalClassifier, ResNet, VideoEncoder, init_variables


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


def reference(model, variables, batch, cls, video):
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
        ref = reference(model, variables, batch, cls, video)
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
