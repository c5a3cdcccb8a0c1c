"""The device's crop, resize, flip and normalisation against the host path (PIL, example by example)."""
import jax
import numpy as np
import pytest

from dyngap_jax.data import augment, loader


def host(frames, box, size, flip, spec):
    """The CPU path: PIL's 8-bit bilinear resize of the box, flip, then [0, 1] and ImageNet normalisation."""
    out = loader.host_crop_resize(frames, box, size, flip).astype(np.float32)
    if frames.dtype == np.uint8:
        out = out / 255.0
    if spec.normalize and out.shape[-1] == 3:
        out = (out - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
    return out


BOXES = [
    (0, 0, 40, 56),  # the whole frame, shrunk
    (5, 7, 17, 23),  # shrink by about 1.4 (antialiased)
    (3, 30, 9, 11),  # enlarge (plain bilinear)
    (20, 1, 20, 6),  # enlarge one axis, shrink the other
    (0, 40, 40, 16),  # against the right and bottom edges
    (11, 13, 1, 1),  # one pixel
]


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("flip", [False, True])
def test_the_device_crop_is_the_cpu_crop_for_a_given_box(box, flip):
    rng = np.random.default_rng(sum(box))
    frames = rng.integers(0, 256, (3, 40, 56, 3), np.uint8)  # one clip of three frames
    spec = augment.FrameAugment(size=(14, 14), normalize=False)
    want = host(frames, box, spec.size, flip, spec)
    got = np.asarray(augment.prepare_frames(frames[None], spec, np.asarray([box], np.int32),
                                            np.asarray([flip]))[0])
    assert got.shape == want.shape == (3, 14, 14, 3)
    # PIL rounds to 8 bits after each of its two passes; the device does not round at all
    np.testing.assert_allclose(got, want, atol=1.01 / 255, rtol=0)
    assert np.mean(np.abs(got - want)) < 0.5 / 255 and abs(np.mean(got - want)) < 0.1 / 255  # rounding, no offset


def test_float_frames_match_pil_to_float_rounding():
    # frames stored as floats (optical flow) go through PIL's 32-bit float mode: no 8-bit rounding to allow for
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((2, 30, 30, 2)).astype(np.float32)
    spec = augment.FrameAugment(size=(12, 12), normalize=False)
    box = (4, 2, 21, 25)
    got = np.asarray(augment.prepare_frames(frames[None], spec, np.asarray([box], np.int32), np.asarray([True]))[0])
    np.testing.assert_allclose(got, host(frames, box, spec.size, True, spec), atol=2e-5, rtol=0)


def test_a_batch_of_boxes_is_each_example_cropped_alone_and_normalised():
    rng = np.random.default_rng(1)
    batch = {"video": rng.integers(0, 256, (4, 2, 24, 32, 3), np.uint8), "label": np.arange(4, dtype=np.int32),
             "image": rng.integers(0, 256, (4, 24, 32, 3), np.uint8)}
    boxes = np.asarray([(0, 0, 24, 32), (2, 3, 10, 12), (4, 8, 20, 9), (0, 16, 24, 16)], np.int32)
    flips = np.asarray([False, True, False, True])
    batch.update(video_box=boxes, video_flip=flips, image_box=boxes[::-1].copy(), image_flip=~flips)
    specs = {"video": augment.FrameAugment(size=(16, 16)), "image": augment.FrameAugment(size=(8, 8))}
    out = jax.jit(lambda b: augment.prepare(b, specs))(batch)
    assert set(out) == {"video", "image", "label"}
    for i in range(4):
        np.testing.assert_allclose(out["video"][i], host(batch["video"][i], tuple(boxes[i]), (16, 16), flips[i], specs["video"]),
                                   atol=1.01 / 255 / 0.224, rtol=0)
        np.testing.assert_allclose(out["image"][i], host(batch["image"][i][None], tuple(boxes[::-1][i]), (8, 8),
                                                         not flips[i], specs["image"])[0], atol=1.01 / 255 / 0.224, rtol=0)


def test_evaluation_resizes_the_whole_frame_and_keeps_a_frame_of_the_right_size():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2, 1, 30, 20, 3), np.uint8)
    spec = augment.FrameAugment(size=(15, 10))
    got = np.asarray(augment.prepare_frames(frames, spec))
    for i in range(2):
        np.testing.assert_allclose(got[i], host(frames[i], None, (15, 10), False, spec), atol=1.01 / 255 / 0.224, rtol=0)
    same = augment.FrameAugment(size=(30, 20), normalize=False)
    np.testing.assert_array_equal(np.asarray(augment.prepare_frames(frames, same)), (frames / np.float32(255)).astype(np.float32))


@pytest.mark.parametrize("shape", [(224, 224), (40, 300), (300, 40)])
def test_crop_boxes_lie_in_the_frame_with_the_configured_area_and_aspect(shape):
    h, w = shape
    rng = np.random.default_rng(0)
    boxes = np.asarray([augment.sample_crop(rng, h, w) for _ in range(2000)])
    top, left, bh, bw = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + bh <= h) & (left + bw <= w) & (bh > 0) & (bw > 0))
    area = bh * bw / (h * w)
    aspect = bw / bh
    inside = area <= 1.0 + 1e-9
    assert inside.all()
    if shape == (224, 224):  # every try fits often: the drawn boxes follow the distribution itself
        assert 0.07 < area.min() and area.max() <= 1.0 and 0.45 < area.mean() < 0.62
        assert (3 / 4 - 0.02) < aspect.min() and aspect.max() < (4 / 3 + 0.02)
    else:  # a long thin frame: many fall back to torchvision's central crop at the clamped aspect ratio
        fallback = (bh == h) if h < w else (bw == w)
        assert fallback.any()
