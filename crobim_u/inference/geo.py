"""
GeoTIFF input and output through rasterio (the optional `geo` extra: `pip install "crobim-u[geo]"`).

- [`GeoTiffScene`] reads a raster window by window (a [`~crobim_u.inference.tiling.SceneReader`]), picks the RGB
  bands, and brings them to 8 bits: uint8 bands as they are; any other dtype (uint16, int16, float32, ...) by a
  per-band percentile stretch, `round(255 * clip((v - p_low) / (p_high - p_low), 0, 1))`, with `p_low`, `p_high` the
  2nd and 98th percentiles (by default) of the band's valid pixels on a decimated read of at most
  `STATISTICS_SIDE` pixels on the long side (GDAL uses the file's overviews when it has them). Nodata, masked and
  non-finite pixels become 0, the no-data colour the image processor also uses.
  Inputs may be `https://` URLs, read through GDAL's `/vsicurl/` by HTTP range requests, window by window.
- [`write_mask_geotiff`] and [`write_uncertainty_geotiff`] write single-band Cloud-Optimized GeoTIFFs (GDAL's COG
  driver: 256-pixel tiles, deflate, overviews, a nodata value) with the input's CRS and transform, or reprojected to
  another CRS: the mask as uint8 **0/1** (raster algebra and area counts work on it directly; the PNG masks of plain
  images are 0/255 for viewing), the uncertainty as float32 in [0, 1].
- [`mask_to_features`] turns a mask, its probabilities and uncertainty, a transform and a CRS into polygon features
  with attributes (a `geopandas.GeoDataFrame`: the whole mask, every object, or the best one); [`write_features`]
  writes them as GeoJSON (RFC 7946), GeoPackage, Shapefile or GeoParquet.

rasterio (and geopandas, shapely, pyproj for vectors) are imported only when one of these is used, so the rest of the
package works without them.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


GEO_EXTRA_HINT = 'pip install "crobim-u[geo]"'
# Percentiles mapped to 0 and 255 by the stretch of non-uint8 bands: the default of [`GeoTiffScene`] and
# `crobim-u predict --stretch`.
DEFAULT_PERCENTILES = (2.0, 98.0)
# Long side of the decimated read on which the stretch percentiles are computed: ~1M pixels per band.
STATISTICS_SIDE = 1024
# GDAL's block cache defaults to 5% of RAM; a row of windows needs far less, and the cache counts in the RSS.
GDAL_CACHE_BYTES = 256 * 2**20
# Mask pixels above which polygons are traced on a decimated mask, to bound memory and output size.
MAX_POLYGON_PIXELS = 4096 * 4096
_WRITE_ROWS = 512
# The mask GeoTIFF's nodata value: pixels outside the scene after a reprojection (0 and 1 are background, object).
MASK_NODATA = 255
VECTOR_FORMATS = {
    "geojson": ("GeoJSON", ".geojson"),
    "gpkg": ("GPKG", ".gpkg"),
    "shp": ("ESRI Shapefile", ".shp"),
    "parquet": ("GeoParquet", ".parquet"),
}
OBJECT_MODES = ("mask", "all", "best")
# Shapefile field names have at most 10 characters.
SHAPEFILE_FIELD_NAMES = {"uncertainty_mean": "unc_mean", "uncertainty_max": "unc_max"}
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


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an `http://` or `https://` URL (read through GDAL's `/vsicurl/`)."""
    return isinstance(path, str) and path.startswith(("http://", "https://"))


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
            The raster file, or an `https://` URL of one (read by range requests, window by window).
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
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    ):
        rasterio = require_rasterio()
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")
        self.path = os.fspath(path)
        self._stack = ExitStack()
        # For URLs: no listing of the remote folder for sidecar files, one request per range read.
        remote = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"} if is_remote(path) else {}
        self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES, **remote))
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


def parse_crs(text: str) -> Any:
    """A `rasterio.crs.CRS` from `EPSG:XXXX`, WKT or a PROJ string; a `ValueError` naming `text` if none matches."""
    rasterio = require_rasterio()
    import rasterio.crs

    try:
        return rasterio.crs.CRS.from_user_input(text)
    except rasterio.errors.CRSError as error:
        raise ValueError(f"Unknown CRS {text!r} ({error}); expected e.g. EPSG:4326 or EPSG:32633.") from None


def _raster_copy_options(dtype: str) -> dict[str, Any]:
    """Creation options of GDAL's COG driver: 256-pixel tiles, deflate, overviews, the nodata value kept."""
    is_float = dtype.startswith("float")
    return {
        "driver": "COG",
        "blocksize": 256,
        "compress": "DEFLATE",
        "predictor": "FLOATING_POINT" if is_float else "STANDARD",
        # Overviews: the mask's 0/1 stay 0/1 (nearest); the uncertainty is averaged.
        "overview_resampling": "AVERAGE" if is_float else "NEAREST",
        "bigtiff": "IF_SAFER",
    }


def _write_band(
    path: str | os.PathLike,
    array: np.ndarray,
    dtype: str,
    crs: Any,
    transform: Any,
    nodata: float,
    dst_crs: Any = None,
) -> None:
    """
    Writes a single-band Cloud-Optimized GeoTIFF: strip by strip into a tiled GeoTIFF beside `path`, then copied by
    GDAL's COG driver (which adds the overviews), through a warped view when `dst_crs` reprojects it.
    """
    rasterio = require_rasterio()
    import rasterio.shutil
    import rasterio.vrt

    height, width = array.shape
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": dtype, "crs": crs,
        "transform": transform, "nodata": nodata, "tiled": True, "blockxsize": 256, "blockysize": 256,
        "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }
    strips = f"{os.fspath(path)}.strips.tif"
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(strips, "w", **profile) as destination:
                for start in range(0, height, _WRITE_ROWS):
                    stop = min(start + _WRITE_ROWS, height)
                    window = rasterio.windows.Window(0, start, width, stop - start)
                    destination.write(array[start:stop].astype(dtype)[None], window=window)
            with rasterio.open(strips) as source, ExitStack() as stack:
                if dst_crs is not None:
                    resampling = rasterio.enums.Resampling.bilinear if dtype.startswith("float") else (
                        rasterio.enums.Resampling.nearest
                    )
                    source = stack.enter_context(
                        rasterio.vrt.WarpedVRT(source, crs=dst_crs, resampling=resampling, nodata=nodata)
                    )
                rasterio.shutil.copy(source, path, **_raster_copy_options(dtype))
    finally:
        if os.path.exists(strips):
            os.remove(strips)


def write_mask_geotiff(
    path: str | os.PathLike, mask: np.ndarray, crs: Any, transform: Any, dst_crs: Any = None
) -> None:
    """
    Writes a boolean `(H, W)` mask as a uint8 0/1 Cloud-Optimized GeoTIFF (nodata `MASK_NODATA`, met only outside the
    scene after a reprojection) with the given CRS and affine transform, reprojected to `dst_crs` when given.
    """
    _write_band(path, mask, "uint8", crs, transform, MASK_NODATA, dst_crs)


def write_uncertainty_geotiff(
    path: str | os.PathLike, uncertainty: np.ndarray, crs: Any, transform: Any, dst_crs: Any = None
) -> None:
    """
    Writes an `(H, W)` uncertainty map in [0, 1] as a float32 Cloud-Optimized GeoTIFF (nodata NaN) with the given CRS
    and affine transform, reprojected to `dst_crs` when given.
    """
    _write_band(path, uncertainty, "float32", crs, transform, float("nan"), dst_crs)


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


def require_vector_libraries() -> Any:
    """Returns the `geopandas` module (with shapely 2 and pyproj), or raises an `ImportError` naming the `geo` extra."""
    try:
        import geopandas
        import pyproj  # noqa: F401
        import shapely
    except ImportError as error:
        raise ImportError(
            f"Vector outputs need geopandas, shapely and pyproj, which are not installed: {GEO_EXTRA_HINT}"
        ) from error
    if int(shapely.__version__.split(".")[0]) < 2:
        raise ImportError(f"Vector outputs need shapely 2 (found {shapely.__version__}): {GEO_EXTRA_HINT}")
    return geopandas


def _per_object_statistics(
    labels: np.ndarray, values: np.ndarray | None, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and maximum of `values` over each label 1..count (NaN where `values` is `None`)."""
    if values is None:
        empty = np.full(count, np.nan)
        return empty, empty.copy()
    inside = labels > 0
    ids, samples = labels[inside], values[inside].astype(np.float64)
    sums = np.bincount(ids, weights=samples, minlength=count + 1)[1:]
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    maxima = np.full(count + 1, -np.inf)
    np.maximum.at(maxima, ids, samples)
    return sums / np.maximum(sizes, 1), maxima[1:]


def _area_unit(crs: Any) -> str:
    if crs is None:
        return "pixel"
    if crs.is_geographic:
        return "m2"  # geodesic area on the CRS's ellipsoid
    unit = crs.linear_units
    return "m2" if unit in ("metre", "meter", "m") else f"{unit}^2"


def _areas(geometries: Any, crs: Any) -> np.ndarray:
    """Areas of polygons in CRS units squared; geodesic square metres for a geographic CRS."""
    import shapely

    if crs is None or not crs.is_geographic:
        return shapely.area(geometries)
    import pyproj

    geod = pyproj.CRS.from_user_input(crs.to_wkt()).get_geod()
    return np.array([abs(geod.geometry_area_perimeter(geometry)[0]) for geometry in geometries])


def check_vector_options(
    vector_format: str | None = None, objects: str = "mask", simplify: float = 0.0, min_area: float = 0.0
) -> None:
    """Raises a `ValueError` naming the first of these settings of the vector output that is not valid."""
    if vector_format is not None and vector_format not in VECTOR_FORMATS:
        raise ValueError(f"Unknown vector format {vector_format!r}; expected one of {', '.join(VECTOR_FORMATS)}.")
    if objects not in OBJECT_MODES:
        raise ValueError(f"objects must be one of {', '.join(OBJECT_MODES)}, got {objects!r}.")
    if simplify < 0:
        raise ValueError(f"The simplify tolerance must be >= 0 (CRS units), got {simplify}.")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}.")


def mask_to_features(
    mask: np.ndarray,
    transform: Any = None,
    crs: Any = None,
    probability: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    objects: str = "mask",
    expression: str = "",
    source: str = "",
    simplify: float = 0.0,
    min_area: float = 0.0,
    max_pixels: int = MAX_POLYGON_PIXELS,
) -> Any:
    r"""
    Turns a mask into polygon features with attributes, in the raster's CRS.

    The mask's 8-connected objects are traced along pixel edges (`rasterio.features.shapes`); each object keeps its
    holes. Masks over `max_pixels` are traced on a decimated copy (cells of `f` x `f` pixels that are at least half
    foreground, `f` the smallest factor that brings the mask under `max_pixels`), and their statistics read the maps
    at the cells' centres; vertices are clamped to the raster's extent.

    Args:
        mask (`np.ndarray` of shape `(H, W)`): Boolean mask.
        transform (`affine.Affine`, *optional*): Pixel-to-CRS transform; the identity (pixel coordinates: x the
            column, y the row) when `None`.
        crs (`rasterio.crs.CRS`, *optional*): The raster's CRS; `None` for a plain image.
        probability (`np.ndarray` of shape `(H, W)`, *optional*): Probabilities, for `score`.
        uncertainty (`np.ndarray` of shape `(H, W)`, *optional*): Uncertainty in [0, 1], for `uncertainty_mean` and
            `uncertainty_max`.
        objects (`str`, *optional*, defaults to `"mask"`): `"mask"`: one feature, the whole mask (a MultiPolygon);
            `"all"`: one Polygon feature per object; `"best"`: only the object with the highest `score` (the largest
            among equal scores), which is what "the" in a referring expression asks for.
        expression (`str`, *optional*): Stored in every feature.
        source (`str`, *optional*): The input file, stored in every feature.
        simplify (`float`, *optional*, defaults to 0): Douglas-Peucker tolerance in CRS units (pixels for a plain
            image) with topology kept (`shapely.simplify(..., preserve_topology=True)`: every polygon stays valid); 0
            keeps the pixel outline.
        min_area (`float`, *optional*, defaults to 0): Objects with a smaller `area` are dropped (before `"best"`
            picks one, and from the whole mask).
        max_pixels (`int`, *optional*, defaults to `MAX_POLYGON_PIXELS`): Largest mask traced at full resolution.

    Returns:
        `geopandas.GeoDataFrame` in `crs`, one row per feature: `object_id` (int, 1-based in row-major order of the
        objects), `expression`, `source`, `area` (float, of the unsimplified outline: square metres for a projected
        CRS in metres and, geodesic, for a geographic one; CRS units squared for other units; pixels for a plain
        image), `area_unit` (`"m2"`, `"<unit>^2"` or `"pixel"`), `score` (mean probability inside), `uncertainty_mean`
        and `uncertainty_max` (each NaN without its map), `geometry`.

    Raises:
        `ValueError`: An unknown `objects`, or a negative `simplify` or `min_area`.
    """
    geopandas = require_vector_libraries()
    rasterio = require_rasterio()
    import shapely
    from affine import Affine

    check_vector_options(objects=objects, simplify=simplify, min_area=min_area)
    transform = Affine.identity() if transform is None else transform
    height, width = mask.shape
    factor = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    cells = mask if factor == 1 else _decimate(mask, factor)
    outlines = [
        shapely.geometry.shape(geometry)
        for geometry, _ in rasterio.features.shapes(cells.astype(np.uint8), mask=cells, connectivity=8)
    ]
    count = len(outlines)
    labels = np.zeros(cells.shape, np.int32)
    if count:
        labels = rasterio.features.rasterize(
            zip(outlines, range(1, count + 1)), out_shape=cells.shape, dtype="int32"
        )

    def sample(values: np.ndarray | None) -> np.ndarray | None:
        if values is None or factor == 1:
            return values
        rows = np.minimum(np.arange(cells.shape[0]) * factor + factor // 2, height - 1)
        cols = np.minimum(np.arange(cells.shape[1]) * factor + factor // 2, width - 1)
        return values[rows][:, cols]

    score, _ = _per_object_statistics(labels, sample(probability), count)
    uncertainty_mean, uncertainty_max = _per_object_statistics(labels, sample(uncertainty), count)
    to_crs = transform @ Affine.scale(factor)
    limits = np.array([width / factor, height / factor])
    geometries = shapely.transform(
        np.array(outlines, dtype=object),
        lambda points: _apply(to_crs, np.minimum(points, limits)),
    )
    area = _areas(geometries, crs)
    keep = np.flatnonzero(area >= min_area)
    if objects == "best" and keep.size:
        # The highest score; the largest object among equal scores.
        keep = keep[np.lexsort((-area[keep], -np.nan_to_num(score[keep], nan=-1.0)))[:1]]
    columns = {
        "object_id": keep + 1, "geometry": list(geometries[keep]), "area": area[keep], "score": score[keep],
        "uncertainty_mean": uncertainty_mean[keep], "uncertainty_max": uncertainty_max[keep],
    }
    if objects == "mask" and keep.size:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:][keep]
        weights = sizes / sizes.sum()  # the mask's mean is the objects' means weighted by their pixels
        columns = {
            "object_id": [1], "geometry": [shapely.multipolygons(columns["geometry"])], "area": [area[keep].sum()],
            "score": [float(score[keep] @ weights)], "uncertainty_mean": [float(uncertainty_mean[keep] @ weights)],
            "uncertainty_max": [float(uncertainty_max[keep].max())],
        }
    geometry = columns.pop("geometry")
    if simplify > 0 and geometry:
        geometry = list(shapely.simplify(np.array(geometry, dtype=object), simplify, preserve_topology=True))
    size = len(geometry)
    return geopandas.GeoDataFrame(
        {
            "object_id": np.asarray(columns["object_id"], dtype=np.int64),
            "expression": [expression] * size,
            "source": [source] * size,
            "area": np.asarray(columns["area"], dtype=np.float64),
            "area_unit": [_area_unit(crs)] * size,
            **{name: np.asarray(columns[name], dtype=np.float64)
               for name in ("score", "uncertainty_mean", "uncertainty_max")},
        },
        geometry=geopandas.GeoSeries(geometry, crs=None if crs is None else crs.to_wkt()),
    )


def write_features(
    features: Any, path: str | os.PathLike, vector_format: str = "geojson", dst_crs: Any = None
) -> int:
    """
    Writes features (a `GeoDataFrame`, e.g. from [`mask_to_features`]) as one vector file, complete or not at all.

    - `"geojson"`: RFC 7946 (GDAL's `RFC7946=YES`): WGS 84 longitude/latitude (EPSG:4326), no `"crs"` member,
      right-hand winding, 7 decimals. Without a CRS (a plain image) or with a `dst_crs` other than EPSG:4326, the
      coordinates are written as they are, in the legacy form that names the CRS.
    - `"gpkg"` (GeoPackage), `"shp"` (Shapefile: `.shp` with its `.shx`, `.dbf`, `.prj`, `.cpg`; field names are
      cut to 10 characters there, so `uncertainty_mean` and `uncertainty_max` are `unc_mean` and `unc_max`) and
      `"parquet"` (GeoParquet, WKB geometry) record the features' CRS, or `dst_crs`.

    Each file is written under a hidden temporary name and renamed into place when complete (a Shapefile's `.shp`
    last), so a failed write leaves no file under a final name.

    Args:
        features (`geopandas.GeoDataFrame`): The features, with their CRS (or none).
        path (`str` or `os.PathLike`): The output file; for `"shp"`, the `.shp` file.
        vector_format (`str`, *optional*, defaults to `"geojson"`): One of `VECTOR_FORMATS`.
        dst_crs (*optional*): CRS to reproject to first (anything [`parse_crs`] reads, or a `CRS`).

    Returns:
        `int`: The number of features written.

    Raises:
        `ValueError`: An unknown format or CRS, or a `dst_crs` for features without a CRS.
    """
    from .atomic import atomic_output, partial_path

    check_vector_options(vector_format)
    require_vector_libraries()
    if dst_crs is not None:
        if features.crs is None:
            raise ValueError("The features have no CRS (a plain image) to reproject from.")
        dst_crs = parse_crs(dst_crs) if isinstance(dst_crs, str) else dst_crs
        features = features.to_crs(dst_crs.to_wkt())
    path = Path(path)
    with warnings.catch_warnings():
        # GDAL checks the temporary name's extension (the final name has the right one), and pyogrio warns about
        # features without a CRS, which those of plain images are by design.
        warnings.filterwarnings("ignore", message="The filename extension should be")
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        if vector_format == "parquet":
            with atomic_output(path) as temporary:
                features.to_parquet(temporary)
        elif vector_format == "shp":
            folder = partial_path(path)
            try:
                folder.mkdir()
                features.rename(columns=SHAPEFILE_FIELD_NAMES).to_file(
                    folder / path.name, driver="ESRI Shapefile", engine="pyogrio",
                    geometry_type=_geometry_type(features),
                )
                # The sidecars first, the .shp last: a .shp under its final name has every part beside it.
                for part in sorted(folder.iterdir(), key=lambda part: part.suffix.lower() == ".shp"):
                    os.replace(part, path.with_suffix(part.suffix))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        else:
            rfc_7946 = vector_format == "geojson" and features.crs is not None and (
                dst_crs is None or features.crs.equals("EPSG:4326")
            )
            with atomic_output(path) as temporary:
                features.to_file(
                    temporary, driver=VECTOR_FORMATS[vector_format][0], engine="pyogrio", layer=path.stem,
                    geometry_type=_geometry_type(features), **({"RFC7946": "YES"} if rfc_7946 else {}),
                )
    return len(features)


def _geometry_type(features: Any) -> str:
    types = set(features.geom_type)
    return types.pop() if len(types) == 1 else "Unknown"


__all__ = [
    "DEFAULT_PERCENTILES",
    "GEO_EXTRA_HINT",
    "OBJECT_MODES",
    "VECTOR_FORMATS",
    "GeoTiffScene",
    "check_vector_options",
    "is_georeferenced_tiff",
    "is_remote",
    "mask_to_features",
    "parse_crs",
    "require_rasterio",
    "require_vector_libraries",
    "stretch_to_uint8",
    "write_features",
    "write_mask_geotiff",
    "write_uncertainty_geotiff",
]
