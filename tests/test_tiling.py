"""Tiled inference: window layout, blending, agreement with untiled inference, coarse-then-refine, lazy reading."""

import numpy as np
import pytest
import torch
from helpers import WORDS, BrightnessModel, make_processor, random_image, tiny_model

from crobim_u.inference.tiling import ArrayScene, predict_scene, window_starts, window_weights


def planted_scene(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A dark scene with bright boxes (top, left, bottom, right), and the boxes' mask."""
    scene = np.full((height, width, 3), 40, dtype=np.uint8)
    truth = np.zeros((height, width), dtype=bool)
    for top, left, bottom, right in boxes:
        scene[top:bottom, left:right] = 220
        truth[top:bottom, left:right] = True
    return scene, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


@pytest.fixture(scope="module")
def model():
    return tiny_model(text_config={"vocab_size": len(WORDS)})


@pytest.fixture(scope="module")
def processor():
    return make_processor(size=64)


@pytest.mark.parametrize("length, window, overlap", [(500, 64, 0.25), (64, 64, 0.5), (100, 64, 0.0), (30, 64, 0.25)])
def test_windows_cover_the_scene_with_the_overlap(length, window, overlap):
    starts = window_starts(length, window, overlap)
    side = min(window, length)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start : start + side] += 1
    assert covered.min() >= 1 and starts[0] == 0 and starts[-1] + side == length
    assert all(start + side <= length for start in starts)
    for previous, start in zip(starts, starts[1:]):
        assert previous + side - start >= int(overlap * side)


def test_window_weights_fade_inside_and_cross_fade_to_a_constant():
    length, window, overlap = 208, 64, 0.25  # the windows tile the scene with an exact step of 48
    starts = window_starts(length, window, overlap)
    assert starts == [0, 48, 96, 144]
    total = np.zeros(length)
    for start in starts:
        weights = window_weights(start, window, length, ramp=16)
        total[start : start + window] += weights
        assert weights.min() > 0
    assert window_weights(0, window, length, 16)[0] == 1.0  # scene borders are not faded
    assert window_weights(48, window, length, 16)[0] < 0.05  # window borders inside the scene are
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize("mode, stride", [("tiled", 1), ("resize", 8)])
def test_scene_within_one_window_matches_untiled_inference(model, processor, mode, stride):
    image = np.asarray(random_image(50, 40))
    encoding = processor(images=image, text=["the red car"])
    sizes = encoding.pop("original_sizes")
    with torch.inference_mode():
        expected = processor.post_process_referring_segmentation(model(**encoding), sizes)[0]
    result = predict_scene(model, processor, image, "the red car", mode=mode, uncertainty_stride=stride)
    assert result.num_windows == 1
    np.testing.assert_array_equal(result.mask, expected["mask"].numpy())
    # float16 storage: one unit in the last place near 0.5 is 2.4e-4
    np.testing.assert_allclose(result.probability, expected["probabilities"].numpy(), atol=5e-4)
    np.testing.assert_allclose(result.uncertainty, expected["uncertainty"].numpy(), atol=5e-4)
    assert result.score == pytest.approx(expected["score"], abs=1e-6)


def test_blending_across_window_borders_is_exact():
    # The object spans several windows and touches none of their borders at the same place.
    scene, truth = planted_scene(300, 500, [(50, 37, 230, 301), (260, 440, 300, 500)])
    stub, processor = BrightnessModel(), make_processor(size=64)
    result = predict_scene(stub, processor, scene, "the bright roofs", overlap=0.25, batch_size=8)
    assert result.num_windows == len(window_starts(300, 64, 0.25)) * len(window_starts(500, 64, 0.25)) > 20
    np.testing.assert_array_equal(result.mask, truth)
    expected = torch.sigmoid(20 * (torch.tensor(np.where(truth, 220, 40) / 255) - 0.5)).numpy()
    np.testing.assert_allclose(result.probability, expected, atol=1e-3)
    assert result.uncertainty.shape == truth.shape and result.score > 0.99


def test_windows_larger_than_the_model_input_are_downsampled():
    scene, truth = planted_scene(300, 500, [(50, 37, 230, 301)])
    result = predict_scene(BrightnessModel(), make_processor(size=64), scene, "the roof", window=128, overlap=0.5)
    assert result.num_windows == len(window_starts(300, 128, 0.5)) * len(window_starts(500, 128, 0.5))
    assert iou(result.mask, truth) > 0.97


def test_downsample_refine_keeps_what_the_whole_scene_shows():
    # A large roof and a 4-pixel speck: every window sees the speck, the whole scene at 64x64 does not.
    scene, roof = planted_scene(1024, 1024, [(300, 260, 620, 700)])
    scene[900:904, 100:104] = 255
    stub, processor = BrightnessModel(), make_processor(size=64)
    tiled = predict_scene(stub, processor, scene, "the largest roof", batch_size=16)
    refined = predict_scene(stub, processor, scene, "the largest roof", mode="downsample-refine", batch_size=16)
    assert tiled.mask[900:904, 100:104].all()
    assert not refined.mask[850:950, 50:150].any()
    np.testing.assert_array_equal(refined.mask, roof)
    assert refined.num_windows < tiled.num_windows / 2
    assert stub.text_encodings == 2  # once per call, whatever the number of windows


def test_expressions_share_windows_and_text_is_encoded_once(model, processor):
    scene = np.asarray(random_image(150, 110, seed=1))
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        both = predict_scene(model, processor, scene, ["the red car", "the large building"], batch_size=3)
    finally:
        handle.remove()
    assert len(calls) == 1 and both[0].num_windows == 6  # 2 x 3 windows, in 2 batches
    alone = predict_scene(model, processor, scene, "the large building", batch_size=5)
    np.testing.assert_allclose(both[1].probability, alone.probability, atol=1e-3)
    np.testing.assert_allclose(both[1].uncertainty, alone.uncertainty, atol=1e-3)
    assert not np.array_equal(both[0].probability, both[1].probability)
    for result in both:
        assert result.mask.shape == result.probability.shape == (110, 150) and result.mask.dtype == bool
        assert result.probability.dtype == np.float16 and 0 <= result.probability.min() <= result.probability.max() <= 1
        clear = np.abs(result.probability.astype(np.float32) - 0.5) > 1e-3
        np.testing.assert_array_equal(result.mask[clear], (result.probability > 0.5)[clear])


def test_model_without_uncertainty_scorer(processor):
    base = tiny_model(text_config={"vocab_size": len(WORDS)}, use_rus=False, use_ugf=False, use_udlr=False)
    result = predict_scene(base, processor, np.asarray(random_image(100, 80)), "the car", mode="downsample-refine")
    assert result.uncertainty is None and result.probability.shape == (80, 100)


class RecordingScene(ArrayScene):
    """An in-memory scene that records every read, to check that tiling reads window by window."""

    def __init__(self, image):
        super().__init__(image)
        self.reads = []

    def read(self, row_off, col_off, height, width, out_shape=None):
        self.reads.append((height, width, out_shape))
        return super().read(row_off, col_off, height, width, out_shape)


def test_scene_readers_are_read_window_by_window():
    scene, truth = planted_scene(400, 400, [(100, 100, 300, 300)])
    reader = RecordingScene(scene)
    result = predict_scene(BrightnessModel(), make_processor(size=64), reader, "the roof", mode="downsample-refine")
    coarse, *windows = reader.reads
    assert coarse == (400, 400, (64, 64))  # the whole scene only ever downsampled
    assert windows and all(read == (64, 64, None) for read in windows)
    np.testing.assert_array_equal(result.mask, truth)


def test_invalid_arguments(processor):
    stub, scene = BrightnessModel(), np.zeros((64, 64, 3), dtype=np.uint8)
    for kwargs in ({"mode": "sliding"}, {"overlap": 1.0}, {"batch_size": 0}, {"threshold": 1.0}):
        with pytest.raises(ValueError):
            predict_scene(stub, processor, scene, "the car", **kwargs)
    with pytest.raises(TypeError, match="SceneReader"):
        predict_scene(stub, processor, "scene.png", "the car")
