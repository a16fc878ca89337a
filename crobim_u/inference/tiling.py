"""
Referring segmentation of scenes larger than the model input: overlapping windows blended back together.

A scene is cut into overlapping windows of `window` scene pixels; each window is resized to the model input (a no-op
when `window` equals it), segmented, and its logits are added to a scene-sized running sum with weights that fade
towards the window borders, where the model sees the least context. The mask is thresholded once, on the blended
logits. Three modes:

- `"tiled"`: every window of the grid. Each window judges the expression on its own, so a phrase that is global
  over the scene ("the largest building", "the leftmost ship") is judged *per window*: every window can mark its own
  largest building. Use `"downsample-refine"` for such phrases.
- `"downsample-refine"`: the whole scene, downsampled to the model input, is segmented first (global context, coarse
  detail); then only the windows that touch the coarse mask are run at full resolution, and their blended logits
  replace the coarse ones inside the coarse mask, dilated by `REFINE_MARGIN` coarse pixels. So the coarse pass
  decides *which* object is meant and the windows draw its outline; whatever a window marks outside the (dilated)
  coarse mask is dropped. The price: an object that vanishes at the coarse scale (a 20-pixel car in a 10,000-pixel
  scene is 1 pixel at 480) is not found.
- `"resize"`: the whole scene resized to the model input, one forward pass: what the processor does with any image.

The expression is tokenized and encoded once per scene and reused for every window, and each window's image
features serve all expressions. Memory: O(batch) for the model, plus per expression about 9 bytes per scene pixel (a
float32 logit sum while running; a float16 probability, a bool mask and a float16 uncertainty in the result): ~0.9 GB
for a 10,000 x 10,000 scene. Window weights are separable, so their sum is rebuilt from 1-D profiles instead of being
stored per pixel, and uncertainty is accumulated on a grid of stride `uncertainty_stride` (the model predicts it at
stride 32 of its input anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..image_processing_crobim_u import DEFAULT_THRESHOLD, REDUCING_GAP, image_to_rgb, resize_logits


MODES = ("tiled", "downsample-refine", "resize")
# Defaults of [`predict_scene`] and `crobim-u predict`: overlap of neighbouring windows (fraction of the window) and
# windows per forward pass.
DEFAULT_OVERLAP = 0.25
DEFAULT_WINDOW_BATCH_SIZE = 4
# Lowest window weight: a pixel seen only near some window's border still gets a defined value.
WEIGHT_FLOOR = 0.01
# Dilation (in coarse-grid pixels) of the coarse mask inside which refined logits are used in "downsample-refine".
REFINE_MARGIN = 2
# Pillow's resize with the image processor's default settings (bilinear, box-reduce first above 3x), so a window read
# at the model size equals what the processor would have made of it.
_RESAMPLE = Image.Resampling.BILINEAR
_FINALIZE_ROWS = 256


@runtime_checkable
class SceneReader(Protocol):
    """
    A scene read window by window, so that it never has to be in memory whole (e.g. a GeoTIFF).

    Attributes:
        height (`int`): Scene height in pixels.
        width (`int`): Scene width in pixels.
    """

    height: int
    width: int

    def read(
        self, row_off: int, col_off: int, height: int, width: int, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """
        Returns the window `[row_off : row_off + height, col_off : col_off + width]` as an `(h, w, 3)` uint8 RGB
        array, resampled to `out_shape = (h, w)` when given (else at full resolution).
        """
        ...


class ArrayScene:
    """
    A [`SceneReader`] over an image in memory.

    Args:
        image (`np.ndarray` or `PIL.Image.Image`):
            `(H, W, 3)` or `(H, W)` uint8 arrays are used as they are (no copy). Anything else (PIL images, other
            dtypes and layouts) is converted by the image processor's documented rules, so tiled and untiled
            predictions see the same pixels; for a percentile stretch of 16-bit data use
            `crobim_u.inference.geo.stretch_to_uint8` first.
    """

    def __init__(self, image: np.ndarray | Image.Image):
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)
        ):
            array = image
        else:
            array = np.asarray(image_to_rgb(image, "scene", True, None))
        if array.size == 0:
            raise ValueError(f"The scene is empty (shape {array.shape}).")
        self.array = array
        self.height, self.width = array.shape[:2]

    def read(
        self, row_off: int, col_off: int, height: int, width: int, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        region = self.array[row_off : row_off + height, col_off : col_off + width]
        if out_shape is not None and tuple(out_shape) != region.shape[:2]:
            picture = Image.fromarray(region).convert("RGB")
            region = np.asarray(picture.resize(out_shape[::-1], resample=_RESAMPLE, reducing_gap=REDUCING_GAP))
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=-1)
        return region


@dataclass
class SceneResult:
    """
    The prediction for one expression over a whole scene.

    Attributes:
        expression (`str`): The referring expression.
        mask (`np.ndarray` of shape `(H, W)`, bool): Pixels whose probability is above the threshold.
        probability (`np.ndarray` of shape `(H, W)`, float16): Sigmoid of the blended logits.
        uncertainty (`np.ndarray` of shape `(H, W)`, float16, or `None`): Referring uncertainty in [0, 1]; `None`
            for a model without RUS.
        score (`float`): Mean probability inside the mask (0.0 for an empty mask), as in post-processing.
        mode (`str`): The mode used.
        num_windows (`int`): Model inputs run for the scene (the coarse pass counts as one).
    """

    expression: str
    mask: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray | None
    score: float
    mode: str
    num_windows: int


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """
    Start offsets of windows of `window` pixels covering `[0, length)` with at least `overlap` (a fraction of the
    window) shared between neighbours; the last window is shifted back to end at the scene border, not cut.
    """
    if window >= length:
        return [0]
    step = max(1, round(window * (1 - overlap)))
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def window_weights(start: int, window: int, length: int, ramp: int) -> np.ndarray:
    """
    1-D blending weights of one window: a linear ramp over `ramp` pixels at each side that is inside the scene (two
    neighbours' ramps cross-fade to a constant sum), 1 at sides on the scene border, never below `WEIGHT_FLOOR`.
    """
    position = np.arange(window, dtype=np.float32) + 0.5
    weights = np.ones(window, dtype=np.float32)
    if start > 0:
        weights = np.minimum(weights, position / ramp)
    if start + window < length:
        weights = np.minimum(weights, (window - position) / ramp)
    return np.clip(weights, WEIGHT_FLOOR, 1.0)


def _bilinear_taps(positions: torch.Tensor, out_length: int, in_length: int) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of `F.interpolate(mode="bilinear", align_corners=False)` for some output positions."""
    source = ((positions.double() + 0.5) * (in_length / out_length) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_length - 1)
    high = (low + 1).clamp(max=in_length - 1)
    fraction = (source - low).float().clamp(max=1.0)
    return low, high, fraction


def _resample(grid: torch.Tensor, rows: torch.Tensor, height: int, cols: torch.Tensor, width: int) -> torch.Tensor:
    """
    Values at scene positions `rows` x `cols` of `grid` (E, h, w) bilinearly upsampled to (height, width), computed
    for those positions only, so a scene-sized map is never materialised.
    """
    low, high, fraction = _bilinear_taps(rows, height, grid.shape[-2])
    grid = grid[:, low] * (1 - fraction)[:, None] + grid[:, high] * fraction[:, None]
    low, high, fraction = _bilinear_taps(cols, width, grid.shape[-1])
    return grid[..., low] * (1 - fraction) + grid[..., high] * fraction


def _nearest(positions: torch.Tensor, out_length: int, in_length: int) -> torch.Tensor:
    """Source indices of `F.interpolate(mode="nearest")`."""
    return (positions * in_length // out_length).clamp(max=in_length - 1)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


class _SceneAccumulator:
    """Running weighted sums of window logits (per pixel) and uncertainty logits (on a strided grid)."""

    def __init__(self, num_expressions: int, height: int, width: int, uncertainty_stride: int):
        self.height, self.width = height, width
        self.logit_sum = np.zeros((num_expressions, height, width), dtype=np.float32)
        # Row start of each row of windows -> (its row weights, the summed column weights of its windows). A pixel's
        # total weight is the sum over window rows of row weight x column profile, rebuilt per block of rows.
        self.weight_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.grid_rows = self._grid_positions(height, uncertainty_stride)
        self.grid_cols = self._grid_positions(width, uncertainty_stride)
        # Allocated at the first window with uncertainty logits (none for a model without RUS).
        self.uncertainty_sum = self.uncertainty_weight = None

    @staticmethod
    def _grid_positions(length: int, stride: int) -> torch.Tensor:
        # Scene pixels whose grid cell centres map back onto themselves under bilinear upsampling of the grid.
        cells = math.ceil(length / stride)
        positions = (torch.arange(cells, dtype=torch.float64) + 0.5) * length / cells - 0.5
        return positions.round().long().clamp(0, length - 1)

    def add(
        self,
        box: tuple[int, int, int, int],
        row_weights: np.ndarray,
        col_weights: np.ndarray,
        logits: torch.Tensor,
        uncertainty_logits: torch.Tensor | None,
    ) -> None:
        """Adds one window's (E, h, w) logits and (E, h/32, w/32) uncertainty logits at `box` (row, col, h, w)."""
        row, col, height, width = box
        logits = resize_logits(logits, (height, width))
        weights = torch.from_numpy(np.outer(row_weights, col_weights))
        target = torch.from_numpy(self.logit_sum[:, row : row + height, col : col + width])
        target.add_(logits * weights)
        if row not in self.weight_rows:
            self.weight_rows[row] = (row_weights, np.zeros(self.width, dtype=np.float32))
        self.weight_rows[row][1][col : col + width] += col_weights

        if uncertainty_logits is None:
            return
        if self.uncertainty_sum is None:
            shape = (len(self.grid_rows), len(self.grid_cols))
            self.uncertainty_sum = torch.zeros((len(logits), *shape))
            self.uncertainty_weight = torch.zeros(shape)
        rows = torch.nonzero((self.grid_rows >= row) & (self.grid_rows < row + height)).flatten()
        cols = torch.nonzero((self.grid_cols >= col) & (self.grid_cols < col + width)).flatten()
        if len(rows) == 0 or len(cols) == 0:
            return
        local_rows, local_cols = self.grid_rows[rows] - row, self.grid_cols[cols] - col
        values = _resample(uncertainty_logits, local_rows, height, local_cols, width)
        grid_weights = torch.from_numpy(np.outer(row_weights[local_rows.numpy()], col_weights[local_cols.numpy()]))
        rows, cols = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
        self.uncertainty_sum[:, rows, cols] += values * grid_weights
        self.uncertainty_weight[rows, cols] += grid_weights

    def weights(self, start: int, stop: int) -> torch.Tensor:
        """Summed window weights of scene rows `[start, stop)`, shape (stop - start, W)."""
        total = np.zeros((stop - start, self.width), dtype=np.float32)
        for row, (row_weights, column_profile) in self.weight_rows.items():
            low, high = max(start, row), min(stop, row + len(row_weights))
            if low < high:
                total[low - start : high - start] += np.outer(row_weights[low - row : high - row], column_profile)
        return torch.from_numpy(total)


@dataclass
class _Coarse:
    """The whole scene segmented at the model input size."""

    logits: torch.Tensor  # (E, h, w)
    uncertainty_logits: torch.Tensor | None  # (E, h/32, w/32)
    gate: torch.Tensor  # (E, h, w) bool: dilated coarse mask, where refined logits may replace the coarse ones

    def gate_at(self, rows: torch.Tensor, height: int, cols: torch.Tensor, width: int) -> torch.Tensor:
        """The gate at scene positions `rows` x `cols` of a (height, width) scene (nearest coarse pixel)."""
        grid_height, grid_width = self.gate.shape[-2:]
        return self.gate[:, _nearest(rows, height, grid_height)][..., _nearest(cols, width, grid_width)]


def _as_scene(scene: Any) -> SceneReader:
    if isinstance(scene, (np.ndarray, Image.Image)):
        return ArrayScene(scene)
    if isinstance(scene, SceneReader):
        return scene
    raise TypeError(
        "scene must be a numpy array, a PIL image or a SceneReader (height, width, read()); "
        f"got {type(scene).__name__}."
    )


def model_input_size(processor: Any) -> tuple[int, int]:
    """(height, width) of the model input: the processor's resize target."""
    size = processor.image_processor.size
    return int(size["height"]), int(size["width"])


def check_tiling_options(
    mode: str = "tiled",
    overlap: float = 0.0,
    batch_size: int = 1,
    threshold: float = DEFAULT_THRESHOLD,
    uncertainty_stride: int = 1,
    window: Sequence[int] | None = None,
) -> None:
    """Raises a `ValueError` naming the first setting of [`predict_scene`] out of its range."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}.")
    if batch_size < 1 or uncertainty_stride < 1:
        raise ValueError(f"batch_size and uncertainty_stride must be positive, got {batch_size}, {uncertainty_stride}.")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}.")
    if window is not None and min(window) < 1:
        raise ValueError(f"window must be positive, got {tuple(window)}.")


def predict_scene(
    model: Any,
    processor: Any,
    scene: np.ndarray | Image.Image | SceneReader,
    expression: str | Sequence[str],
    window: int | tuple[int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_WINDOW_BATCH_SIZE,
    mode: str = "tiled",
    threshold: float = DEFAULT_THRESHOLD,
    uncertainty_stride: int = 8,
    progress: bool = False,
) -> SceneResult | list[SceneResult]:
    r"""
    Segments what `expression` refers to in a scene of any size (see the module docstring for the modes).

    Args:
        model ([`CrobimUForReferringSegmentation`]):
            The model, in eval mode, on its device.
        processor ([`CrobimUProcessor`]):
            Its processor; its image size is the model input size.
        scene (`np.ndarray`, `PIL.Image.Image` or [`SceneReader`]):
            The scene: an RGB image in memory or a window reader such as
            [`~crobim_u.inference.geo.GeoTiffScene`].
        expression (`str` or `list[str]`):
            One referring expression, or several: each window is then encoded once for all of them.
        window (`int` or `(int, int)`, *optional*):
            Window size in scene pixels; defaults to the model input size. Larger windows are downsampled to the
            model input (faster, coarser); windows are clamped to the scene.
        overlap (`float`, *optional*, defaults to 0.25):
            Fraction of a window shared with each neighbour, in [0, 1).
        batch_size (`int`, *optional*, defaults to 4):
            Windows per forward pass; bounds the model's memory.
        mode (`str`, *optional*, defaults to `"tiled"`):
            `"tiled"`, `"downsample-refine"` or `"resize"`.
        threshold (`float`, *optional*, defaults to 0.5):
            A pixel is in the mask where its blended probability is strictly greater.
        uncertainty_stride (`int`, *optional*, defaults to 8):
            Scene pixels per cell of the grid on which window uncertainties are blended before being upsampled
            bilinearly (1 blends at every pixel).
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar over the windows.

    Returns:
        [`SceneResult`], or a list of them (one per expression) when `expression` is a list.
    """
    check_tiling_options(mode, overlap, batch_size, threshold, uncertainty_stride)
    single = isinstance(expression, str)
    expressions = [expression] if single else list(expression)
    scene = _as_scene(scene)
    height, width = scene.height, scene.width
    model_size = model_input_size(processor)
    window = model_size if window is None else (window, window) if isinstance(window, int) else tuple(window)
    check_tiling_options(window=window)
    window = (min(window[0], height), min(window[1], width))

    runner = _WindowRunner(model, processor, scene, expressions, model_size)
    with torch.inference_mode():
        coarse = None if mode == "tiled" else _coarse_pass(runner, height, width, threshold)
        accumulator = None
        num_windows = 1 if coarse is not None else 0
        if mode != "resize":
            boxes = _window_boxes(height, width, window, overlap)
            if coarse is not None:
                boxes = [box for box in boxes if _touches(box, coarse.gate, height, width)]
            accumulator = _SceneAccumulator(len(expressions), height, width, uncertainty_stride)
            profiles = _WindowProfiles(window, overlap, height, width)
            _blend_windows(runner, boxes, accumulator, profiles, batch_size, progress)
            num_windows += len(boxes)

    results = _finalize(accumulator, coarse, expressions, height, width, threshold, mode, num_windows)
    return results[0] if single else results


def _logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def _window_boxes(height: int, width: int, window: tuple[int, int], overlap: float) -> list[tuple[int, int, int, int]]:
    return [
        (row, col, window[0], window[1])
        for row in window_starts(height, window[0], overlap)
        for col in window_starts(width, window[1], overlap)
    ]


def _touches(box: tuple[int, int, int, int], gate: torch.Tensor, height: int, width: int) -> bool:
    """Whether the window `box` covers any coarse pixel of `gate` (E, h, w), for any expression."""
    row, col, box_height, box_width = box
    grid_height, grid_width = gate.shape[-2:]
    top, bottom = row * grid_height // height, math.ceil((row + box_height) * grid_height / height)
    left, right = col * grid_width // width, math.ceil((col + box_width) * grid_width / width)
    return bool(gate[:, top:bottom, left:right].any())


class _WindowRunner:
    """
    Runs the model on windows of one scene for all its expressions at once. The expressions are tokenized and
    encoded once, here, and every window reuses them; each window's image features serve all expressions.
    """

    def __init__(
        self, model: Any, processor: Any, scene: SceneReader, expressions: list[str], model_size: tuple[int, int]
    ):
        self.model, self.processor, self.scene, self.model_size = model, processor, scene, model_size
        self.num_expressions = len(expressions)
        self.device, self.dtype = _model_device_dtype(model)
        text = {key: value.to(self.device) for key, value in processor(text=expressions).items()}
        with torch.inference_mode():
            self.words, self.word_mask = model.encode_text(**text)

    def __call__(self, boxes: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, E, h, w) logits and (B, E, h/32, w/32) uncertainty logits of windows `boxes`, on the CPU."""
        model_size = self.model_size
        images = [
            self.scene.read(
                row, col, box_height, box_width, None if (box_height, box_width) == model_size else model_size
            )
            for row, col, box_height, box_width in boxes
        ]
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        num_windows, num_expressions = len(boxes), self.num_expressions
        outputs = self.model(
            pixel_values=pixel_values.to(device=self.device, dtype=self.dtype),
            text_embeddings=(self.words.repeat(num_windows, 1, 1), self.word_mask.repeat(num_windows, 1)),
            image_indices=torch.arange(num_windows, device=self.device).repeat_interleave(num_expressions),
        )
        logits = outputs.logits.float().cpu()
        logits = logits.view(num_windows, num_expressions, *logits.shape[-2:])
        uncertainty = outputs.uncertainty_logits
        if uncertainty is not None:
            uncertainty = uncertainty.float().cpu()
            uncertainty = uncertainty.view(num_windows, num_expressions, *uncertainty.shape[-2:])
        return logits, uncertainty


class _WindowProfiles:
    """The 1-D blending weights ([`window_weights`]) of a scene's windows, computed once per position and side."""

    def __init__(self, window: tuple[int, int], overlap: float, height: int, width: int):
        # Each side fades over the pixels it shares with its neighbour (at least one).
        self.ramps = tuple(max(1, side - max(1, round(side * (1 - overlap)))) for side in window)
        self.height, self.width = height, width
        self._profiles: dict[tuple[int, int, int], np.ndarray] = {}

    def _profile(self, start: int, side: int, length: int, ramp: int) -> np.ndarray:
        key = (start, side, length)
        if key not in self._profiles:
            self._profiles[key] = window_weights(start, side, length, ramp)
        return self._profiles[key]

    def of(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The row and column weights of the window `box` (row, col, h, w)."""
        row, col, box_height, box_width = box
        return (
            self._profile(row, box_height, self.height, self.ramps[0]),
            self._profile(col, box_width, self.width, self.ramps[1]),
        )


def _coarse_pass(runner: _WindowRunner, height: int, width: int, threshold: float) -> _Coarse:
    """
    Segments the whole scene at the model input size; its mask, dilated by `REFINE_MARGIN` coarse pixels, is the
    gate inside which refined windows may replace the coarse logits.
    """
    logits, uncertainty = runner([(0, 0, height, width)])
    positive = logits[0] > _logit(threshold)
    gate = F.max_pool2d(positive[None].float(), 2 * REFINE_MARGIN + 1, stride=1, padding=REFINE_MARGIN)[0] > 0
    return _Coarse(logits[0], None if uncertainty is None else uncertainty[0], gate.bool())


def _blend_windows(
    runner: _WindowRunner,
    boxes: list[tuple[int, int, int, int]],
    accumulator: _SceneAccumulator,
    profiles: _WindowProfiles,
    batch_size: int,
    progress: bool,
) -> None:
    """Runs the windows `boxes`, `batch_size` at a time, and adds each one's weighted logits to `accumulator`."""
    bar = tqdm(total=len(boxes), desc="windows", unit="window", disable=not progress, leave=False)
    for first in range(0, len(boxes), batch_size):
        batch = boxes[first : first + batch_size]
        logits, uncertainty = runner(batch)
        for index, box in enumerate(batch):
            row_weights, col_weights = profiles.of(box)
            accumulator.add(
                box, row_weights, col_weights, logits[index], None if uncertainty is None else uncertainty[index]
            )
        bar.update(len(batch))
    bar.close()


def _uncertainty_grid(
    accumulator: _SceneAccumulator | None, coarse: _Coarse | None, height: int, width: int
) -> torch.Tensor | None:
    """
    The uncertainty logits as a grid (E, h, w) whose bilinear upsampling to (height, width) is the scene's map:
    the coarse pass's own grid, or the blended window grid (with coarse values outside the refined area).
    """
    coarse_grid = None if coarse is None else coarse.uncertainty_logits
    if accumulator is None or accumulator.uncertainty_sum is None:
        return coarse_grid
    covered = accumulator.uncertainty_weight > 0
    grid = accumulator.uncertainty_sum / torch.where(covered, accumulator.uncertainty_weight, 1.0)
    if coarse_grid is None:
        return grid
    rows, cols = accumulator.grid_rows, accumulator.grid_cols
    gate = coarse.gate_at(rows, height, cols, width)
    return torch.where(covered & gate, grid, _resample(coarse_grid, rows, height, cols, width))


def _finalize(
    accumulator: _SceneAccumulator | None,
    coarse: _Coarse | None,
    expressions: list[str],
    height: int,
    width: int,
    threshold: float,
    mode: str,
    num_windows: int,
) -> list[SceneResult]:
    """Normalises the blended logits, merges them with the coarse pass, and thresholds once, block of rows by block."""
    num_expressions = len(expressions)
    probability = np.empty((num_expressions, height, width), dtype=np.float16)
    mask = np.empty((num_expressions, height, width), dtype=bool)
    uncertainty_grid = _uncertainty_grid(accumulator, coarse, height, width)
    uncertainty = None if uncertainty_grid is None else np.empty((num_expressions, height, width), dtype=np.float16)
    inside_sum = torch.zeros(num_expressions, dtype=torch.float64)
    inside_count = torch.zeros(num_expressions, dtype=torch.int64)
    cols = torch.arange(width)
    for start in range(0, height, _FINALIZE_ROWS):
        stop = min(start + _FINALIZE_ROWS, height)
        rows = torch.arange(start, stop)
        logits = None
        if accumulator is not None:
            weights = accumulator.weights(start, stop)
            covered = weights > 0
            logits = torch.from_numpy(accumulator.logit_sum[:, start:stop]) / torch.where(covered, weights, 1.0)
        if coarse is not None:
            coarse_logits = _resample(coarse.logits, rows, height, cols, width)
            if logits is None:
                logits = coarse_logits
            else:
                logits = torch.where(covered & coarse.gate_at(rows, height, cols, width), logits, coarse_logits)
        block_probability = logits.sigmoid()
        block_mask = block_probability > threshold
        probability[:, start:stop] = block_probability.numpy()
        mask[:, start:stop] = block_mask.numpy()
        inside_sum += (block_probability * block_mask).sum(dim=(1, 2), dtype=torch.float64)
        inside_count += block_mask.sum(dim=(1, 2))
        if uncertainty is not None:
            uncertainty[:, start:stop] = _resample(uncertainty_grid, rows, height, cols, width).sigmoid().numpy()
    scores = torch.where(inside_count > 0, inside_sum / inside_count.clamp(min=1), 0.0)
    return [
        SceneResult(
            expression=expression,
            mask=mask[index],
            probability=probability[index],
            uncertainty=None if uncertainty is None else uncertainty[index],
            score=float(scores[index]),
            mode=mode,
            num_windows=num_windows,
        )
        for index, expression in enumerate(expressions)
    ]
