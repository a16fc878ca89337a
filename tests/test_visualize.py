import numpy as np
import pytest
import torch
from PIL import Image

from crobim_u.inference.visualize import GROUND_TRUTH_COLOUR, MASK_COLOUR, draw_overlay, heatmap


def test_overlay_fills_and_outlines_the_mask_and_puts_the_heatmap_beside_it():
    image = Image.new("RGB", (40, 30), (0, 0, 0))
    mask = np.zeros((30, 40), bool)
    mask[10:20, 10:30] = True
    uncertainty = torch.linspace(0, 1, 40).repeat(30, 1)
    picture = draw_overlay(image, mask, uncertainty)
    assert picture.size == (80, 30)
    pixels = np.asarray(picture)
    assert tuple(pixels[10, 10]) == MASK_COLOUR  # outline
    assert pixels[15, 20, 0] > 50 and pixels[15, 20, 1] < pixels[15, 20, 0]  # translucent red fill
    assert tuple(pixels[2, 2]) == (0, 0, 0)  # untouched background
    assert tuple(pixels[0, 40]) == tuple(np.asarray(heatmap(np.zeros((1, 1))))[0, 0])
    assert tuple(pixels[0, 79]) == (253, 231, 37)


def test_overlay_with_title_and_ground_truth():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    truth = np.zeros((64, 64), bool)
    truth[5:15, 5:15] = True
    picture = draw_overlay(image, np.zeros((64, 64)), expression="the red car", ground_truth=truth)
    assert picture.width == 64 and picture.height > 64
    title_height = picture.height - 64
    pixels = np.asarray(picture)
    assert (pixels[:title_height] < 100).any()  # the title's text
    assert tuple(pixels[title_height + 5, 5]) == GROUND_TRUTH_COLOUR


def test_heatmap_runs_from_dark_to_bright():
    colours = np.asarray(heatmap(np.array([[0.0, 0.5, 1.0, np.nan]])))
    assert colours[0, 0].sum() < colours[0, 1].sum() < colours[0, 2].sum()
    assert tuple(colours[0, 3]) == tuple(colours[0, 0])


def test_overlay_rejects_a_mask_of_another_size():
    with pytest.raises(ValueError, match=r"mask has shape \(10, 10\), but the image is 20x30"):
        draw_overlay(Image.new("RGB", (30, 20)), np.zeros((10, 10)))


@pytest.mark.parametrize("height, width", [(1, 300), (300, 1), (1, 1)])
def test_overlay_of_a_one_pixel_side_keeps_both_axes(height, width):
    image = Image.new("RGB", (width, height))
    mask = torch.ones(1, 1, height, width, dtype=torch.bool)  # leading batch and channel axes are dropped
    picture = draw_overlay(image, mask, np.full((height, width), 0.5, np.float32))
    assert picture.size == (2 * width, height)
    red, green, blue = np.asarray(picture)[0, 0]
    assert red > 50 and green < red and blue < red  # filled: the whole picture is mask
