"""CrobimUImageProcessor: input policy, labels, post-processing, saving and loading."""

import ast
import json
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REAL_800, REAL_1111, needs_real_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor

from crobim_u import image_processing_crobim_u
from crobim_u.image_processing_crobim_u import CrobimUImageProcessor


MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# One 8-bit level after normalization, the tolerance of every colour comparison.
LEVEL = 1 / 255 / STD.min() + 1e-6


@pytest.fixture(scope="module")
def processor() -> CrobimUImageProcessor:
    return CrobimUImageProcessor()


def expected_pixel(rgb) -> np.ndarray:
    return (np.asarray(rgb, dtype=np.float32) / 255 - MEAN) / STD


def pixel_at(pixel_values: torch.Tensor, y: int, x: int, index: int = 0) -> np.ndarray:
    return pixel_values[index, :, y, x].numpy()


def assert_constant_colour(pixel_values: torch.Tensor, rgb, index: int = 0) -> None:
    values = pixel_values[index].numpy()
    expected = expected_pixel(rgb)[:, None, None]
    assert np.abs(values - expected).max() <= LEVEL, (values.min((1, 2)), values.max((1, 2)), expected.ravel())


def polygon_mask(height: int, width: int) -> np.ndarray:
    image = Image.new("L", (width, height), 0)
    points = [(0.2, 0.15), (0.75, 0.1), (0.9, 0.55), (0.55, 0.9), (0.15, 0.7)]
    ImageDraw.Draw(image).polygon([(x * width, y * height) for x, y in points], fill=1)
    return np.asarray(image).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# --- pixel values -------------------------------------------------------------------------------------------------


def test_pixel_values_are_normalized_and_resized(processor):
    outputs = processor(Image.new("RGB", (800, 600), (10, 200, 30)))
    assert set(outputs.keys()) == {"pixel_values", "original_sizes"}
    assert outputs.pixel_values.shape == (1, 3, 480, 480) and outputs.pixel_values.dtype == torch.float32
    # A constant image stays constant through bilinear resizing: every pixel is exactly the normalized colour.
    np.testing.assert_allclose(
        outputs.pixel_values[0].numpy(), np.broadcast_to(expected_pixel((10, 200, 30))[:, None, None], (3, 480, 480)),
        atol=1e-5,
    )
    assert outputs.original_sizes == [(600, 800)]


def test_rescale_and_normalize_switches(processor):
    image = Image.new("RGB", (64, 32), (51, 102, 255))
    only_rescale = processor(image, do_normalize=False).pixel_values
    np.testing.assert_allclose(pixel_at(only_rescale, 5, 5), [0.2, 0.4, 1.0], atol=1e-6)
    raw = processor(image, do_normalize=False, do_rescale=False).pixel_values
    np.testing.assert_allclose(pixel_at(raw, 5, 5), [51, 102, 255], atol=1e-4)
    custom = processor(image, image_mean=0.5, image_std=0.5).pixel_values
    np.testing.assert_allclose(pixel_at(custom, 5, 5), [-0.6, -0.2, 1.0], atol=1e-5)


def test_size_and_resample_overrides(processor):
    image = Image.new("RGB", (100, 50), (1, 2, 3))
    assert processor(image, size={"height": 64, "width": 96}).pixel_values.shape == (1, 3, 64, 96)
    assert processor(image, resample=Image.Resampling.NEAREST).pixel_values.shape == (1, 3, 480, 480)
    assert processor(image, do_resize=False).pixel_values.shape == (1, 3, 50, 100)
    with pytest.raises(ValueError, match="same size"):
        processor([image, Image.new("RGB", (10, 10))], do_resize=False)
    with pytest.raises(ValueError, match="'height' and 'width'"):
        processor(image, size={"shortest_edge": 100})


def test_batch_of_different_sizes_keeps_order_and_original_sizes(processor):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    sizes = [(800, 800), (1111, 1182), (7, 3)]
    images = [Image.new("RGB", size, colour) for size, colour in zip(sizes, colours)]
    outputs = processor(images)
    assert outputs.pixel_values.shape == (3, 3, 480, 480)
    assert outputs.original_sizes == [(800, 800), (1182, 1111), (3, 7)]
    for index, colour in enumerate(colours):
        assert_constant_colour(outputs.pixel_values, colour, index)


def test_numpy_output_when_return_tensors_is_none(processor):
    mask = np.zeros((40, 40), np.uint8)
    for return_tensors in (None, "np"):
        outputs = processor(np.zeros((40, 40, 3), np.uint8), mask, return_tensors=return_tensors)
        assert isinstance(outputs.pixel_values, np.ndarray) and outputs.pixel_values.dtype == np.float32
        assert isinstance(outputs.labels, np.ndarray) and outputs.labels.dtype == np.int64
        assert outputs.original_sizes == [(40, 40)]


@needs_real_data
def test_real_images(processor):
    outputs = processor([REAL_800, str(REAL_1111)])
    assert outputs.original_sizes == [(800, 800), (1182, 1111)]
    reference = np.asarray(Image.open(REAL_800).resize((480, 480), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(
        outputs.pixel_values[0].numpy(), ((reference / 255 - MEAN) / STD).transpose(2, 0, 1), atol=1e-5
    )


# --- PIL modes ----------------------------------------------------------------------------------------------------

GREY = 200
COLOUR = (200, 100, 50)


def mode_image(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """A constant image in `mode` and the RGB colour the processor must see."""
    size = (30, 20)
    if mode == "1":
        return Image.new("1", size, 1), (255, 255, 255)
    if mode in ("L", "LA", "La"):
        image = Image.new("L", size, GREY)
        if mode != "L":
            image = Image.merge("LA", (image, Image.new("L", size, 255)))
            image = image if mode == "LA" else image.convert("La")
        return image, (GREY,) * 3
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        dtype = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
        return Image.frombytes(mode, size, np.full((20, 30), GREY * 257, dtype=dtype).tobytes()), (GREY,) * 3
    if mode == "I":
        return Image.fromarray(np.full((20, 30), GREY, dtype=np.int32)), (GREY,) * 3
    if mode == "F":
        return Image.fromarray(np.full((20, 30), GREY / 255, dtype=np.float32)), (GREY,) * 3
    if mode in ("P", "PA"):
        image = Image.new("RGB", size, COLOUR).convert("P", palette=Image.Palette.ADAPTIVE)
        return (image if mode == "P" else image.convert("PA")), COLOUR
    # RGB-like modes, converted from an opaque RGB image.
    return Image.new("RGB", size, COLOUR).convert(mode), COLOUR


@pytest.mark.parametrize(
    "mode",
    ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "I", "I;16", "I;16B", "I;16L", "I;16N", "F",
     "CMYK", "YCbCr", "HSV"],
)
def test_every_pil_mode(processor, mode):
    image, rgb = mode_image(mode)
    assert image.mode == mode
    outputs = processor(image)
    assert outputs.original_sizes == [(20, 30)]
    tolerance = 2 * LEVEL if mode in ("YCbCr", "HSV") else LEVEL  # PIL's colour-space round trip loses a level
    values = outputs.pixel_values[0].numpy()
    assert np.abs(values - expected_pixel(rgb)[:, None, None]).max() <= tolerance


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_composited_onto_black(processor, mode):
    array = np.zeros((20, 40, 4), np.uint8)
    array[..., :3] = COLOUR
    array[:, :20, 3] = 0  # left half transparent
    array[:, 20:, 3] = 255
    image = Image.fromarray(array, "RGBA").convert(mode)
    visible = (np.asarray(image.convert("RGBA"))[0, 30, :3]).tolist()
    pixel_values = processor(image, size={"height": 20, "width": 40}).pixel_values
    np.testing.assert_allclose(pixel_at(pixel_values, 10, 5), expected_pixel((0, 0, 0)), atol=LEVEL)
    np.testing.assert_allclose(pixel_at(pixel_values, 10, 30), expected_pixel(visible), atol=LEVEL)


def test_transparency_key_is_composited_onto_black(processor):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    pixel_values = processor(image, do_resize=False).pixel_values
    np.testing.assert_allclose(pixel_at(pixel_values, 0, 0), expected_pixel((255, 0, 0)), atol=1e-5)
    np.testing.assert_allclose(pixel_at(pixel_values, 0, 1), expected_pixel((0, 0, 0)), atol=1e-5)


def test_lab_mode_is_refused(processor):
    with pytest.raises(ValueError, match=r"images\[1\].*'LAB'"):
        processor([Image.new("RGB", (4, 4)), Image.new("LAB", (4, 4))])


def test_do_convert_rgb_false_accepts_rgb_only(processor):
    assert processor(Image.new("RGB", (8, 8)), do_convert_rgb=False).pixel_values.shape == (1, 3, 480, 480)
    assert processor(np.zeros((8, 8, 3), np.uint16), do_convert_rgb=False).pixel_values.shape == (1, 3, 480, 480)
    with pytest.raises(ValueError, match=r"images\[0\].*do_convert_rgb=False.*'L'"):
        processor(Image.new("L", (8, 8)), do_convert_rgb=False)
    with pytest.raises(ValueError, match=r"images\[0\].*single-channel array"):
        processor(np.zeros((8, 8), np.uint8), do_convert_rgb=False)


# --- arrays and tensors -------------------------------------------------------------------------------------------


RGB = (200, 100, 52)
HWC = np.full((20, 30, 3), RGB, np.uint8)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(HWC, id="numpy-HWC-uint8"),
        pytest.param(HWC.transpose(2, 0, 1), id="numpy-CHW-uint8"),
        pytest.param(HWC.astype(np.uint16) * 257, id="numpy-uint16"),
        pytest.param(HWC.astype(np.float32) / 255, id="numpy-float32"),
        pytest.param(HWC.transpose(2, 0, 1) / 255, id="numpy-CHW-float64"),
        pytest.param((HWC / 255).astype(np.float16), id="numpy-float16"),
        pytest.param(HWC.astype(np.int64), id="numpy-int64"),
        pytest.param(torch.from_numpy(HWC).permute(2, 0, 1), id="torch-CHW"),
        pytest.param(torch.from_numpy(HWC), id="torch-HWC"),
        pytest.param(torch.from_numpy(HWC).permute(2, 0, 1).div(255).bfloat16(), id="torch-bfloat16"),
        pytest.param(torch.from_numpy(HWC / 255).requires_grad_(), id="torch-requires-grad"),
    ],
)
def test_rgb_arrays(processor, array):
    outputs = processor(array)
    assert outputs.original_sizes == [(20, 30)]
    assert_constant_colour(outputs.pixel_values, RGB)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.full((20, 30), GREY, np.uint8), id="2d"),
        pytest.param(np.full((20, 30, 1), GREY, np.uint8), id="HW1"),
        pytest.param(np.full((1, 20, 30), GREY, np.uint8), id="1HW"),
        pytest.param(torch.full((20, 30), GREY / 255), id="torch-2d-float"),
        pytest.param(torch.full((1, 20, 30), GREY * 257, dtype=torch.uint16), id="torch-uint16"),
    ],
)
def test_greyscale_arrays(processor, array):
    outputs = processor(array)
    assert outputs.original_sizes == [(20, 30)]
    assert_constant_colour(outputs.pixel_values, (GREY,) * 3)


def test_bool_array_is_black_and_white(processor):
    array = np.zeros((10, 20), bool)
    array[:, 10:] = True
    pixel_values = processor(array, do_resize=False).pixel_values
    np.testing.assert_allclose(pixel_at(pixel_values, 5, 2), expected_pixel((0, 0, 0)), atol=1e-5)
    np.testing.assert_allclose(pixel_at(pixel_values, 5, 15), expected_pixel((255, 255, 255)), atol=1e-5)


def test_uint16_uses_the_full_dtype_range(processor):
    array = np.array([[0, 128, 129, 65535]], np.uint16)  # 128/257 rounds down, 129/257 up
    pixel_values = processor(array, do_resize=False, do_normalize=False, do_rescale=False).pixel_values
    assert pixel_values[0, 0, 0].tolist() == [0, 0, 1, 255]


def test_batched_arrays(processor):
    numpy_batch = np.zeros((2, 20, 30, 3), np.uint8)
    torch_batch = torch.zeros(4, 3, 20, 30)
    assert processor(numpy_batch).pixel_values.shape == (2, 3, 480, 480)
    outputs = processor(torch_batch)
    assert outputs.pixel_values.shape == (4, 3, 480, 480) and outputs.original_sizes == [(20, 30)] * 4


def test_ambiguous_layout_follows_each_library_convention(processor):
    # (3, 5, 3): numpy reads it channels-last (a 3x5 image), torch channels-first (a 5x3 image).
    array = np.zeros((3, 5, 3), np.uint8)
    assert processor(array).original_sizes == [(3, 5)]
    assert processor(torch.from_numpy(array)).original_sizes == [(5, 3)]
    assert processor(array, input_data_format="channels_first").original_sizes == [(5, 3)]
    assert processor(torch.from_numpy(array), input_data_format="channels_last").original_sizes == [(3, 5)]


@pytest.mark.parametrize(
    "image, error, pattern",
    [
        (np.zeros((20, 30, 4), np.uint8), ValueError, r"images\[0\].*\(20, 30, 4\).*RGB\+NIR.*\[\.\.\., :3\]"),
        (np.zeros((13, 64, 64), np.uint16), ValueError, r"images\[0\].*\(13, 64, 64\).*band selection"),
        (np.zeros((64, 64, 2), np.uint8), ValueError, r"images\[0\].*1 or 3 channels"),
        (np.zeros((2, 8, 8, 8, 3), np.uint8), ValueError, r"images\[0\].*shape \(8, 8, 8, 3\)"),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, r"images\[0\].*NaN or infinite"),
        (np.full((8, 8), np.inf), ValueError, r"images\[0\].*NaN or infinite"),
        (np.full((8, 8, 3), 200.0, np.float32), ValueError, r"images\[0\].*\[0, 1\].*\[200, 200\]"),
        (np.full((8, 8, 3), -0.5, np.float32), ValueError, r"images\[0\].*\[0, 1\]"),
        (np.full((8, 8, 3), 1000, np.int32), ValueError, r"images\[0\].*int32.*\[0, 255\].*1000"),
        (np.zeros((0, 10, 3), np.uint8), ValueError, r"images\[0\].*empty"),
        (torch.zeros(3, 10, 0), ValueError, r"images\[0\].*empty"),
        (Image.new("RGB", (0, 10)), ValueError, r"images\[0\].*empty.*0x10"),
        (np.zeros((8, 8, 3), np.complex64), TypeError, r"images\[0\].*complex64"),
        (torch.zeros(3, 8, 8, dtype=torch.complex64), TypeError, r"images\[0\].*complex"),
        (np.array([["a"]]), TypeError, r"images\[0\].*<U1"),
        (np.zeros(5, np.uint8), ValueError, r"images: .*array of 2 or more dimensions.*\(5,\)"),
        (torch.tensor(1.0), ValueError, r"images: .*array of 2 or more dimensions.*\(\)"),
        (42, TypeError, r"images: .*got int"),
        ([], ValueError, r"images: got an empty list"),
        ([Image.new("RGB", (4, 4)), {"image": 1}], TypeError, r"images\[1\].*got dict"),
        ([[Image.new("RGB", (4, 4))]], TypeError, r"images\[0\].*got list.*flat"),
    ],
)
def test_invalid_images_raise_clear_errors(processor, image, error, pattern):
    with pytest.raises(error, match=pattern):
        processor(image)


def test_error_names_the_offending_index(processor):
    with pytest.raises(ValueError, match=r"images\[2\]"):
        processor([np.zeros((8, 8, 3), np.uint8)] * 2 + [np.full((8, 8, 3), np.nan)])


# --- files ---------------------------------------------------------------------------------------------------------


def test_paths(processor, tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (30, 20), COLOUR).save(path)
    for item in (path, str(path)):
        outputs = processor(item)
        assert outputs.original_sizes == [(20, 30)]
        assert_constant_colour(outputs.pixel_values, COLOUR)
    outputs = processor([path, Image.new("L", (5, 5), GREY), str(path)])
    assert outputs.original_sizes == [(20, 30), (5, 5), (20, 30)]
    with pytest.raises(FileNotFoundError):
        processor(tmp_path / "missing.png")


@pytest.mark.parametrize("orientation, red_side", [(6, "right"), (8, "left"), (3, "bottom")])
def test_exif_orientation_is_applied(processor, tmp_path, orientation, red_side):
    # Stored pixels: 60 wide, 40 high, red top half, blue bottom half.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:20, :, 0] = 255
    stored[20:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    upright = (40, 60) if orientation == 3 else (60, 40)
    mask = np.zeros(upright, np.uint8)  # masks are drawn on the image as viewers show it
    for image in (path, Image.open(path)):
        outputs = processor(image, mask, size={"height": 60, "width": 60})
        assert outputs.original_sizes == [upright]
        red = outputs.pixel_values[0, 0].numpy() > 0  # normalized red channel: positive where red
        region = {"right": red[:, 45:], "left": red[:, :15], "bottom": red[45:, :]}[red_side]
        opposite = {"right": red[:, :15], "left": red[:, 45:], "bottom": red[:15, :]}[red_side]
        assert region.all() and not opposite.any()


def test_decompression_bomb_error_passes_through(processor, tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        processor(path)


# --- masks and labels ----------------------------------------------------------------------------------------------


def rectangle_mask(foreground: int = 1, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros((60, 80), dtype)
    mask[10:40, 20:60] = foreground
    return mask


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: rectangle_mask(1), id="uint8-0-1"),
        pytest.param(lambda: rectangle_mask(255), id="uint8-0-255"),
        pytest.param(lambda: rectangle_mask(True, bool), id="bool"),
        pytest.param(lambda: rectangle_mask(1, np.float32), id="float-0-1"),
        pytest.param(lambda: rectangle_mask(255, np.int64), id="int64-0-255"),
        pytest.param(lambda: rectangle_mask(1)[None], id="1HW"),
        pytest.param(lambda: rectangle_mask(1)[..., None], id="HW1"),
        pytest.param(lambda: torch.from_numpy(rectangle_mask(True, bool)), id="torch-bool"),
        pytest.param(lambda: Image.fromarray(rectangle_mask(255)), id="PIL-L-0-255"),
        pytest.param(lambda: Image.fromarray(rectangle_mask(1)), id="PIL-L-0-1"),
        pytest.param(lambda: Image.fromarray(rectangle_mask(255)).convert("1"), id="PIL-1"),
        pytest.param(lambda: Image.fromarray(rectangle_mask(255, np.uint16)), id="PIL-I;16"),
    ],
)
def test_masks_become_binary_labels(processor, make):
    outputs = processor(Image.new("RGB", (80, 60)), make(), size={"height": 30, "width": 40})
    labels = outputs.labels
    assert labels.shape == (1, 30, 40) and labels.dtype == torch.int64
    expected = torch.zeros(30, 40, dtype=torch.int64)
    expected[5:20, 10:30] = 1
    torch.testing.assert_close(labels[0], expected)


def test_palette_masks_use_indices_not_colours(processor):
    mask = Image.fromarray(rectangle_mask(1), "P")
    mask.putpalette([0, 0, 0, 255, 255, 255])
    labels = processor(Image.new("RGB", (80, 60)), mask, do_resize=False).labels
    assert labels[0].sum() == 30 * 40 and set(labels.unique().tolist()) == {0, 1}


def test_mask_batches(processor):
    images = [Image.new("RGB", (80, 60))] * 3
    stacked = np.stack([rectangle_mask(1)] * 3)
    for masks in (stacked, torch.from_numpy(stacked)[:, None], list(stacked)):
        labels = processor(images, masks).labels
        assert labels.shape == (3, 480, 480) and set(labels.unique().tolist()) == {0, 1}


@pytest.mark.parametrize(
    "mask, pattern",
    [
        (np.array([[0, 128], [255, 0]], np.uint8), r"segmentation_maps\[0\].*\{0, 1\} or \{0, 255\}.*\[128\]"),
        (np.array([[0, 1], [255, 0]], np.uint8), r"segmentation_maps\[0\].*found \[1\]"),
        (np.array([[0, 1], [2, 0]], np.int64), r"segmentation_maps\[0\].*found \[2\]"),
        (np.array([[0, -1], [1, 0]], np.int8), r"segmentation_maps\[0\].*found \[-1\]"),
        (np.array([[0, 0.5], [1, 0]]), r"segmentation_maps\[0\].*found \[0.5\]"),
        (np.array([[0, np.nan], [1, 0]]), r"segmentation_maps\[0\].*found \[nan\]"),
        (Image.new("RGB", (2, 2)), r"segmentation_maps\[0\].*single-channel.*'RGB'"),
        ([np.zeros((2, 2, 3), np.uint8)], r"segmentation_maps\[0\].*\(H, W\).*\(2, 2, 3\)"),
        (np.zeros((2, 2, 3), np.uint8), r"Got 2 segmentation maps for 1 images.*3-D mask array is read as a batch"),
        (np.zeros((3, 2), np.uint8), r"segmentation_maps\[0\] is 3x2 \(HxW\) but images\[0\] is 2x2"),
    ],
)
def test_invalid_masks_raise_clear_errors(processor, mask, pattern):
    with pytest.raises(ValueError, match=pattern):
        processor(np.zeros((2, 2, 3), np.uint8), mask)


def test_mask_count_must_match_image_count(processor):
    with pytest.raises(ValueError, match="Got 1 segmentation maps for 2 images"):
        processor([Image.new("RGB", (4, 4))] * 2, [np.zeros((4, 4), np.uint8)])


# --- post-processing ----------------------------------------------------------------------------------------------


def model_outputs(batch_size: int = 2, size: int = 480, uncertainty: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, 1, size, size, generator=generator) * 4
    uncertainty_logits = torch.randn(batch_size, 1, size // 32, size // 32, generator=generator) * 4
    return SimpleNamespace(logits=logits, uncertainty_logits=uncertainty_logits if uncertainty else None)


@needs_real_data
def test_post_processing_restores_each_original_size(processor):
    inputs = processor([REAL_800, REAL_1111])
    results = processor.post_process_referring_segmentation(model_outputs(), target_sizes=inputs.original_sizes)
    assert len(results) == 2
    for result, size in zip(results, [(800, 800), (1182, 1111)]):
        assert set(result) == {"mask", "probabilities", "uncertainty", "score", "reliability"}
        assert result["mask"].shape == size and result["mask"].dtype == torch.bool
        assert result["probabilities"].shape == size and result["probabilities"].dtype == torch.float32
        assert result["uncertainty"].shape == size
        probabilities, uncertainty = result["probabilities"], result["uncertainty"]
        assert 0 <= probabilities.min() and probabilities.max() <= 1
        assert 0 <= uncertainty.min() and uncertainty.max() <= 1 and uncertainty.std() > 0
        torch.testing.assert_close(result["mask"], probabilities > 0.5)
        assert result["score"] == pytest.approx(probabilities[result["mask"]].mean().item())
        assert isinstance(result["score"], float) and 0.5 < result["score"] <= 1


def test_post_processing_matches_bilinear_upsampling_of_logits(processor):
    outputs = model_outputs(batch_size=1, size=64)
    result = processor.post_process_referring_segmentation(outputs, target_sizes=torch.tensor([[100, 130]]))[0]
    expected = torch.nn.functional.interpolate(outputs.logits, size=(100, 130), mode="bilinear").sigmoid()[0, 0]
    torch.testing.assert_close(result["probabilities"], expected)
    expected_uncertainty = torch.nn.functional.interpolate(
        outputs.uncertainty_logits, size=(100, 130), mode="bilinear"
    ).sigmoid()[0, 0]
    torch.testing.assert_close(result["uncertainty"], expected_uncertainty)


def test_post_processing_threshold_score_and_defaults(processor):
    logits = torch.full((1, 1, 32, 32), -5.0)
    logits[..., :8, :8] = 2.0
    outputs = SimpleNamespace(logits=logits)  # no uncertainty_logits attribute at all
    result = processor.post_process_referring_segmentation(outputs)[0]
    assert result["mask"].shape == (32, 32) and result["mask"].sum() == 64
    assert result["score"] == pytest.approx(torch.tensor(2.0).sigmoid().item())
    assert result["uncertainty"] is None
    strict = processor.post_process_referring_segmentation(outputs, threshold=0.95)[0]
    assert not strict["mask"].any() and strict["score"] == 0.0


def test_uncertainty_is_none_when_rus_is_off(processor):
    results = processor.post_process_referring_segmentation(
        model_outputs(uncertainty=False), target_sizes=[(50, 60), (70, 80)]
    )
    assert [result["uncertainty"] for result in results] == [None, None]
    assert [tuple(result["mask"].shape) for result in results] == [(50, 60), (70, 80)]


def test_post_processing_errors(processor):
    with pytest.raises(ValueError, match="Got 1 target sizes for a batch of 2"):
        processor.post_process_referring_segmentation(model_outputs(), target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        processor.post_process_referring_segmentation(SimpleNamespace(logits=torch.zeros(2, 3, 8, 8)))


@pytest.mark.parametrize("size", [(800, 800), (1182, 1111), (37, 501)])
def test_polygon_mask_survives_the_round_trip(processor, size):
    height, width = size
    mask = polygon_mask(height, width)
    inputs = processor(Image.new("RGB", (width, height)), mask)
    # Labels as confident logits, mapped back to the original size.
    logits = (inputs.labels[:, None].float() * 20 - 10)
    result = processor.post_process_referring_segmentation(
        SimpleNamespace(logits=logits, uncertainty_logits=None), target_sizes=inputs.original_sizes
    )[0]
    assert result["mask"].shape == size
    assert iou(result["mask"].numpy(), mask) >= 0.98


# --- saving and loading -------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    processor = CrobimUImageProcessor(size={"height": 512, "width": 384}, resample=Image.Resampling.BICUBIC)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "CrobimUImageProcessor"
    assert config["size"] == {"height": 512, "width": 384} and config["resample"] == 3
    loaded = CrobimUImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.testing.assert_close(loaded(image).pixel_values, processor(image).pixel_values)
    assert loaded(image).pixel_values.shape == (1, 3, 512, 384)


def test_auto_class_registration_ships_the_code(tmp_path, monkeypatch):
    monkeypatch.setattr(CrobimUImageProcessor, "_auto_class", None)  # restored after the test
    CrobimUImageProcessor.register_for_auto_class()
    CrobimUImageProcessor().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_crobim_u.CrobimUImageProcessor"}
    assert (tmp_path / "image_processing_crobim_u.py").read_text() == pathlib.Path(
        image_processing_crobim_u.__file__
    ).read_text()

    # The installed package registers the class, so the Auto class resolves it locally; loading the folder's copy
    # where crobim_u cannot be imported is tested in test_processing.py.
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CrobimUImageProcessor
    assert loaded(Image.new("RGB", (8, 8))).pixel_values.shape == (1, 3, 480, 480)


def test_shipped_file_imports_only_allowed_packages():
    tree = ast.parse(pathlib.Path(image_processing_crobim_u.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 or (node.level == 1 and node.module), "only `from .sibling import X`"
            if node.level == 0:
                roots.add(node.module.split(".")[0])
    assert roots <= {"os", "typing", "numpy", "torch", "transformers", "PIL"}, roots


# --- property test ------------------------------------------------------------------------------------------------

PIL_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr"]
DTYPES = ["uint8", "uint16", "float32", "float64", "bool", "int64"]


@st.composite
def image_inputs(draw):
    """An image input, its expected (H, W), and whether the documented policy accepts it."""
    height = draw(st.integers(1, 3000))
    width = draw(st.integers(1, min(3000, 1_500_000 // height)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["pil", "numpy", "torch"]))
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        if mode in ("I", "I;16", "F"):
            scale = {"I": 1, "I;16": 257, "F": 1 / 255}[mode]
            array = rng.integers(0, 256, (height, width)) * scale
            image = Image.fromarray(array.astype({"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]))
        return image, {}, (height, width), True

    dtype = draw(st.sampled_from(DTYPES))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    shape = (height, width) if channels is None else (height, width, channels)
    if dtype == "bool":
        array = rng.integers(0, 2, shape).astype(bool)
    elif dtype.startswith("float"):
        array = rng.random(shape).astype(dtype)
    else:
        array = rng.integers(0, np.iinfo(dtype).max if dtype == "uint16" else 256, shape).astype(dtype)
    corruption = draw(st.sampled_from([None, None, None, "nan", "out-of-range"]))
    valid = channels != 4
    if corruption and dtype.startswith("float"):
        array.flat[0] = np.nan if corruption == "nan" else 2.0
        valid = False
    elif corruption == "out-of-range" and dtype == "int64":
        array.flat[0] = 256
        valid = False
    kwargs = {}
    if channels is not None and draw(st.booleans()):
        array = np.moveaxis(array, -1, 0)
        kwargs["input_data_format"] = "channels_first"
    elif channels is not None:
        kwargs["input_data_format"] = "channels_last"
    return (torch.from_numpy(array) if kind == "torch" else array), kwargs, (height, width), valid


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(example=image_inputs())
def test_property_documented_errors_only_and_sizes_round_trip(processor, example):
    image, kwargs, size, valid = example
    if not valid:
        with pytest.raises(ValueError, match=r"images\[0\]"):
            processor(image, **kwargs)
        return
    inputs = processor(image, **kwargs)
    assert inputs.original_sizes == [size]
    assert inputs.pixel_values.shape == (1, 3, 480, 480) and torch.isfinite(inputs.pixel_values).all()
    result = processor.post_process_referring_segmentation(model_outputs(batch_size=1), inputs.original_sizes)[0]
    assert result["mask"].shape == size and result["probabilities"].shape == size
    assert result["uncertainty"].shape == size
