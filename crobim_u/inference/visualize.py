"""Pictures of predictions: the mask drawn on the image, the uncertainty heatmap beside it, the expression on top."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Anchor colours of a perceptually ordered heatmap (dark blue -> teal -> yellow, like viridis), interpolated.
_HEATMAP_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)
MASK_COLOUR = (255, 64, 64)
GROUND_TRUTH_COLOUR = (64, 255, 64)


def heatmap(values: np.ndarray) -> Image.Image:
    """Colours a `(H, W)` array of values in [0, 1] (0 dark blue, 1 yellow)."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    position = values * (len(_HEATMAP_ANCHORS) - 1)
    lower = np.floor(position).astype(np.int64).clip(0, len(_HEATMAP_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    colours = _HEATMAP_ANCHORS[lower] * (1 - fraction) + _HEATMAP_ANCHORS[lower + 1] * fraction
    return Image.fromarray(colours.round().astype(np.uint8), mode="RGB")


def _as_map(values: Any) -> np.ndarray:
    """A PIL image, NumPy array or tensor as an array without its leading size-1 (batch, channel) axes."""
    if hasattr(values, "detach"):
        array = values.detach().cpu().numpy()
    else:
        array = np.asarray(values.convert("L") if isinstance(values, Image.Image) else values)
    # Only leading axes go: a 1-pixel-high or -wide map keeps both of its axes.
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    return array


def _as_bool_mask(mask: Any, size: tuple[int, int], name: str) -> np.ndarray:
    array = _as_map(mask)
    if array.shape != (size[1], size[0]):
        raise ValueError(f"{name} has shape {array.shape}, but the image is {size[1]}x{size[0]} (height x width).")
    return array > 0


def _outline(mask: np.ndarray) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MaxFilter(3))) != np.asarray(image.filter(ImageFilter.MinFilter(3)))


def draw_mask(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.35) -> Image.Image:
    """Fills `mask` on `image` with translucent `colour` and outlines it in the solid colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * np.array(colour, dtype=np.float32)
    pixels[_outline(mask)] = colour
    return Image.fromarray(pixels.round().astype(np.uint8))


def draw_overlay(
    image: Image.Image,
    mask: Any,
    uncertainty: Any = None,
    expression: str | None = None,
    ground_truth: Any = None,
) -> Image.Image:
    """
    One picture of a prediction: the image with the predicted mask (red fill and outline) and, if given, the
    ground-truth outline (green); the uncertainty heatmap beside it; the expression as a title.

    Args:
        image (`PIL.Image.Image`): The input image.
        mask: The predicted mask, `(H, W)` (PIL, NumPy or torch; leading size-1 axes such as `(1, 1, H, W)` are
            dropped), at the image's size.
        uncertainty (*optional*): `(H, W)` values in [0, 1] at the image's size, e.g. the pipeline's `uncertainty`.
        expression (`str`, *optional*): Drawn above the panels.
        ground_truth (*optional*): The true mask, `(H, W)`, outlined in green.

    Returns:
        `PIL.Image.Image`: RGB, `2 * W` wide with uncertainty (else `W`), plus a title strip when `expression` is
        given.
    """
    image = image.convert("RGB")
    panel = draw_mask(image, _as_bool_mask(mask, image.size, "mask"), MASK_COLOUR)
    if ground_truth is not None:
        pixels = np.asarray(panel).copy()
        pixels[_outline(_as_bool_mask(ground_truth, image.size, "ground_truth"))] = GROUND_TRUTH_COLOUR
        panel = Image.fromarray(pixels)
    panels = [panel]
    if uncertainty is not None:
        values = _as_map(uncertainty)
        if values.shape != (image.height, image.width):
            raise ValueError(f"uncertainty has shape {values.shape}, but the image is {image.height}x{image.width}.")
        panels.append(heatmap(values))

    title_height = 0
    font = ImageFont.load_default()
    if expression:
        title_height = max(14, image.height // 16)
        font = ImageFont.load_default(size=max(10, title_height - 4))
    canvas = Image.new("RGB", (image.width * len(panels), image.height + title_height), (255, 255, 255))
    for index, picture in enumerate(panels):
        canvas.paste(picture, (index * image.width, title_height))
    if expression:
        ImageDraw.Draw(canvas).text((4, 1), expression, fill=(0, 0, 0), font=font)
    return canvas


__all__ = ["draw_mask", "draw_overlay", "heatmap"]
