"""
GeoTIFF input and output through rasterio (the optional `geo` extra: `pip install "crobim-u[geo]"`).

- [`GeoTiffScene`] reads a raster window by window (a [`~crobim_u.inference.tiling.SceneReader`]), picks the RGB
  bands, and brings them to 8 bits: uint8 bands as they are; any other dtype (uint16, int16, float32, ...) by a
  per-band percentile stretch, `round(255 * clip((v - p_low) / (p_high - p_low), 0, 1))`, with `p_low`, `p_high` the
  2nd and 98th percentiles (by default) of the band's valid pixels on a decimated read of at most
  `STATISTICS_SIDE` pixels on the long side (GDAL uses the file's overviews when it has them). Nodata, masked and
  non-finite pixels become 0, the no-data colour the image processor also uses.
- [`write_mask_geotiff`] and [`write_uncertainty_geotiff`] write single-band tiled, deflate-compressed GeoTIFFs with
  the input's CRS and transform, strip by strip: the mask as uint8 **0/1** (raster algebra and area counts work on
  it directly; the PNG masks of plain images are 0/255 for viewing), the uncertainty as float32 in [0, 1].
- [`mask_to_geojson`] writes the mask as polygons in the input CRS.

rasterio is imported only when one of these is used, so the rest of the package works without it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
from PIL import Image


GEO_EXTRA_HINT = 'pip install "crobim-u[geo]"'
# Long side of the decimated read on which the stretch percentiles are computed: ~1M pixels per band.
STATISTICS_SIDE = 1024
# GDAL's block cache defaults to 5% of RAM; a row of windows needs far less, and the cache counts in the RSS.
GDAL_CACHE_BYTES = 256 * 2**20
# Mask pixels above which polygons are traced on a decimated mask, to bound memory and output size.
MAX_POLYGON_PIXELS = 4096 * 4096
_WRITE_ROWS = 512
# TIFF tags that make a TIFF georeferenced: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)


def require_rasterio() -> Any:
    """Returns the `rasterio` module, or raises an `ImportError` naming the extra that installs it."""
    try:
        import rasterio
        import rasterio.enums
        import rasterio.errors
        import rasterio.features
        import rasterio.windows
    except ImportError as error:
        raise ImportError(
            f"GeoTIFF input and output need rasterio, which is not installed: {GEO_EXTRA_HINT}"
        ) from error
    return rasterio


def is_georeferenced_tiff(path: str | os.PathLike) -> bool:
    """
    Whether `path` is a TIFF carrying GeoTIFF tags, or one that PIL cannot read (multi-band, 16-bit...), i.e. one that
    needs rasterio. Checked with PIL only, so it works without the `geo` extra.
    """
    try:
        with Image.open(path) as image:
            tags = getattr(image, "tag_v2", {})
            return any(tag in tags for tag in _GEOTIFF_TAGS)
    except (OSError, ValueError):
        return True


def stretch_to_uint8(bands: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """
    Linearly maps each band of a `(C, H, W)` array from `[low[c], high[c]]` to 0-255 (clipped, rounded) as uint8.
    A band with `high <= low` (a constant band) maps to 0 up to `low` and 255 above it.
    """
    low = np.asarray(low, dtype=np.float32).reshape(-1, 1, 1)
    span = np.asarray(high, dtype=np.float32).reshape(-1, 1, 1) - low
    scaled = (bands.astype(np.float32) - low) / np.where(span > 0, span, np.float32(1e-12))
    return np.rint(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255).astype(np.uint8)


class GeoTiffScene:
    r"""
    A GeoTIFF (or any raster GDAL reads) as a [`~crobim_u.inference.tiling.SceneReader`]: RGB uint8 windows on demand.

    Args:
        path (`str` or `os.PathLike`):
            The raster file.
        bands (`Sequence[int]`, *optional*):
            1-based band numbers, as in GDAL: three for red, green, blue (e.g. `(3, 2, 1)`) or one for greyscale.
            Default: the bands whose colour interpretation is red, green and blue; else bands 1, 2, 3 of a 3-band
            raster, band 1 of a 1-band raster; other band counts must be chosen.
        percentiles (`tuple[float, float]`, *optional*, defaults to `(2.0, 98.0)`):
            Percentiles mapped to 0 and 255 by the stretch of non-uint8 bands.

    Attributes:
        height, width (`int`): Raster size. crs, transform: The raster's CRS (or `None`) and affine transform.
        georeferenced (`bool`): Whether it has a CRS or a non-identity transform.
        stretch (`tuple[list[float], list[float]]` or `None`): Per-band low and high values of the stretch; `None`
            for uint8 bands.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        bands: Sequence[int] | None = None,
        percentiles: tuple[float, float] = (2.0, 98.0),
    ):
        rasterio = require_rasterio()
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")
        self.path = os.fspath(path)
        self._stack = ExitStack()
        self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.dataset = self._stack.enter_context(rasterio.open(self.path))
        dataset = self.dataset
        self.height, self.width = dataset.height, dataset.width
        self.crs, self.transform = dataset.crs, dataset.transform
        self.georeferenced = self.crs is not None or not self.transform.is_identity
        self.bands = _choose_bands(dataset, bands, self.path)
        dtypes = {dataset.dtypes[band - 1] for band in self.bands}
        self.stretch = None if dtypes == {"uint8"} else self._stretch_limits(percentiles)

    def _stretch_limits(self, percentiles: tuple[float, float]) -> tuple[list[float], list[float]]:
        """Per-band percentiles of the valid pixels on a decimated (nearest-neighbour, so unblended) read."""
        rasterio = require_rasterio()
        scale = max(1.0, max(self.height, self.width) / STATISTICS_SIDE)
        shape = (len(self.bands), max(1, round(self.height / scale)), max(1, round(self.width / scale)))
        data = self.dataset.read(
            self.bands, out_shape=shape, resampling=rasterio.enums.Resampling.nearest, masked=True
        )
        low, high = [], []
        for band in data:
            values = band.compressed()
            values = values[np.isfinite(values)]
            limits = np.percentile(values, percentiles) if values.size else (0.0, 1.0)
            low.append(float(limits[0]))
            high.append(float(limits[1]))
        return low, high

    def read(
        self, row_off: int, col_off: int, height: int, width: int, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """The window as `(h, w, 3)` uint8 RGB, averaged down to `out_shape` when given."""
        rasterio = require_rasterio()
        window = rasterio.windows.Window(col_off, row_off, width, height)
        shape = None if out_shape is None else (len(self.bands), *out_shape)
        resampling = rasterio.enums.Resampling.average if out_shape is not None else rasterio.enums.Resampling.nearest
        data = self.dataset.read(self.bands, window=window, out_shape=shape, resampling=resampling, masked=True)
        invalid = np.ma.getmaskarray(data).any(axis=0)
        values = data.filled(0)
        if values.dtype.kind == "f":
            invalid |= ~np.isfinite(values).all(axis=0)
        pixels = values.astype(np.uint8) if self.stretch is None else stretch_to_uint8(values, *self.stretch)
        pixels[:, invalid] = 0
        pixels = np.moveaxis(pixels, 0, -1)
        return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else np.ascontiguousarray(pixels)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> GeoTiffScene:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _choose_bands(dataset: Any, bands: Sequence[int] | None, path: str) -> tuple[int, ...]:
    ColorInterp = require_rasterio().enums.ColorInterp
    count = dataset.count
    if bands is not None:
        bands = tuple(int(band) for band in bands)
        if len(bands) not in (1, 3) or not all(1 <= band <= count for band in bands):
            raise ValueError(
                f"{path}: bands must be 1 or 3 band numbers in 1..{count} (1-based, as in GDAL), got {list(bands)}."
            )
        return bands
    if count == 1:
        return (1,)
    interpretation = list(dataset.colorinterp)
    rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    if all(colour in interpretation for colour in rgb):
        return tuple(interpretation.index(colour) + 1 for colour in rgb)
    if count == 3:
        return (1, 2, 3)
    raise ValueError(
        f"{path} has {count} bands without a red/green/blue colour interpretation; choose the RGB bands (1-based, "
        "as in GDAL), e.g. --bands 4,3,2 for Sentinel-2 or bands=(4, 3, 2) in Python."
    )


def _write_band(
    path: str | os.PathLike, array: np.ndarray, dtype: str, crs: Any, transform: Any, convert: Any
) -> None:
    """Writes a single-band tiled, compressed GeoTIFF strip by strip, converting each strip with `convert`."""
    rasterio = require_rasterio()
    height, width = array.shape
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3 if dtype.startswith("float") else 2,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as destination:
            for start in range(0, height, _WRITE_ROWS):
                stop = min(start + _WRITE_ROWS, height)
                window = rasterio.windows.Window(0, start, width, stop - start)
                destination.write(convert(array[start:stop])[None], window=window)


def write_mask_geotiff(path: str | os.PathLike, mask: np.ndarray, crs: Any, transform: Any) -> None:
    """Writes a boolean `(H, W)` mask as a uint8 0/1 GeoTIFF with the given CRS and affine transform."""
    _write_band(path, mask, "uint8", crs, transform, lambda strip: strip.astype(np.uint8))


def write_uncertainty_geotiff(path: str | os.PathLike, uncertainty: np.ndarray, crs: Any, transform: Any) -> None:
    """Writes an `(H, W)` uncertainty map in [0, 1] as a float32 GeoTIFF with the given CRS and affine transform."""
    _write_band(path, uncertainty, "float32", crs, transform, lambda strip: strip.astype(np.float32))


def _decimate(mask: np.ndarray, factor: int) -> np.ndarray:
    """Cells of `factor` x `factor` pixels (partial at the far edges) that are at least half foreground."""
    height, width = mask.shape
    col_starts = np.arange(0, width, factor)
    col_sizes = np.minimum(col_starts + factor, width) - col_starts
    cells = np.empty((math.ceil(height / factor), len(col_starts)), dtype=bool)
    for index, start in enumerate(range(0, height, factor)):
        rows = mask[start : start + factor]
        counts = np.add.reduceat(rows.sum(axis=0, dtype=np.int64), col_starts)
        cells[index] = 2 * counts >= rows.shape[0] * col_sizes
    return cells


def _apply(transform: Any, pixels: np.ndarray) -> np.ndarray:
    """Maps `(N, 2)` pixel (col, row) coordinates through an affine transform to `(N, 2)` CRS (x, y)."""
    col, row = pixels[:, 0], pixels[:, 1]
    return np.stack([transform.a * col + transform.b * row + transform.c,
                     transform.d * col + transform.e * row + transform.f], axis=1)


def mask_to_geojson(
    path: str | os.PathLike,
    mask: np.ndarray,
    transform: Any,
    crs: Any = None,
    properties: dict[str, Any] | None = None,
    max_pixels: int = MAX_POLYGON_PIXELS,
) -> int:
    r"""
    Writes the foreground of a mask as a GeoJSON FeatureCollection of polygons in the raster's CRS.

    Masks over `max_pixels` are traced on a decimated copy (cells of `f` x `f` pixels that are at least half
    foreground, `f` the smallest factor that brings the mask under `max_pixels`), so memory and file size stay
    bounded; the outline is then accurate to `f` pixels. Vertices are clamped to the raster's extent, so every polygon
    lies inside the scene bounds. Features are written one at a time.

    The coordinates are in the raster's CRS, not WGS 84 as RFC 7946 prescribes; the CRS is named in the legacy
    `"crs"` member, which GDAL and QGIS read.

    Args:
        path (`str` or `os.PathLike`): Output file.
        mask (`np.ndarray` of shape `(H, W)`): Boolean mask.
        transform (`affine.Affine`): Pixel-to-CRS transform of the raster.
        crs (`rasterio.crs.CRS`, *optional*): The raster's CRS, named in the file.
        properties (`dict`, *optional*): Properties given to every feature.
        max_pixels (`int`, *optional*, defaults to `MAX_POLYGON_PIXELS`): Largest mask traced at full resolution.

    Returns:
        `int`: The number of polygons written.
    """
    rasterio = require_rasterio()
    from affine import Affine

    height, width = mask.shape
    factor = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    cells = mask if factor == 1 else _decimate(mask, factor)
    properties = dict(properties or {})
    collection: dict[str, Any] = {"type": "FeatureCollection"}
    if crs is not None:
        collection["crs"] = {"type": "name", "properties": {"name": crs.to_string()}}
    header = json.dumps(collection)[:-1]
    count = 0
    with open(path, "w") as file:
        file.write(header + ', "features": [')
        shapes = rasterio.features.shapes(
            cells.astype(np.uint8), mask=cells, connectivity=8, transform=Affine.scale(factor)
        )
        for geometry, _ in shapes:
            rings = []
            for ring in geometry["coordinates"]:
                pixels = np.asarray(ring, dtype=np.float64)
                pixels[:, 0] = np.clip(pixels[:, 0], 0, width)
                pixels[:, 1] = np.clip(pixels[:, 1], 0, height)
                rings.append(_apply(transform, pixels).tolist())
            geometry = {"type": "Polygon", "coordinates": rings}
            feature = {"type": "Feature", "properties": properties, "geometry": geometry}
            file.write((", " if count else "") + json.dumps(feature))
            count += 1
        file.write("]}\n")
    return count


__all__ = [
    "GEO_EXTRA_HINT",
    "GeoTiffScene",
    "is_georeferenced_tiff",
    "mask_to_geojson",
    "require_rasterio",
    "stretch_to_uint8",
    "write_mask_geotiff",
    "write_uncertainty_geotiff",
]
