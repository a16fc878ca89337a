"""Property tests of the image processor, post-processing and `crobim-u predict`: over random sizes (1 to 3000 a side;
1 to 10,000 for predict's files), PIL modes, dtypes and layouts, only the documented exceptions are raised, and
results always come back at the input's size."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import WORDS, make_processor, tiny_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from crobim_u import CrobimUImageProcessor
from crobim_u.inference.predict import OVERLAY_MAX_SIDE, PredictOptions, predict_files


SIZE = 64
# Small sides most of the time (fast), the edges of every regime (1, 2, the 32-pixel stride, the 480 input), and the
# full 1-3000 range.
SIDE = st.one_of(
    st.integers(1, 48), st.sampled_from([1, 2, 3, 31, 32, 33, 479, 480, 481, 2999, 3000]), st.integers(1, 3000)
)
# Scenes above this area are narrowed (the other side shrinks), so that an example stays well under a second; the
# 3000 x 3000 extreme is an explicit example.
MAX_AREA = 1_000_000
INTEGER_DTYPES = ["uint8", "int8", "int16", "int32", "int64", "uint16"]
FLOAT_DTYPES = ["float16", "float32", "float64", "bfloat16"]
HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def sizes(draw) -> tuple[int, int]:
    height, width = draw(SIDE), draw(SIDE)
    if height * width > MAX_AREA:
        width = max(1, MAX_AREA // height)
    return height, width


def pil_image(mode: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """A random image of any PIL mode, with the values the processor's rules accept for its bit depth."""
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32), "F")
    if mode.startswith("I;16"):
        data = rng.integers(0, 65536, (height, width)).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombytes(mode, (width, height), data.tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(0, 256, (height, width)).astype(np.int32), "I")
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def random_array(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype in FLOAT_DTYPES:
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, 65536 if dtype == "uint16" else 128, shape).astype(dtype)


def documented_reading(shape: tuple[int, ...], from_torch: bool, data_format: str | None) -> tuple[int, int] | None:
    """The (H, W) the documented layout rules read from an array's shape, or `None` where they raise."""
    if len(shape) == 2:
        return shape
    if data_format is not None:
        channels_first = data_format == "channels_first"
    elif (shape[0] in (1, 3)) != (shape[-1] in (1, 3)):
        channels_first = shape[0] in (1, 3)
    elif shape[0] in (1, 3):
        channels_first = from_torch  # torch tensors channels-first, numpy arrays channels-last
    else:
        return None
    channels = shape[0] if channels_first else shape[-1]
    if channels not in (1, 3):
        return None
    return shape[1:] if channels_first else shape[:2]


@st.composite
def image_inputs(draw) -> tuple[object, dict, tuple[int, int], tuple[int, int] | None]:
    """An image input, its kwargs, its true (H, W), and the (H, W) the documented rules read (`None`: they raise)."""
    height, width = draw(sizes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["pil", "numpy", "torch"]))
    if kind == "pil":
        mode = draw(st.sampled_from(Image.MODES))
        # LAB is the one mode PIL cannot convert to RGB correctly: refused.
        return pil_image(mode, height, width, rng), {}, (height, width), None if mode == "LAB" else (height, width)

    dtype = draw(st.sampled_from(["bool", *INTEGER_DTYPES, *FLOAT_DTYPES]))
    if dtype == "bfloat16":
        kind = "torch"  # numpy has no bfloat16
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    shape = (height, width) if channels is None else (height, width, channels)
    array = random_array(dtype, shape, rng)
    valid_values = True
    corruption = draw(st.sampled_from([None, None, "nan", "inf", "above", "below"]))
    if corruption in ("nan", "inf") and dtype in FLOAT_DTYPES:
        array.flat[rng.integers(array.size)] = np.nan if corruption == "nan" else np.inf
        valid_values = False
    elif corruption == "below" and dtype not in ("bool", "uint8", "uint16"):
        array.flat[rng.integers(array.size)] = -1
        valid_values = False
    elif corruption == "above" and dtype not in ("bool", "uint8", "uint16", "int8"):  # these cannot go above range
        array.flat[rng.integers(array.size)] = 1.5 if dtype in FLOAT_DTYPES else 256
        valid_values = False
    kwargs = {}
    if channels is not None and draw(st.booleans()):
        array = np.moveaxis(array, -1, 0)
        if draw(st.booleans()):
            kwargs["input_data_format"] = "channels_first"
    elif channels is not None and draw(st.booleans()):
        kwargs["input_data_format"] = "channels_last"
    image = array
    if kind == "torch":
        image = torch.from_numpy(np.ascontiguousarray(array))
        image = image.to(torch.bfloat16) if dtype == "bfloat16" else image
    elif dtype == "float16":
        image = array.astype(np.float16)
    reading = documented_reading(array.shape, kind == "torch", kwargs.get("input_data_format"))
    return image, kwargs, (height, width), reading if valid_values else None


@pytest.fixture(scope="module")
def processor() -> CrobimUImageProcessor:
    return CrobimUImageProcessor(size={"height": SIZE, "width": SIZE})


@HYPOTHESIS
@given(case=image_inputs())
@example(case=(Image.new("RGB", (3000, 3000), (10, 200, 30)), {}, (3000, 3000), (3000, 3000)))
@example(case=(np.zeros((1, 3000, 3), np.uint8), {}, (1, 3000), (1, 3000)))
@example(case=(torch.ones(3, 3000, 1), {}, (3000, 1), (3000, 1)))
@example(case=(np.zeros((1, 1), np.uint16), {}, (1, 1), (1, 1)))
def test_images_raise_only_documented_errors_and_keep_their_size(processor, case):
    image, kwargs, size, reading = case
    if reading is None:
        with pytest.raises((ValueError, TypeError), match=r"^images\[0\]: "):
            processor(image, **kwargs)
        return
    outputs = processor(image, **kwargs)
    assert outputs.original_sizes == [tuple(reading)]
    assert tuple(reading) == size or kwargs.get("input_data_format") is None  # only a guessed layout can differ
    assert outputs.pixel_values.shape == (1, 3, SIZE, SIZE) and outputs.pixel_values.dtype == torch.float32
    assert torch.isfinite(outputs.pixel_values).all()


@st.composite
def mask_cases(draw) -> tuple[np.ndarray, object, bool]:
    """An image, a mask input for it (right or wrong size and values), and whether the documented rules accept it."""
    height, width = draw(sizes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    foreground = draw(st.sampled_from([1, 255, True, 2, 128, 0.5]))
    dtype = bool if foreground is True else (np.float32 if foreground == 0.5 else np.uint8)
    binary = rng.random((height, width)) < 0.3
    mask = np.where(binary, foreground, 0).astype(dtype)
    valid = foreground in (1, 255, True) or not binary.any()
    mask_size = (height, width)
    if draw(st.integers(0, 4)) == 0:  # now and then, a mask of another size
        mask_size = (height + draw(st.integers(1, 3)), width)
        mask = np.zeros(mask_size, dtype)
        valid = False
    container = draw(st.sampled_from(["numpy", "torch", "pil"]))
    if container == "torch":
        mask = torch.from_numpy(mask)
    elif container == "pil" and dtype is np.uint8:
        mask = Image.fromarray(mask)
    image = np.zeros((height, width, 3), np.uint8)
    return image, mask, valid


@HYPOTHESIS
@given(case=mask_cases())
def test_masks_raise_only_documented_errors_and_become_exact_labels(processor, case):
    image, mask, valid = case
    if not valid:
        with pytest.raises(ValueError, match=r"^segmentation_maps\[0\]"):
            processor(image, mask, do_resize=False)
        return
    labels = processor(image, mask, do_resize=False).labels
    assert labels.shape == (1, *image.shape[:2]) and labels.dtype == torch.int64
    torch.testing.assert_close(labels[0], torch.as_tensor(np.asarray(mask) != 0).long())


@st.composite
def segmentation_outputs(draw) -> tuple[SimpleNamespace, object, float]:
    batch = draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(batch, 1, height, width, generator=generator) * 5
    uncertainty = None
    if draw(st.booleans()):
        uncertainty = torch.randn(batch, 1, max(1, height // 32), max(1, width // 32), generator=generator)
    targets = draw(st.one_of(st.none(), st.lists(sizes(), min_size=batch, max_size=batch)))
    if targets is not None and draw(st.booleans()):
        targets = torch.tensor(targets)
    threshold = draw(st.floats(0, 1))
    return SimpleNamespace(logits=logits, uncertainty_logits=uncertainty), targets, threshold


@HYPOTHESIS
@given(case=segmentation_outputs())
@example(case=(SimpleNamespace(logits=torch.zeros(1, 1, 15, 15), uncertainty_logits=torch.zeros(1, 1, 1, 1)),
               [(3000, 3000)], 0.5))
@example(case=(SimpleNamespace(logits=torch.ones(2, 1, 480, 480), uncertainty_logits=None), [(1, 1), (1, 3000)], 0.0))
def test_post_processing_returns_every_result_at_its_target_size(processor, case):
    outputs, targets, threshold = case
    results = processor.post_process_referring_segmentation(outputs, target_sizes=targets, threshold=threshold)
    expected_sizes = [tuple(outputs.logits.shape[-2:])] * len(outputs.logits) if targets is None else [
        tuple(int(side) for side in size) for size in targets
    ]
    assert len(results) == len(outputs.logits)
    for result, size in zip(results, expected_sizes):
        assert result["mask"].shape == size and result["mask"].dtype == torch.bool
        assert result["probabilities"].shape == size
        assert torch.equal(result["mask"], result["probabilities"] > threshold)
        assert 0.0 <= result["probabilities"].min() and result["probabilities"].max() <= 1.0
        if outputs.uncertainty_logits is None:
            assert result["uncertainty"] is None
        else:
            assert result["uncertainty"].shape == size
        assert 0.0 <= result["score"] <= 1.0 and (result["score"] == 0.0 or result["mask"].any())


@given(batch=st.integers(1, 3), count=st.integers(0, 4))
@settings(max_examples=15, deadline=None)
def test_post_processing_refuses_a_target_count_other_than_the_batch(processor, batch, count):
    outputs = SimpleNamespace(logits=torch.zeros(batch, 1, 8, 8), uncertainty_logits=None)
    targets = [(8, 8)] * count
    if count == batch:
        assert len(processor.post_process_referring_segmentation(outputs, targets)) == batch
        return
    with pytest.raises(ValueError, match=rf"Got {count} target sizes for a batch of {batch}"):
        processor.post_process_referring_segmentation(outputs, targets)


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor(size=SIZE)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=sizes(), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "F"]), seed=st.integers(0, 2**16))
@example(size=(1, 1), mode="RGB", seed=0)
def test_model_predictions_come_back_at_the_image_size(model_and_processor, size, mode, seed):
    model, processor = model_and_processor
    image = pil_image(mode, *size, np.random.default_rng(seed))
    inputs = processor(images=image, text=["the red car", "the large building"])
    sizes_ = inputs.pop("original_sizes")
    with torch.no_grad():
        results = processor.post_process_referring_segmentation(model(**inputs), target_sizes=sizes_)
    assert [tuple(result["mask"].shape) for result in results] == [size, size]
    assert all(result["uncertainty"].shape == size for result in results)


# Predict's files: sides from 1 to 10,000 (extreme aspect ratios), at most this many pixels per scene.
PREDICT_SIDE = st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 2047, 2048, 2049, 4097, 10_000]),
                         st.integers(1, 10_000))
PREDICT_MAX_AREA = 200_000


def overlay_size(height: int, width: int) -> tuple[int, int]:
    """The documented size of an overlay: the scene at most OVERLAY_MAX_SIDE on its long side, each side at least 1;
    two panels (mask, uncertainty) side by side under a title strip of max(14, h // 16) pixels."""
    scale = max(1.0, max(height, width) / OVERLAY_MAX_SIDE)
    panel_height, panel_width = max(1, round(height / scale)), max(1, round(width / scale))
    return 2 * panel_width, panel_height + max(14, panel_height // 16)


@st.composite
def predict_scenes(draw) -> tuple[int, int, str, PredictOptions]:
    """A scene size, its kind (PNG or GeoTIFF) and the options of every output path: tiling, vector format, objects."""
    height, width = draw(PREDICT_SIDE), draw(PREDICT_SIDE)
    if height * width > PREDICT_MAX_AREA:
        if draw(st.booleans()):
            width = max(1, PREDICT_MAX_AREA // height)
        else:
            height = max(1, PREDICT_MAX_AREA // width)
    options = PredictOptions(
        tile=draw(st.sampled_from(["auto", "never"])),
        vector_format=draw(st.sampled_from([None, "geojson", "gpkg", "shp", "parquet"])),
        objects=draw(st.sampled_from(["mask", "all", "best"])),
    )
    return height, width, draw(st.sampled_from(["png", "geotiff"])), options


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=predict_scenes())
@example(case=(1, 10_000, "png", PredictOptions(vector_format="gpkg", objects="all")))
@example(case=(10_000, 1, "geotiff", PredictOptions()))
@example(case=(1, 1, "geotiff", PredictOptions(tile="never", vector_format="shp", objects="best")))
@example(case=(20, 10_000, "png", PredictOptions(tile="never")))
def test_predict_writes_every_output_at_the_scene_size(model_and_processor, tmp_path_factory, case):
    import geopandas

    height, width, kind, options = case
    model, processor = model_and_processor
    folder = tmp_path_factory.mktemp("scene")
    pixels = np.random.default_rng(height * 10_007 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "png":
        path = folder / "scene.png"
        Image.fromarray(pixels).save(path)
    else:
        import rasterio
        from affine import Affine

        path = folder / "scene.tif"
        with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000)) as destination:
            destination.write(np.moveaxis(pixels, -1, 0))
    records = predict_files(model, processor, [path], ["the red car", "the large building"], folder / "out", options,
                            progress=False)
    assert [record["status"] for record in records] == ["ok", "ok"], records
    for record in records:
        for field in ("mask", "uncertainty"):
            if kind == "png":
                with Image.open(record[field]) as picture:
                    assert picture.size == (width, height), field
            else:
                with rasterio.open(record[field]) as raster:
                    assert raster.shape == (height, width), field
        with Image.open(record["overlay"]) as overlay:
            assert overlay.size == overlay_size(height, width)
        vector_format = options.vector_format or ("geojson" if kind == "geotiff" else None)
        if vector_format is None:
            assert record["vector"] is None
            continue
        path = record["vector"]
        features = geopandas.read_parquet(path) if vector_format == "parquet" else geopandas.read_file(path)
        assert len(features) == record["num_features"] and (record["mask_area"] == 0) == features.empty
        if options.objects != "all":
            assert len(features) <= 1
        if kind == "png":
            # Pixel coordinates; GeoJSON cannot say "no CRS", and its readers take WGS 84.
            assert features.crs == ("EPSG:4326" if vector_format == "geojson" else None)
            assert (features.total_bounds <= [width, height, width, height]).all()
        else:
            assert features.crs == ("EPSG:4326" if vector_format == "geojson" else "EPSG:32633")
