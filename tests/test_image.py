import io

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.errors import InputError
from polymodal.modalities.image import (
    ImageTransform,
    load_image,
    patchify,
    to_pil,
    to_tensor,
    unpatchify,
)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_load_good_png(tmp_path):
    source = noisy_rgb(40, 30)
    path = tmp_path / "good.png"
    source.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.array_equal(np.asarray(image), np.asarray(source))
    from_bytes = load_image(path.read_bytes(), name="good.png")
    assert np.array_equal(np.asarray(from_bytes), np.asarray(source))


def expect_error(source, name_part: str, problem_part: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert name_part in message, message
    assert problem_part in info.value.problem.lower(), message
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.png", "absent.png", "not found")


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    expect_error(path, "empty.png", "zero-length")


def test_random_bytes_named_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    expect_error(path, "noise.png", "unrecognised")


def test_truncated_png(tmp_path):
    data = png_bytes(noisy_rgb(64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "cut.png", "truncated")


def test_truncated_png_bytes_use_the_given_name():
    data = png_bytes(noisy_rgb(64, 64))
    expect_error(data[: len(data) // 2], "shard-000001.tar:000042.file_name", "truncated",
                 name="shard-000001.tar:000042.file_name")


def test_too_many_pixels(tmp_path):
    path = tmp_path / "big.png"
    noisy_rgb(100, 100).save(path)
    error = expect_error(path, "big.png", "exceeds", max_pixels=1000)
    assert "100x100" in error.problem and "max_pixels" in error.problem
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_to_tensor_rejects_two_channels():
    with pytest.raises(InputError) as info:
        to_tensor(np.zeros((8, 8, 2), dtype=np.uint8))
    assert "channels" in str(info.value) and "(8, 8, 2)" in str(info.value)


def test_to_tensor_and_to_pil():
    image = noisy_rgb(5, 4)
    x = to_tensor(image)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(image))
    grey = to_tensor(np.full((4, 5), 51, dtype=np.uint8))
    assert grey.shape == (3, 4, 5) and torch.allclose(grey, torch.full_like(grey, 0.2))


def test_rgba_transparent_becomes_white(tmp_path):
    pixels = np.zeros((10, 10, 4), dtype=np.uint8)
    pixels[:, :5] = (255, 0, 0, 255)  # opaque red on the left
    pixels[:, 5:] = (0, 0, 255, 0)  # fully transparent blue on the right
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)
    image = np.asarray(load_image(path))
    assert image.shape == (10, 10, 3)
    assert (image[:, :5] == (255, 0, 0)).all()
    assert (image[:, 5:] == 255).all()


def test_grayscale_becomes_three_channels(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = tmp_path / "grey.png"
    Image.fromarray(pixels, "L").save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.shape == (8, 8, 3)
    for c in range(3):
        assert np.array_equal(array[:, :, c], pixels)


def test_transform_shape_and_range():
    transform = ImageTransform(32)
    pixels = np.zeros((70, 50, 3), dtype=np.uint8)
    pixels[35:] = 255  # black top half, white bottom half
    x = transform(Image.fromarray(pixels, "RGB"))
    assert x.shape == (3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.allclose(x[:, 0], torch.full((3, 32), -1.0), atol=1e-6)  # black -> -1
    assert torch.allclose(x[:, -1], torch.full((3, 32), 1.0), atol=1e-6)  # white -> +1
    square = transform(noisy_rgb(32, 32, seed=3))
    assert torch.allclose(square, to_tensor(noisy_rgb(32, 32, seed=3)) * 2 - 1)


@pytest.mark.parametrize("size", [(120, 40), (40, 120)])
def test_non_square_image_is_centre_cropped(size):
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = (0, 0, 255)  # blue edges
    cx, cy = width // 2, height // 2
    pixels[cy - 10: cy + 10, cx - 10: cx + 10] = (0, 255, 0)  # green centre square
    x = ImageTransform(16)(Image.fromarray(pixels, "RGB"))
    assert x.shape == (3, 16, 16)
    rgb = (x + 1) / 2
    centre = rgb[:, 6:10, 6:10]
    assert (centre[1] > 0.9).all() and (centre[0] < 0.1).all() and (centre[2] < 0.1).all()
    # the crop keeps the middle third of the long side: blue is still at its borders
    long_edge = rgb[:, 8, 0] if width > height else rgb[:, 0, 8]
    assert long_edge[2] > 0.9 and long_edge[1] < 0.1


def test_denormalize_inverts_normalize():
    transform = ImageTransform(8, mean=(0.2, 0.4, 0.6), std=(0.3, 0.2, 0.1))
    x = torch.rand(3, 8, 8)
    assert torch.allclose(transform.denormalize(transform.normalize(x)), x, atol=1e-6)
    batch = torch.rand(2, 3, 8, 8)
    normalized = torch.stack([transform.normalize(b) for b in batch])
    assert torch.allclose(transform.denormalize(normalized), batch, atol=1e-6)


def test_patchify_round_trip_is_exact():
    images = torch.randn(2, 3, 12, 20)
    patches = patchify(images, 4)
    assert patches.shape == (2, 15, 3 * 4 * 4)
    assert torch.equal(unpatchify(patches, 4, 12, 20), images)


def test_patch_order_and_layout():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert torch.equal(patches[:, 0], images[:, :, :4, :4].reshape(2, -1))
    assert torch.equal(patches[:, 1], images[:, :, :4, 4:].reshape(2, -1))  # row-major
    assert torch.equal(patches[:, 2], images[:, :, 4:, :4].reshape(2, -1))


def test_patchify_rejects_indivisible_sizes():
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 3, 10, 8), 4)
    with pytest.raises(ValueError):
        unpatchify(torch.zeros(1, 4, 48), 4, 12, 12)


def test_16_bit_greyscale_is_scaled_not_clipped():
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    image = np.asarray(load_image(png_bytes(Image.fromarray(pixels)), name="deep.png"))
    expected = np.round(pixels / 65535 * 255)
    assert np.abs(image[:, :, 0].astype(float) - expected).max() <= 1
