"""
`crobim-u predict`: referring segmentation of image files, folders, list files and GeoTIFF scenes of any size.

For each input and expression it writes a mask, an uncertainty map and an overlay picture, and appends a record to
`results.jsonl`. A file that cannot be read or segmented is recorded as failed and skipped; the others go on. An
optional output (the overlay, the GeoJSON) that fails is recorded in its input's record, beside the outputs written.

Every output file is written to a hidden temporary file and renamed into place, and an input's records are appended
only once all its files are in place: a run killed at any moment leaves no half-written output under a final name,
and `--resume` skips exactly the inputs whose records and files are complete.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from ..image_processing_crobim_u import DEFAULT_THRESHOLD, mask_reliability
from .atomic import atomic_output, remove_partial_outputs
from .geo import (
    DEFAULT_PERCENTILES,
    VECTOR_FORMATS,
    GeoTiffScene,
    check_vector_options,
    is_georeferenced_tiff,
    is_remote,
    mask_to_features,
    parse_crs,
    require_vector_libraries,
    write_features,
    write_mask_geotiff,
    write_uncertainty_geotiff,
)
from .loading import load_checkpoint_or_exit
from .parallel import autocast_model, check_dtype, from_main_process, gather_shares, own_share, process_state
from .tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_WINDOW_BATCH_SIZE,
    ArrayScene,
    SceneReader,
    SceneResult,
    check_tiling_options,
    model_input_size,
    predict_scene,
)
from .visualize import draw_overlay, heatmap


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
# `tile="auto"` tiles a scene when a side exceeds the window by more than this factor; below it, resizing the whole
# image to the model input loses little detail and keeps the global context.
TILE_FACTOR = 1.5
OVERLAY_MAX_SIDE = 2048
# Scene-sized arrays held per pass over a scene (~9 bytes per pixel and expression, see tiling): expressions beyond
# this budget are run in further passes.
MEMORY_BUDGET = 2 * 2**30
BYTES_PER_PIXEL = 9
RESULTS_FILE = "results.jsonl"
# Under several processes each appends its records to its own file, merged into RESULTS_FILE at the end; a killed
# run leaves them for --resume, whatever the number of processes that resumes it.
PROCESS_RESULTS_GLOB = "results.rank-*.jsonl"
# Fast PNG compression: level 6 (Pillow's default) spends several times longer for ~10% smaller files.
PNG_OPTIONS = {"compress_level": 1}
OUTPUT_FIELDS = ("mask", "uncertainty", "overlay", "vector")


@dataclass
class PredictOptions:
    """
    Settings of [`predict_files`]; see `crobim-u predict --help`.

    Attributes:
        tile (`str`): `"auto"` (tile scenes over `TILE_FACTOR` x the window), `"always"` or `"never"` (resize).
        mode (`str`): How to tile: `"tiled"` or `"downsample-refine"`.
        window (`int`, *optional*): Window side in scene pixels; defaults to the model input side.
        overlap (`float`): Overlap of neighbouring windows, a fraction of the window.
        batch_size (`int`): Windows per forward pass.
        threshold (`float`): Probability above which a pixel is in the mask.
        bands (`tuple[int, ...]`, *optional*): 1-based bands of raster inputs.
        percentiles (`tuple[float, float]`): Stretch of non-uint8 raster inputs.
        recursive (`bool`): Whether folder inputs include the images of their subfolders.
        vector_format (`str`, *optional*): Vector output of every input, one of `geo.VECTOR_FORMATS`; by default
            GeoJSON for georeferenced inputs and none for plain images.
        objects (`str`): Vector features: `"mask"` (the whole mask, one feature), `"all"` (one per connected object)
            or `"best"` (the object with the highest score); see [`~geo.mask_to_features`].
        simplify (`float`): Simplification tolerance of the polygons in CRS units (pixels for plain images); 0: none.
        min_area (`float`): Objects of a smaller area (square metres in a metric CRS, pixels for plain images) are
            left out of the vector output.
        dst_crs (`str`, *optional*): CRS (e.g. `"EPSG:3857"`) to which the rasters and vectors of inputs with a CRS
            are reprojected.

    Raises:
        `ValueError`: A setting out of its range, named with the value given, or an unknown CRS.
        `ImportError`: A vector format or `dst_crs` without the `geo` extra installed.
    """

    tile: str = "auto"
    mode: str = "tiled"
    window: int | None = None
    overlap: float = DEFAULT_OVERLAP
    batch_size: int = DEFAULT_WINDOW_BATCH_SIZE
    threshold: float = DEFAULT_THRESHOLD
    bands: tuple[int, ...] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    recursive: bool = False
    vector_format: str | None = None
    objects: str = "mask"
    simplify: float = 0.0
    min_area: float = 0.0
    dst_crs: str | None = None

    def __post_init__(self):
        if self.tile not in ("auto", "always", "never"):
            raise ValueError(f"tile must be 'auto', 'always' or 'never', got {self.tile!r}.")
        window = None if self.window is None else (self.window, self.window)
        check_tiling_options(self.mode, self.overlap, self.batch_size, self.threshold, window=window)
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}.")
        check_vector_options(self.vector_format, self.objects, self.simplify, self.min_area)
        if self.vector_format is not None:
            require_vector_libraries()
        if self.dst_crs is not None:
            parse_crs(self.dst_crs)


def expand_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> list[str]:
    """
    Image paths from `inputs`: files and `http(s)://` URLs as given; folders become their image files (by suffix,
    sorted; with `recursive`, those of every subfolder too, else none of them); `.txt` files are lists of paths or
    folders, one per line (relative to the list's folder; blank lines and lines starting with `#` skipped). Missing
    paths are kept, to be reported as failures.
    """
    paths: list[str] = []
    for item in inputs:
        if is_remote(item):
            paths.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            children = sorted(child for child in (path.rglob("*") if recursive else path.iterdir()) if child.is_file())
            paths.extend(str(child) for child in children if child.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines()]
            entries = [path.parent / line for line in lines if line and not line.startswith("#")]
            paths.extend(expand_inputs([entry for entry in entries if entry.suffix.lower() != ".txt"], recursive))
        else:
            paths.append(str(path))
    return paths


def open_scene(
    path: str | os.PathLike, bands: Sequence[int] | None = None, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> SceneReader:
    """
    Opens an input: TIFFs and URLs with rasterio as a lazy [`GeoTiffScene`] (band choice and stretch apply; a URL is
    read by HTTP range requests, window by window); other images, and plain TIFFs when rasterio is missing, with PIL
    into memory. A URL, or a georeferenced or PIL-unreadable TIFF, without rasterio raises the `ImportError` that names
    the `geo` extra.
    """
    if is_remote(path):
        return GeoTiffScene(path, bands=bands, percentiles=percentiles)
    if Path(path).suffix.lower() in TIFF_SUFFIXES:
        try:
            return GeoTiffScene(path, bands=bands, percentiles=percentiles)
        except ImportError:
            if is_georeferenced_tiff(path):
                raise
    with Image.open(path) as image:
        image.load()
        return ArrayScene(image)


def choose_mode(height: int, width: int, window: tuple[int, int], options: PredictOptions) -> str:
    """The tiling mode for a scene: `options.mode` when tiling applies (see `PredictOptions.tile`), else `"resize"`."""
    if options.tile == "never":
        return "resize"
    if options.tile == "always" or max(height / window[0], width / window[1]) > TILE_FACTOR:
        return options.mode
    return "resize"


def _slug(expression: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", expression.lower()).strip("-")[:40] or "expression"


def _heatmap_image(values: np.ndarray) -> Image.Image:
    """`visualize.heatmap` strip by strip, whose float temporaries would be ~40 bytes per pixel on a whole scene."""
    height, width = values.shape
    canvas = Image.new("RGB", (width, height))
    for start in range(0, height, 512):
        canvas.paste(heatmap(values[start : start + 512]), (0, start))
    return canvas


class _OverlayPicture:
    """
    The scene at most `OVERLAY_MAX_SIDE` pixels on its long side (each side at least 1), read at the first drawing
    and kept for the input's other expressions, and the sampling of full-size maps to its grid.
    """

    def __init__(self, scene: SceneReader):
        self.scene = scene
        height, width = scene.height, scene.width
        scale = max(1.0, max(height, width) / OVERLAY_MAX_SIDE)
        self.shape = None if scale == 1 else (max(1, round(height / scale)), max(1, round(width / scale)))
        self.rows = slice(None) if self.shape is None else np.arange(self.shape[0]) * height // self.shape[0]
        self.cols = slice(None) if self.shape is None else np.arange(self.shape[1]) * width // self.shape[1]

    @functools.cached_property
    def image(self) -> Image.Image:
        return Image.fromarray(self.scene.read(0, 0, self.scene.height, self.scene.width, self.shape))

    def sample(self, values: np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        if self.shape is None:
            return values
        return values[self.rows][:, self.cols]

    def draw(self, result: SceneResult) -> Image.Image:
        """The overlay picture of `result`: its mask on the scene, its uncertainty beside it, the expression above."""
        uncertainty = self.sample(result.uncertainty)
        return draw_overlay(
            self.image,
            self.sample(result.mask),
            None if uncertainty is None else uncertainty.astype(np.float32),
            result.expression,
        )


def _save_png(image: Image.Image, path: str) -> None:
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG", **PNG_OPTIONS)


def _write_atomically(write: Callable[..., Any], path: str, *args: Any) -> Any:
    with atomic_output(path) as temporary:
        return write(temporary, *args)


def _write_optional(record: dict[str, Any], field: str, path: str, write: Callable[[str], Any]) -> Any:
    """
    Writes an optional output with `write(path)`; on failure records the error in `record` instead of raising, so
    that the outputs already written stay listed.
    """
    try:
        written = write(path)
    except Exception as error:  # an optional picture or vector file never costs the input its mask
        record["status"] = "partial"
        message = f"{field}: {type(error).__name__}: {error}"
        record["error"] = message if record["error"] is None else f"{record['error']}; {message}"
        return None
    record[field] = path
    return written


def _write_outputs(
    result: SceneResult,
    scene: SceneReader,
    overlay: _OverlayPicture,
    base: Path,
    record: dict[str, Any],
    options: PredictOptions,
) -> None:
    """
    Writes one result's mask and uncertainty, then its optional outputs (the vector file, by default for
    georeferenced inputs only, and the overlay), and fills `record`: a failed optional output makes it `"partial"`
    with the error named.
    """
    georeferenced = isinstance(scene, GeoTiffScene) and scene.georeferenced
    # Only a scene with a CRS can be reprojected.
    dst_crs = parse_crs(options.dst_crs) if options.dst_crs and georeferenced and scene.crs is not None else None
    if georeferenced:
        record["mask"] = f"{base}_mask.tif"
        _write_atomically(write_mask_geotiff, record["mask"], result.mask, scene.crs, scene.transform, dst_crs)
        if result.uncertainty is not None:
            record["uncertainty"] = f"{base}_uncertainty.tif"
            _write_atomically(
                write_uncertainty_geotiff, record["uncertainty"], result.uncertainty, scene.crs, scene.transform,
                dst_crs,
            )
        output_crs = dst_crs or scene.crs
        record["crs"] = None if output_crs is None else output_crs.to_string()
    else:
        record["mask"] = f"{base}_mask.png"
        _save_png(Image.fromarray(result.mask.view(np.uint8) * np.uint8(255)), record["mask"])
        if result.uncertainty is not None:
            record["uncertainty"] = f"{base}_uncertainty.png"
            _save_png(_heatmap_image(result.uncertainty), record["uncertainty"])
    vector_format = options.vector_format or ("geojson" if georeferenced else None)
    if vector_format is not None:
        record["vector_format"] = vector_format

        def write_vector(path: str) -> int:
            features = mask_to_features(
                result.mask, scene.transform if georeferenced else None, scene.crs if georeferenced else None,
                result.probability, result.uncertainty, objects=options.objects, expression=result.expression,
                source=record["input"], simplify=options.simplify, min_area=options.min_area,
            )
            return write_features(features, path, vector_format, dst_crs)

        record["num_features"] = _write_optional(
            record, "vector", f"{base}_mask{VECTOR_FORMATS[vector_format][1]}", write_vector
        )
    _write_optional(record, "overlay", f"{base}_overlay.png", lambda path: _save_png(overlay.draw(result), path))


def _predict_input(
    path: str,
    stem: str,
    model: Any,
    processor: Any,
    expressions: list[str],
    output_dir: Path,
    options: PredictOptions,
    records: list[dict[str, Any]],
    progress: bool,
) -> None:
    """Segments one input for every expression, appending one record per expression as it is written."""
    with ExitStack() as stack:
        scene = open_scene(path, options.bands, options.percentiles)
        if hasattr(scene, "close"):
            stack.callback(scene.close)
        window = model_input_size(processor) if options.window is None else (options.window, options.window)
        mode = choose_mode(scene.height, scene.width, window, options)
        per_pass = max(1, MEMORY_BUDGET // (BYTES_PER_PIXEL * scene.height * scene.width))
        overlay = _OverlayPicture(scene)
        for first in range(0, len(expressions), per_pass):
            group = expressions[first : first + per_pass]
            start = time.perf_counter()
            results = predict_scene(
                model, processor, scene, group, window=window, overlap=options.overlap,
                batch_size=options.batch_size, mode=mode, threshold=options.threshold, progress=progress,
            )
            seconds = (time.perf_counter() - start) / len(group)
            for index, result in enumerate(results, start=first):
                area = int(np.count_nonzero(result.mask))
                record = _record(path, result.expression, "ok")
                record.update(
                    height=scene.height, width=scene.width, mode=result.mode, num_windows=result.num_windows,
                    score=round(result.score, 6), mask_area=area, mask_fraction=area / result.mask.size,
                    seconds=round(seconds, 3),
                    reliability=None if result.uncertainty is None else round(
                        mask_reliability(result.mask, result.uncertainty), 6
                    ),
                )
                base = output_dir / f"{stem}_{index}_{_slug(result.expression)}"
                _write_outputs(result, scene, overlay, base, record, options)
                records.append(record)
            del results, result  # the next pass allocates its own scene-sized arrays


def _unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`... for inputs of the same name from different folders."""
    name, number = stem, 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}"
    taken.add(name)
    return name


def _record(path: str, expression: str, status: str, error: str | None = None) -> dict[str, Any]:
    return {
        "input": path, "expression": expression, "status": status, "error": error, "mask": None,
        "uncertainty": None, "overlay": None, "vector": None, "score": None, "reliability": None, "mask_area": None,
    }


def _read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a `results.jsonl`; a line a killed run left half-written is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _process_results_file(output_dir: Path, process_index: int) -> Path:
    return output_dir / PROCESS_RESULTS_GLOB.replace("*", str(process_index))


def completed_records(
    output_dir: str | os.PathLike, paths: Sequence[str], expressions: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """
    The inputs of `paths` already done in `output_dir`, each with its records in expression order.

    An input is done when `results.jsonl` or a process's `results.rank-<k>.jsonl` (left by a killed run on several
    processes, whatever their number) holds an `"ok"` record for each of `expressions` and every output file these
    records name exists (outputs are renamed into place only when complete). Inputs that failed, or that a killed run
    left partly written, are not done.
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    files = [Path(output_dir) / RESULTS_FILE, *sorted(Path(output_dir).glob(PROCESS_RESULTS_GLOB))]
    for record in (record for file in files for record in _read_results(file)):
        files = [record.get(field) for field in OUTPUT_FIELDS if record.get(field)]
        if record.get("status") == "ok" and files and all(os.path.isfile(file) for file in files):
            found[(record.get("input"), record.get("expression"))] = record
    done = {}
    for path in paths:
        records = [found.get((path, expression)) for expression in expressions]
        if all(record is not None for record in records):
            done[path] = records
    return done


def check_expressions(processor: Any, expressions: Sequence[str]) -> None:
    """Raises a `ValueError` unless there is an expression and the processor's tokenizer accepts every one."""
    if not expressions:
        raise ValueError("Give at least one expression.")
    processor(text=list(expressions))


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raises a `NotADirectoryError` when `output_dir` exists and is not a folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"{output_dir} is an existing file; the output must be a folder (created if missing).")


def predict_files(
    model: Any,
    processor: Any,
    inputs: Sequence[str | os.PathLike],
    expressions: Sequence[str],
    output_dir: str | os.PathLike,
    options: PredictOptions | None = None,
    progress: bool = True,
    resume: bool = False,
    state: PartialState | None = None,
) -> list[dict[str, Any]]:
    r"""
    Segments every expression in every input and writes the outputs to `output_dir`.

    Per input and expression (files named `<input stem>_<expression index>_<expression slug>_*`):
    - georeferenced rasters: `_mask.tif` (uint8 0/1), `_uncertainty.tif` (float32 in [0, 1]), both Cloud-Optimized
      GeoTIFFs with the input's CRS and transform (or reprojected to `options.dst_crs`);
    - other images: `_mask.png` (0/255) and `_uncertainty.png` (a heatmap, dark blue 0 to yellow 1);
    - `_mask.<ext>`: the vector features (see [`~geo.mask_to_features`], [`~geo.write_features`]) in
      `options.vector_format`; by default RFC 7946 GeoJSON for georeferenced rasters and none for other images;
    - `_overlay.png`: the mask on the image beside the uncertainty, at most `OVERLAY_MAX_SIDE` pixels high.
    One JSON line per input and expression goes to `results.jsonl`: input, expression, status (`"ok"`; `"partial"`
    when the mask and uncertainty were written but an optional output failed; `"error"`), error, output paths
    (`None` for those not written), score, reliability (see [`~crobim_u.image_processing_crobim_u.mask_reliability`];
    `None` for a model without RUS), mask area (pixels) and fraction, size, mode, window count, seconds, and
    for vector outputs their format and feature count, for georeferenced rasters the output CRS.

    Each file is written under a temporary name and renamed into place when complete, and an input's records are
    appended once all its files are in place, so a killed run never leaves a half-written output that counts as done.

    With a `state` of several processes, each process segments a contiguous share of the inputs still to do and
    appends its records to its own `results.rank-<k>.jsonl`; at the end the main process writes `results.jsonl` in
    input order, as one process would, and removes those files. Output names are settled over every input first, so
    the files are those of a one-process run.

    Args:
        model ([`CrobimUForReferringSegmentation`]): The model, in eval mode.
        processor ([`CrobimUProcessor`]): Its processor.
        inputs (`Sequence[str]`): Files, folders or list files (see [`expand_inputs`]).
        expressions (`Sequence[str]`): Referring expressions, each applied to every input.
        output_dir (`str` or `os.PathLike`): Output folder, created if needed.
        options ([`PredictOptions`], *optional*): Tiling, band and threshold settings.
        progress (`bool`, *optional*, defaults to `True`): Show progress bars.
        resume (`bool`, *optional*, defaults to `False`): Skip the inputs an earlier run into `output_dir` completed
            (see [`completed_records`]) and keep their records; the others are segmented again. Without it,
            `results.jsonl` starts afresh.
        state (`accelerate.PartialState`, *optional*): The processes to share the inputs between (see
            [`~crobim_u.inference.parallel.process_state`]); every one of them must call this function with the same
            arguments. By default this process does everything.

    Returns:
        `list[dict]`: The records written to `results.jsonl`, in input order (the same list on every process).

    Raises:
        `ValueError`: No expression, or one the processor refuses (empty, whitespace only), before any input is read.
        `NotADirectoryError`: `output_dir` is an existing file.
    """
    options = options or PredictOptions()
    expressions = list(expressions)
    check_expressions(processor, expressions)
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    is_main = state is None or state.is_main_process
    several = state is not None and state.num_processes > 1
    paths: list[str] = []
    done: dict[str, list[dict[str, Any]]] = {}
    if is_main:
        remove_partial_outputs(output_dir)
        paths = expand_inputs(inputs, options.recursive)
        done = completed_records(output_dir, paths, expressions) if resume else {}
        if done and progress:
            tqdm.write(f"resume: {len(done)} of {len(paths)} inputs already done in {output_dir}, skipped")
        # The records kept from the earlier run replace results.jsonl in one rename, then the processes' files they
        # came from go (a kill in between leaves copies, which resume reads as one). New records are appended.
        with atomic_output(output_dir / RESULTS_FILE) as temporary, open(temporary, "w") as results_file:
            results_file.writelines(json.dumps(record) + "\n" for path in paths for record in done.get(path, []))
        for file in output_dir.glob(PROCESS_RESULTS_GLOB):
            file.unlink(missing_ok=True)
    # Every process shares out the main process's list (a folder may change while the processes start); the others
    # wait here until the main process has put the earlier records in place.
    paths, done = from_main_process([paths, done], state)
    # Every input takes its name, done or not, in input order; a URL's name is that of its path.
    stems: set[str] = set()
    names = [
        _unique_stem(Path(urlsplit(path).path if is_remote(path) else path).stem or "input", stems) for path in paths
    ]
    pending = own_share([index for index, path in enumerate(paths) if path not in done], state)
    own_file = _process_results_file(output_dir, state.process_index) if several else output_dir / RESULTS_FILE
    new_records: list[tuple[int, list[dict[str, Any]]]] = []
    with open(own_file, "a") as results_file:
        for index in tqdm(pending, desc="predict", unit="input", disable=not progress or not is_main):
            path = paths[index]
            input_records: list[dict[str, Any]] = []
            try:
                _predict_input(
                    path, names[index], model, processor, expressions, output_dir, options, input_records, progress
                )
            except Exception as error:  # a bad input is reported and skipped, the others go on
                message = f"{type(error).__name__}: {error}"
                done_expressions = {record["expression"] for record in input_records}
                input_records += [
                    _record(path, expression, "error", message)
                    for expression in expressions
                    if expression not in done_expressions
                ]
            for record in input_records:
                results_file.write(json.dumps(record) + "\n")
            results_file.flush()
            new_records.append((index, input_records))
    new = dict(gather_shares(new_records, state))
    records = [record for index, path in enumerate(paths) for record in done.get(path) or new[index]]
    if is_main and (done or several):
        # In input order, as an uninterrupted one-process run writes it: kept and new records were written apart.
        with atomic_output(output_dir / RESULTS_FILE) as temporary, open(temporary, "w") as results_file:
            results_file.writelines(json.dumps(record) + "\n" for record in records)
        for file in output_dir.glob(PROCESS_RESULTS_GLOB):
            file.unlink(missing_ok=True)
    if several:
        state.wait_for_everyone()  # results.jsonl is complete when any process returns
    return records


def predict_command(args: argparse.Namespace) -> int:
    """Runs `crobim-u predict` (its parser is built in `crobim_u.cli`)."""
    # Every argument is checked before the model loads, so a bad one costs one message, not one per input.
    try:
        options = PredictOptions(
            tile=args.tile, mode=args.mode, window=args.window, overlap=args.overlap, batch_size=args.batch_size,
            threshold=args.threshold, bands=args.bands, percentiles=args.stretch, recursive=args.recursive,
            vector_format=args.vector_format, objects=args.objects, simplify=args.simplify, min_area=args.min_area,
            dst_crs=args.dst_crs,
        )
        for index, expression in enumerate(args.expression):
            if not expression.strip():
                raise ValueError(f"--expression number {index + 1} is empty; a referring expression needs words.")
        check_output_dir(args.output_dir)
        # Under `accelerate launch` / `torchrun` this joins the other processes; alone, it is a state of one.
        state, device = process_state(args.device)
        dtype = check_dtype(args.dtype, device)
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None
    if not expand_inputs(args.inputs, args.recursive):
        message = [f"error: no input images found in {', '.join(args.inputs)}",
                   f"(image suffixes: {', '.join(IMAGE_SUFFIXES)})."]
        if not args.recursive:
            message.append("Subfolders of folder inputs are not searched; add --recursive to include them.")
        raise SystemExit(" ".join(message))
    model, processor = load_checkpoint_or_exit(args.model, device)
    try:
        check_expressions(processor, args.expression)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    records = predict_files(
        autocast_model(model, dtype), processor, args.inputs, args.expression, args.output_dir, options, args.progress,
        resume=args.resume, state=state,
    )
    problems: dict[str, dict[str, Any]] = {}  # per input, its first failed record, else its first partial one
    for record in records:
        earlier = problems.get(record["input"])
        if record["status"] != "ok" and (earlier is None or earlier["status"] == "partial" != record["status"]):
            problems[record["input"]] = record
    failed = [path for path, record in problems.items() if record["status"] == "error"]
    inputs = list(dict.fromkeys(record["input"] for record in records))
    if not state.is_main_process:  # every process has every record (the same exit status); one prints them
        return 1 if problems else 0
    print(
        f"{len(inputs)} inputs x {len(args.expression)} expressions: {len(inputs) - len(problems)} inputs done, "
        f"{len(problems) - len(failed)} partly done, {len(failed)} failed; results in "
        f"{Path(args.output_dir) / RESULTS_FILE}"
    )
    for path, record in problems.items():
        print(f"{'FAILED' if record['status'] == 'error' else 'PARTIAL'} {path}: {record['error']}")
    return 1 if problems else 0


__all__ = [
    "PredictOptions", "check_expressions", "check_output_dir", "choose_mode", "completed_records",
    "expand_inputs", "open_scene", "predict_command", "predict_files",
]
