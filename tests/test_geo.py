"""GeoTIFF scenes: band choice, percentile stretch, georeferenced outputs, polygons, and life without rasterio."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, TiffTags
from helpers import BrightnessModel, make_processor, random_image, read_results, save_checkpoint

import crobim_u.inference.predict as predict_module
from crobim_u.cli import build_parser, main
from crobim_u.inference.geo import (
    GeoTiffScene,
    mask_to_features,
    stretch_to_uint8,
    write_mask_geotiff,
    write_uncertainty_geotiff,
)
from crobim_u.inference.predict import PredictOptions, predict_files
from crobim_u.inference.tiling import predict_scene

needs_rasterio = pytest.mark.skipif(
    importlib.util.find_spec("rasterio") is None, reason='the geo extra is not installed: pip install "crobim-u[geo]"'
)
if importlib.util.find_spec("rasterio") is not None:
    import rasterio
    import rasterio.warp
    from affine import Affine

    TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)  # 0.5 m pixels, north up

CRS = "EPSG:32633"
ROOF = (200, 300, 450, 700)  # top, left, bottom, right: 14% of the scene, so the 98th percentile is the roof


def write_raster(path, data: np.ndarray, **profile) -> None:
    """Writes a (C, H, W) array as a tiled GeoTIFF in `CRS` with `TRANSFORM`."""
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count, dtype=data.dtype.name,
                       crs=CRS, transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256,
                       **profile) as destination:
        destination.write(data)


def write_scene(path, height: int = 700, width: int = 1000, count: int = 3) -> None:
    """A seeded uint16 scene with a bright roof at `ROOF`; band b is offset by 100 * b to tell bands apart."""
    rng = np.random.default_rng(0)
    data = rng.integers(1000, 3000, (count, height, width), dtype=np.uint16)
    top, left, bottom, right = ROOF
    data[:, top:bottom, left:right] = 20000
    write_raster(path, data + (100 * np.arange(count, dtype=np.uint16)).reshape(-1, 1, 1))


def corner(col: float, row: float) -> tuple[float, float]:
    """CRS coordinates of a pixel corner."""
    return TRANSFORM.c + TRANSFORM.a * col, TRANSFORM.f + TRANSFORM.e * row


def feature_points(features) -> np.ndarray:
    """Every vertex of a GeoDataFrame's (Multi)Polygons, as an `(N, 2)` array."""
    import shapely

    return shapely.get_coordinates(features.geometry.values)


def geojson_points(path) -> np.ndarray:
    import shapely

    collection = json.loads(open(path).read())
    return np.concatenate([shapely.get_coordinates(shapely.geometry.shape(feature["geometry"]))
                           for feature in collection["features"]])


def assert_same_grid(path, reference):
    with rasterio.open(path) as output, rasterio.open(reference) as source:
        assert output.crs == source.crs and output.transform == source.transform and output.shape == source.shape



def geo_tagged_tiff(path) -> str:
    """An RGB TIFF carrying GeoTIFF pixel-scale and tie-point tags, written with PIL (no rasterio needed)."""
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, values in ((33550, (0.5, 0.5, 0.0)), (33922, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0))):
        tags[tag] = values
        tags.tagtype[tag] = TiffTags.DOUBLE
    random_image(40, 30).save(path, tiffinfo=tags)
    return str(path)


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("geo") / "scene.tif"
    write_scene(path)
    return path


@needs_rasterio
def test_percentile_stretch_and_band_order(scene_path):
    data = rasterio.open(scene_path).read()
    with GeoTiffScene(scene_path, bands=(3, 2, 1)) as scene:
        low, high = scene.stretch
        # The scene is under the statistics side, so the percentiles are the exact ones.
        np.testing.assert_allclose(low, [np.percentile(data[band], 2) for band in (2, 1, 0)])
        np.testing.assert_allclose(high, [np.percentile(data[band], 98) for band in (2, 1, 0)])
        window = scene.read(190, 290, 20, 30)
    assert window.shape == (20, 30, 3) and window.dtype == np.uint8
    expected = stretch_to_uint8(data[[2, 1, 0], 190:210, 290:320], low, high)
    np.testing.assert_array_equal(window, np.moveaxis(expected, 0, -1))
    assert (window[10:, 10:] == 255).all() and window[:10].max() < 40


@needs_rasterio
def test_band_choice(tmp_path):
    write_scene(tmp_path / "four.tif", height=40, width=50, count=4)
    with pytest.raises(ValueError, match="--bands"):
        GeoTiffScene(tmp_path / "four.tif")
    with pytest.raises(ValueError, match="1-based"):
        GeoTiffScene(tmp_path / "four.tif", bands=(0, 1, 2))
    with GeoTiffScene(tmp_path / "four.tif", bands=(4,)) as grey:
        pixels = grey.read(0, 0, 40, 50)
    assert pixels.shape == (40, 50, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    # Red, green and blue found by colour interpretation; uint8 bands are used as they are.
    data = np.random.default_rng(0).integers(0, 256, (4, 40, 50), dtype=np.uint8)
    write_raster(tmp_path / "bgrn.tif", data, photometric="RGB")
    with rasterio.open(tmp_path / "bgrn.tif", "r+") as raster:
        raster.colorinterp = [rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.green,
                              rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.undefined]
    with GeoTiffScene(tmp_path / "bgrn.tif") as rgb:
        assert rgb.bands == (3, 2, 1) and rgb.stretch is None
        np.testing.assert_array_equal(rgb.read(0, 0, 40, 50), np.moveaxis(data[[2, 1, 0]], 0, -1))


@needs_rasterio
def test_nodata_and_non_finite_pixels_become_black(tmp_path):
    data = np.linspace(0.1, 0.9, 60 * 80, dtype=np.float32).reshape(1, 60, 80)
    data[0, :5] = -9999.0
    data[0, 10, 10] = np.nan
    write_raster(tmp_path / "float.tif", data, nodata=-9999.0)
    with GeoTiffScene(tmp_path / "float.tif") as scene:
        assert scene.stretch[0][0] > 0.1  # nodata is not in the statistics
        pixels = scene.read(0, 0, 60, 80)
    assert (pixels[:5] == 0).all() and (pixels[10, 10] == 0).all() and pixels[-1, -1, 0] == 255


@needs_rasterio
def test_planted_roof_is_found_and_written_in_the_scene_crs(scene_path, tmp_path):
    with GeoTiffScene(scene_path) as scene:
        result = predict_scene(BrightnessModel(), make_processor(size=128), scene, "the roof", batch_size=16)
    truth = np.zeros((700, 1000), dtype=bool)
    top, left, bottom, right = ROOF
    truth[top:bottom, left:right] = True
    np.testing.assert_array_equal(result.mask, truth)

    write_mask_geotiff(tmp_path / "mask.tif", result.mask, scene.crs, scene.transform)
    write_uncertainty_geotiff(tmp_path / "uncertainty.tif", result.uncertainty, scene.crs, scene.transform)
    for name in ("mask.tif", "uncertainty.tif"):
        assert_same_grid(tmp_path / name, scene_path)
    with rasterio.open(tmp_path / "mask.tif") as mask, rasterio.open(tmp_path / "uncertainty.tif") as uncertainty:
        assert mask.dtypes == ("uint8",) and mask.profile["compress"] == "deflate" and mask.profile["tiled"]
        np.testing.assert_array_equal(mask.read(1), truth.astype(np.uint8))
        assert uncertainty.dtypes == ("float32",)
        np.testing.assert_allclose(uncertainty.read(1), result.uncertainty, atol=1e-3)

    features = mask_to_features(result.mask, scene.transform, scene.crs, expression="x")
    assert len(features) == 1 and features.crs == CRS and features.expression.tolist() == ["x"]
    points = feature_points(features)
    west, north = corner(left, top)
    east, south = corner(right, bottom)
    np.testing.assert_allclose(points.min(axis=0), [west, south])
    np.testing.assert_allclose(points.max(axis=0), [east, north])


@needs_rasterio
def test_large_masks_are_traced_on_a_decimated_copy_inside_the_bounds(tmp_path):
    height, width = 703, 1001
    mask = np.zeros((height, width), dtype=bool)
    mask[:, 990:] = True  # a strip along the right border, narrower than a decimated cell
    mask[100:400, :500] = True  # a block on the left border
    mask[600:, 600:700] = True  # on the bottom border
    features = mask_to_features(mask, TRANSFORM, objects="all", max_pixels=100_000)
    points = feature_points(features)
    west, north = corner(0, 0)
    east, south = corner(width, height)
    assert 1 <= len(features) <= 3
    assert (points[:, 0] >= west).all() and (points[:, 0] <= east).all()
    assert (points[:, 1] >= south).all() and (points[:, 1] <= north).all()
    assert points[:, 0].min() == west and points[:, 1].min() == south  # the border is reached


@needs_rasterio
def test_predict_cli_on_a_geotiff(scene_path, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    output = tmp_path / "out"
    random_image(40, 30).save(tmp_path / "plain.tif")  # no georeferencing: PNG outputs
    status = main(["predict", "--model", checkpoint, "--output_dir", str(output), "--expression", "the large building",
                   "--window", "256", "--bands", "3,2,1", "--no_progress", str(scene_path),
                   str(tmp_path / "plain.tif")])
    assert status == 0
    record, plain = read_results(output)
    assert plain["status"] == "ok" and plain["mask"].endswith(".png") and plain["vector"] is None
    assert record["status"] == "ok" and record["mode"] == "tiled" and record["crs"] == CRS
    assert (record["height"], record["width"]) == (700, 1000) and record["num_windows"] == 20
    assert_same_grid(record["mask"], scene_path)
    assert_same_grid(record["uncertainty"], scene_path)
    # RFC 7946: longitude/latitude inside the scene's bounds in WGS 84.
    points = geojson_points(record["vector"])
    west, south, east, north = rasterio.warp.transform_bounds(CRS, "EPSG:4326", *rasterio.open(scene_path).bounds)
    tolerance = 1e-7  # RFC 7946 files hold 7 decimals
    assert len(points) and (points >= [west - tolerance, south - tolerance]).all()
    assert (points <= [east + tolerance, north + tolerance]).all()
    assert record["vector_format"] == "geojson" and record["num_features"] == 1
    with rasterio.open(record["mask"]) as mask:
        assert record["mask_area"] == int(mask.read(1).sum())
    with Image.open(record["overlay"]) as overlay:
        assert overlay.width == 2000


def test_without_rasterio_everything_else_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rasterio", None)
    scene_path = geo_tagged_tiff(tmp_path / "scene.tif")
    with pytest.raises(ImportError, match=r'pip install "crobim-u\[geo\]"'):
        GeoTiffScene(scene_path)
    random_image(40, 30).save(tmp_path / "photo.png")
    random_image(40, 30).save(tmp_path / "plain.tif")  # a TIFF without georeferencing: PIL reads it
    stub = BrightnessModel()
    records = predict_files(stub, make_processor(size=64), [tmp_path / "photo.png", scene_path, tmp_path / "plain.tif"],
                            ["the roof"], tmp_path / "out", PredictOptions(), progress=False)
    assert [record["status"] for record in records] == ["ok", "error", "ok"]
    assert 'pip install "crobim-u[geo]"' in records[1]["error"]
    assert records[2]["mask"].endswith(".png")


def test_modules_import_without_rasterio(monkeypatch):
    # Imported afresh with rasterio hidden; the original modules are put back afterwards.
    import crobim_u.inference

    monkeypatch.setitem(sys.modules, "rasterio", None)
    for name in ("tiling", "geo", "predict"):
        monkeypatch.delitem(sys.modules, f"crobim_u.inference.{name}")
        monkeypatch.setattr(crobim_u.inference, name, getattr(crobim_u.inference, name))
    for name in ("tiling", "geo", "predict"):
        importlib.import_module(f"crobim_u.inference.{name}")
    assert sys.modules["crobim_u.inference.predict"] is not predict_module
    build_parser().parse_args(["predict", "--model", "m", "--expression", "e", "--output_dir", "o", "x.tif"])
