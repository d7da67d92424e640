"""Tests of varjax/data/augment.py: PIL decoding to RGB and the study's resize and crops."""

import io

import numpy as np
import PIL.Image
import pytest

from varjax.data.augment import (AugmentConfig, augment, center_offsets, crop_offsets,
                                 decode_rgb, resize_shorter)


def encode(img: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def coordinate_image(width: int, height: int) -> PIL.Image.Image:
    """Each pixel encodes its own (x, y), so a crop reveals where it was taken."""
    yy, xx = np.mgrid[0:height, 0:width]
    return PIL.Image.fromarray(np.stack([xx % 256, yy % 256, (xx // 256) * 16 + yy // 256],
                                        -1).astype(np.uint8))


@pytest.mark.parametrize("size, target, expected", [
    ((500, 375), 288, (384, 288)),   # landscape: int(288 * 500 / 375) = 384
    ((375, 500), 288, (288, 384)),   # portrait
    ((427, 640), 288, (288, 431)),   # int() truncates 431.66 (round would give 432)
    ((10, 7), 288, (411, 288)),      # tiny: upsampled, int(288 * 10 / 7) = 411
    ((256, 256), 256, (256, 256)),   # already the size
])
def test_resize_shorter_matches_torchvision_arithmetic(size, target, expected):
    img = PIL.Image.new("RGB", size, (10, 20, 30))
    assert resize_shorter(img, target).size == expected


def test_resize_is_pil_lanczos():
    img = coordinate_image(300, 200)
    expected = np.asarray(img.resize((432, 288), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(np.asarray(resize_shorter(img, 288)), expected)


@pytest.mark.parametrize("mode, color, expected", [
    ("L", 77, (77, 77, 77)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),        # alpha dropped, not composited
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),        # pure cyan
    ("I;16", 300, (255, 255, 255)),                  # 16-bit clips, as PIL convert does
])
def test_decode_converts_modes_to_rgb(mode, color, expected):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    img = decode_rgb(encode(PIL.Image.new(mode, (8, 6), color), fmt))
    assert img.mode == "RGB" and img.size == (8, 6)
    np.testing.assert_allclose(np.asarray(img)[3, 4], expected, atol=2)


def test_decode_palette_image():
    img = PIL.Image.new("P", (5, 5), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode(img, "PNG")))[0, 0], (200, 100, 50))


def test_exif_orientation_is_not_applied():
    # The study's torchvision loader ignores EXIF orientation; a transpose would swap sides.
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(PIL.Image.new("RGB", (40, 20), (1, 2, 3)), "JPEG", exif=exif.tobytes())
    assert decode_rgb(data).size == (40, 20)


@pytest.mark.parametrize("data", [b"", b"not an image at all" * 10])
def test_decode_rejects_garbage(data):
    # decode_rgb's documented error; the loader turns it into a skipped row (test_data_loader).
    with pytest.raises(PIL.UnidentifiedImageError, match="cannot identify image file"):
        decode_rgb(data)


def test_decode_rejects_truncated_jpeg():
    data = encode(coordinate_image(200, 150), "JPEG", quality=95)
    with pytest.raises(OSError, match="truncated"):
        decode_rgb(data[: len(data) // 2])


def test_crop_offsets_reproducible_and_inside():
    seen = set()
    for sample in range(200):
        for view in range(4):
            top, left = crop_offsets(300, 400, 256, seed=0, sample=sample, view=view)
            assert (top, left) == crop_offsets(300, 400, 256, seed=0, sample=sample, view=view)
            assert 0 <= top <= 300 - 256 and 0 <= left <= 400 - 256
            seen.add((top, left))
    assert len(seen) > 100  # really random over positions, not a constant
    assert crop_offsets(300, 400, 256, seed=1, sample=0, view=0) != \
        crop_offsets(300, 400, 256, seed=0, sample=0, view=0)


def test_augment_views_are_the_crops_at_the_drawn_offsets():
    # 300 x 270 with mid_reso = 270/256: resize_to = 270 = the shorter side, so no resize
    # happens and each pixel still holds its coordinates.
    config = AugmentConfig(resolution=256, mid_reso=270 / 256, views=5)
    out = augment(encode(coordinate_image(300, 270), "PNG"), 42, config, seed=3)
    assert out.shape == (5, 256, 256, 3) and out.dtype == np.uint8
    for view in range(5):
        top, left = crop_offsets(270, 300, 256, seed=3, sample=42, view=view)
        x0 = int(out[view, 0, 0, 0]) + 256 * (int(out[view, 0, 0, 2]) // 16)
        y0 = int(out[view, 0, 0, 1]) + 256 * (int(out[view, 0, 0, 2]) % 16)
        assert (y0, x0) == (top, left)


def test_view_v_does_not_depend_on_the_number_of_views():
    data = encode(coordinate_image(320, 240), "PNG")
    four = augment(data, 7, AugmentConfig(resolution=64, views=4), seed=0)
    two = augment(data, 7, AugmentConfig(resolution=64, views=2), seed=0)
    np.testing.assert_array_equal(four[:2], two)
    assert not np.array_equal(four[0], four[1])


def test_deterministic_mode_is_upstreams_validation_view():
    """Resize the shorter side to round(mid_reso * S), then CenterCrop(S): upstream's
    validation transform (utils/data.py), not a resize to S."""
    config = AugmentConfig(resolution=64, deterministic=True)
    assert config.num_views == 1 and config.resize_to == 72  # round(1.125 * 64)
    img = coordinate_image(300, 200)
    out = augment(encode(img, "PNG"), 0, config, seed=0)
    resized = np.asarray(img.resize((108, 72), PIL.Image.Resampling.LANCZOS))
    top, left = center_offsets(72, 108, 64)
    assert (top, left) == (4, 22)
    np.testing.assert_array_equal(out[0], resized[4:68, 22:86])
    assert AugmentConfig(resolution=64, mid_reso=1.25, deterministic=True).resize_to == 80
    # torchvision uses Python's round (half to even): 0.5 -> 0 but 1.5 -> 2, not floor's 1.
    assert center_offsets(65, 64, 64) == (0, 0) and center_offsets(67, 64, 64) == (2, 0)


def test_tiny_image_is_upsampled_then_cropped():
    out = augment(encode(PIL.Image.new("RGB", (10, 7), (200, 10, 10)), "PNG"), 0,
                  AugmentConfig(views=2), seed=0)
    assert out.shape == (2, 256, 256, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), (200, 10, 10), atol=1)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        AugmentConfig(mid_reso=0.9)
    with pytest.raises(ValueError):
        AugmentConfig(deterministic=True, views=8)
    assert AugmentConfig().num_views == 8 and AugmentConfig().resize_to == 288
    assert AugmentConfig(mid_reso=1.25).resize_to == 320


def test_crop_offsets_follow_the_documented_rule():
    # The rule other tools can reproduce: default_rng([seed, sample, view]), top then left.
    for seed, sample, view in [(0, 0, 0), (3, 8191, 7), (1, 16383, 2)]:
        rng = np.random.default_rng([seed, sample, view])
        expected = int(rng.integers(0, 300 - 256 + 1)), int(rng.integers(0, 400 - 256 + 1))
        assert crop_offsets(300, 400, 256, seed=seed, sample=sample, view=view) == expected
