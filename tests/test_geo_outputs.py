"""GIS outputs: vector files with attributes and CRS, RFC 7946 GeoJSON, objects, simplification, Cloud-Optimized
GeoTIFFs, remote (https) inputs, and the errors of bad options."""

import http.server
import json
import re
import sys
import threading

import numpy as np
import pytest
from helpers import BrightnessModel, make_processor, read_results, save_checkpoint

from crobim_u.cli import main
from crobim_u.inference.geo import mask_to_features, parse_crs, write_features
from crobim_u.inference.predict import PredictOptions, predict_files


geopandas = pytest.importorskip("geopandas", reason='the geo extra is not installed: pip install "crobim-u[geo]"')
import pyproj  # noqa: E402
import rasterio  # noqa: E402
import shapely  # noqa: E402
from affine import Affine  # noqa: E402
from rio_cogeo.cogeo import cog_validate  # noqa: E402


UTM = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)  # 0.5 m pixels, north up
# Three blobs (top, left, bottom, right) and the probability inside each: the second is the most probable.
BLOBS = [((5, 5, 15, 25), 0.7), ((30, 40, 36, 46), 0.95), ((45, 5, 55, 15), 0.8)]
FORMATS = {"geojson": ".geojson", "gpkg": ".gpkg", "shp": ".shp", "parquet": ".parquet"}


def blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 60 x 70 mask of `BLOBS`, its probabilities and a seeded uncertainty map."""
    mask = np.zeros((60, 70), bool)
    probability = np.full((60, 70), 0.1, np.float32)
    for (top, left, bottom, right), value in BLOBS:
        mask[top:bottom, left:right] = True
        probability[top:bottom, left:right] = value
    uncertainty = np.random.default_rng(0).random((60, 70)).astype(np.float32)
    return mask, probability, uncertainty


def read_vector(path):
    return geopandas.read_parquet(path) if str(path).endswith(".parquet") else geopandas.read_file(path)


def test_a_square_on_utm_gives_its_polygon_and_rfc_7946_corners(tmp_path):
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    features = mask_to_features(mask, TRANSFORM, parse_crs(UTM), objects="all")
    (geometry,) = features.geometry
    west, north, east, south = 500010.0, 3999995.0, 500025.0, 3999985.0
    assert geometry.equals(shapely.box(west, south, east, north))
    # The attribute, not GeoDataFrame.area (which the column name hides only for item access).
    assert features["area"].tolist() == [150.0] and features.area_unit.tolist() == ["m2"]

    assert write_features(features, tmp_path / "square.geojson") == 1
    collection = json.loads((tmp_path / "square.geojson").read_text())
    assert "crs" not in collection
    (ring,) = collection["features"][0]["geometry"]["coordinates"]
    assert shapely.LinearRing(ring).is_ccw  # right-hand rule: exterior rings counterclockwise
    to_wgs84 = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    vertices = np.array(ring)
    for x, y in ((west, south), (east, south), (east, north), (west, north)):
        longitude, latitude = to_wgs84.transform(x, y)
        assert np.abs(vertices - [longitude, latitude]).max(axis=1).min() <= 1e-7
    # Asked for explicitly, EPSG:4326 gives the same RFC 7946 file; another CRS is written in the legacy form.
    write_features(features, tmp_path / "wgs84.geojson", dst_crs="EPSG:4326")
    assert json.loads((tmp_path / "wgs84.geojson").read_text())["features"] == collection["features"]
    write_features(features, tmp_path / "mercator.geojson", dst_crs="EPSG:3857")
    mercator = json.loads((tmp_path / "mercator.geojson").read_text())
    assert mercator["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::3857"


@pytest.mark.parametrize("vector_format", FORMATS)
def test_every_vector_format_opens_with_its_attributes_types_and_crs(tmp_path, vector_format):
    mask, probability, uncertainty = blobs()
    features = mask_to_features(mask, TRANSFORM, parse_crs(UTM), probability, uncertainty, objects="all",
                                expression="the tank", source="scene.tif")
    path = tmp_path / f"objects{FORMATS[vector_format]}"
    assert write_features(features, path, vector_format) == 3
    read = read_vector(path)
    assert read.crs == ("EPSG:4326" if vector_format == "geojson" else UTM)
    names = {"uncertainty_mean": "unc_mean", "uncertainty_max": "unc_max"} if vector_format == "shp" else {}
    columns = ["object_id", "expression", "source", "area", "area_unit", "score", "uncertainty_mean",
               "uncertainty_max"]
    assert list(read.columns) == [names.get(name, name) for name in columns] + ["geometry"]
    assert read.object_id.dtype.kind == "i" and read.object_id.tolist() == [1, 2, 3]
    for name in ("area", "score", "uncertainty_mean", "uncertainty_max"):
        assert read[names.get(name, name)].dtype.kind == "f", name
    assert read.expression.tolist() == ["the tank"] * 3 and read.source.tolist() == ["scene.tif"] * 3
    assert read["area"].tolist() == [50.0, 9.0, 25.0] and read.area_unit.tolist() == ["m2"] * 3
    np.testing.assert_allclose(read.score, [0.7, 0.95, 0.8], rtol=1e-6)
    for index, ((top, left, bottom, right), _) in enumerate(BLOBS):
        inside = uncertainty[top:bottom, left:right]
        row = read.iloc[index]
        assert row[names.get("uncertainty_mean", "uncertainty_mean")] == pytest.approx(inside.mean(), rel=1e-6)
        assert row[names.get("uncertainty_max", "uncertainty_max")] == pytest.approx(inside.max(), rel=1e-6)


def test_objects_all_best_and_the_whole_mask():
    mask, probability, uncertainty = blobs()
    crs = parse_crs(UTM)
    every = mask_to_features(mask, TRANSFORM, crs, probability, uncertainty, objects="all")
    assert len(every) == 3 and set(every.geom_type) == {"Polygon"}
    (best,) = mask_to_features(mask, TRANSFORM, crs, probability, uncertainty, objects="best").itertuples()
    assert best.object_id == 2 and best.score == pytest.approx(0.95)
    whole = mask_to_features(mask, TRANSFORM, crs, probability, uncertainty)
    assert len(whole) == 1 and whole.geom_type.tolist() == ["MultiPolygon"]
    assert len(whole.geometry.iloc[0].geoms) == 3 and whole["area"].iloc[0] == 84.0
    assert whole.score.iloc[0] == pytest.approx(probability[mask].mean(), rel=1e-6)
    assert whole.uncertainty_max.iloc[0] == pytest.approx(uncertainty[mask].max())
    # --min_area drops the 9 m2 object, before "best" chooses.
    assert mask_to_features(mask, TRANSFORM, crs, probability, objects="best", min_area=10).object_id.tolist() == [3]
    assert len(mask_to_features(np.zeros((5, 5), bool), TRANSFORM, crs, objects="all")) == 0


def test_simplify_reduces_the_vertices_of_a_jagged_polygon_and_keeps_it_valid():
    # A field with a ragged edge: every row ends at a random column.
    ends = np.random.default_rng(0).integers(30, 40, 80)
    mask = np.arange(60)[None, :] < ends[:, None]
    crs = parse_crs(UTM)
    jagged = mask_to_features(mask, TRANSFORM, crs).geometry.iloc[0]
    simple = mask_to_features(mask, TRANSFORM, crs, simplify=3.0).geometry.iloc[0]
    vertices = shapely.get_num_coordinates
    assert vertices(simple) < vertices(jagged) / 4 and simple.is_valid
    assert simple.area == pytest.approx(jagged.area, rel=0.05)
    with pytest.raises(ValueError, match=r"The simplify tolerance must be >= 0 \(CRS units\), got -1"):
        mask_to_features(mask, TRANSFORM, crs, simplify=-1)


def write_scene(path, height: int = 300, width: int = 400) -> None:
    """A tiled uint8 GeoTIFF (64-pixel blocks) with bright roofs on a dark ground, in `UTM`."""
    data = np.full((3, height, width), 40, np.uint8)
    data[:, 50:120, 60:200] = 230
    data[:, 200:260, 300:380] = 220
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8", crs=UTM,
                       transform=TRANSFORM, tiled=True, blockxsize=64, blockysize=64) as destination:
        destination.write(data)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "roofs.tif"
    write_scene(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint"))


def test_predict_writes_valid_cogs_and_reprojects_every_output(checkpoint, scene, tmp_path):
    output = tmp_path / "out"
    status = main(["predict", "--model", checkpoint, "--output_dir", str(output), "--expression", "the roofs",
                   "--vector_format", "gpkg", "--objects", "all", "--dst_crs", "EPSG:3857", "--window", "128",
                   "--no_progress", str(scene)])
    assert status == 0
    (record,) = read_results(output)
    assert record["crs"] == "EPSG:3857" and record["vector"].endswith("_mask.gpkg")
    for field in ("mask", "uncertainty"):
        valid, errors, _ = cog_validate(record[field])
        assert valid and not errors, (field, errors)
        with rasterio.open(record[field]) as raster:
            assert raster.crs == "EPSG:3857" and raster.profile["compress"] == "deflate"
            assert raster.overviews(1) and raster.nodata is not None
    assert read_vector(record["vector"]).crs == "EPSG:3857"
    assert len(read_vector(record["vector"])) == record["num_features"]


class RangeRequestHandler(http.server.BaseHTTPRequestHandler):
    """Serves the files of `server.files` by name, with HTTP range requests; records the range of each GET."""

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, send_body: bool):
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start, stop = 0, len(data)
        requested = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if send_body:
            self.server.ranges.append(self.headers.get("Range"))
        if requested:
            start = int(requested[1])
            stop = min(len(data), int(requested[2]) + 1 if requested[2] else len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        if send_body:
            self.wfile.write(data[start:stop])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """An HTTP server on 127.0.0.1 with range requests; it stops after the test, or after 120 s whatever happens."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeRequestHandler)
    server.files, server.ranges = {}, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = threading.Timer(120, server.shutdown)
    deadline.daemon = True
    deadline.start()
    yield server
    deadline.cancel()
    server.shutdown()
    server.server_close()


def test_a_remote_geotiff_is_read_by_ranges_and_gives_the_local_outputs(http_server, scene, tmp_path):
    http_server.files["roofs.tif"] = scene.read_bytes()
    url = f"http://127.0.0.1:{http_server.server_address[1]}/roofs.tif"
    options = PredictOptions(tile="always", window=128)
    model, processor = BrightnessModel(), make_processor(size=64)
    local = predict_files(model, processor, [str(scene)], ["the roofs"], tmp_path / "local", options, progress=False)
    remote = predict_files(model, processor, [url], ["the roofs"], tmp_path / "remote", options, progress=False)
    assert [record["status"] for record in local + remote] == ["ok", "ok"]
    assert remote[0]["input"] == url and remote[0]["mask"].endswith("roofs_0_the-roofs_mask.tif")
    for field in ("mask", "uncertainty"):
        with rasterio.open(local[0][field]) as near, rasterio.open(remote[0][field]) as far:
            np.testing.assert_array_equal(near.read(), far.read())
            assert (near.crs, near.transform) == (far.crs, far.transform)
    near, far = read_vector(local[0]["vector"]), read_vector(remote[0]["vector"])
    assert near.geometry.geom_equals(far.geometry).all() and near.score.equals(far.score)
    assert remote[0]["mask_area"] == local[0]["mask_area"] > 0
    # Every read is a range request, none of them for the whole file.
    size = len(http_server.files["roofs.tif"])
    assert http_server.ranges and all(http_server.ranges)
    spans = [re.fullmatch(r"bytes=(\d+)-(\d+)", span) for span in http_server.ranges]
    assert all(int(span[2]) - int(span[1]) + 1 < size for span in spans)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--simplify", "-1"], "error: The simplify tolerance must be >= 0 (CRS units), got -1.0."),
        (["--min_area", "-5"], "error: min_area must be >= 0, got -5.0."),
        (["--dst_crs", "EPSG:999999"], "error: Unknown CRS 'EPSG:999999'"),
    ],
)
def test_bad_geo_options_are_refused_before_the_model_loads(tmp_path, flags, message):
    with pytest.raises(SystemExit) as raised:
        main(["predict", "--model", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out"), "--expression",
              "the roofs", *flags, str(tmp_path / "scene.tif")])
    assert str(raised.value.code).startswith(message)


def test_an_unknown_vector_format_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["predict", "--model", "m", "--output_dir", str(tmp_path), "--expression", "e", "--vector_format", "kml",
              "scene.tif"])
    assert raised.value.code == 2
    assert "argument --vector_format: invalid choice: 'kml'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown vector format 'kml'; expected one of geojson, gpkg, shp, parquet"):
        write_features(mask_to_features(np.ones((2, 2), bool)), tmp_path / "x.kml", "kml")
    with pytest.raises(ValueError, match="Unknown vector format 'kml'"):
        PredictOptions(vector_format="kml")


def test_without_the_geo_extra_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "geopandas", None)
    hint = r'pip install "crobim-u\[geo\]"'
    with pytest.raises(ImportError, match=hint):
        PredictOptions(vector_format="gpkg")
    with pytest.raises(ImportError, match=hint):
        mask_to_features(np.ones((2, 2), bool))
    with pytest.raises(SystemExit, match=hint):
        main(["predict", "--model", "m", "--output_dir", str(tmp_path), "--expression", "e", "--vector_format", "gpkg",
              "scene.tif"])


@pytest.mark.parametrize("vector_format", FORMATS)
def test_a_failed_vector_write_leaves_no_file(tmp_path, monkeypatch, vector_format):
    def write_half_then_fail(self, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(geopandas.GeoDataFrame, "to_parquet" if vector_format == "parquet" else "to_file",
                        write_half_then_fail)
    features = mask_to_features(np.ones((4, 4), bool), TRANSFORM, parse_crs(UTM))
    with pytest.raises(OSError, match="disk full"):
        write_features(features, tmp_path / f"mask{FORMATS[vector_format]}", vector_format)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_vector_file_keeps_the_rasters(scene, tmp_path, monkeypatch):
    import crobim_u.inference.predict as predict_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(predict_module, "write_features", fail)
    (record,) = predict_files(BrightnessModel(), make_processor(size=64), [str(scene)], ["the roofs"], tmp_path,
                              PredictOptions(window=128), progress=False)
    assert record["status"] == "partial" and record["error"] == "vector: OSError: disk full"
    assert record["vector"] is None and record["num_features"] is None
    for field in ("mask", "uncertainty", "overlay"):
        assert (tmp_path / record[field]).is_file()
