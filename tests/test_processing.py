"""Processor and pipeline: pairing, sizes, saving together, and reloading with and without the package."""

import json
import textwrap

import numpy as np
import pytest
import torch
from helpers import (
    REAL_800,
    REAL_1111,
    WORDS,
    assert_close_across_processes,
    assert_masks_equal_away_from_threshold,
    make_processor,
    needs_real_data,
    random_image,
    run_without_crobim_u,
    tiny_model,
)
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, pipeline

import crobim_u
from crobim_u import CrobimUImageProcessor, CrobimUProcessor, CrobimUReferringSegmentationPipeline


@pytest.fixture
def processor():
    return make_processor()


@pytest.fixture
def model():
    return tiny_model(text_config={"vocab_size": len(WORDS)})


def test_one_expression_per_image(processor):
    encoding = processor(images=[random_image(50, 40), random_image(70, 30)], text=["the red car", "the building"])
    assert encoding["pixel_values"].shape == (2, 3, 64, 64)
    assert encoding["input_ids"].shape[0] == 2
    assert "image_indices" not in encoding
    assert encoding["original_sizes"] == [(40, 50), (30, 70)]


def test_one_image_with_several_expressions_is_processed_once(processor):
    encoding = processor(images=random_image(50, 40), text=["the red car", "the large building", "the car"])
    assert encoding["pixel_values"].shape == (1, 3, 64, 64)
    assert encoding["image_indices"].tolist() == [0, 0, 0]
    assert encoding["original_sizes"] == [(40, 50)] * 3


def test_lists_of_expressions_per_image(processor):
    encoding = processor(images=[random_image(50, 40), random_image(20, 30)], text=[["the car", "the building"], ["the red car"]])
    assert encoding["pixel_values"].shape == (2, 3, 64, 64)
    assert encoding["image_indices"].tolist() == [0, 0, 1]
    assert encoding["original_sizes"] == [(40, 50), (40, 50), (30, 20)]


def test_masks_become_labels_per_expression(processor):
    image = random_image(40, 40)
    left, right = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    left[:, :20], right[:, 20:] = 1, 255
    encoding = processor(images=image, text=["the left", "the right"], segmentation_maps=[left, right])
    labels = encoding["labels"]
    assert labels.shape == (2, 64, 64)
    assert labels[0, :, :32].all() and not labels[0, :, 32:].any()
    assert labels[1, :, 32:].all() and not labels[1, :, :32].any()


def test_max_length_truncates_and_round_trips(processor, tmp_path):
    long_expression = " ".join(["the red car left of the large building"] * 10)
    assert processor(text=long_expression)["input_ids"].shape[1] == 12
    assert processor(text=long_expression, max_length=6)["input_ids"].shape[1] == 6
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, CrobimUProcessor)
    assert reloaded.max_length == 12
    assert reloaded.image_processor.size == processor.image_processor.size


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p: p(images=[random_image(8, 8)] * 2, text=["a", "b", "c"]), ValueError, "2 images and 3 expressions"),
        (lambda p: p(images=[random_image(8, 8)] * 3, text=[["the car"], ["the car"]]), ValueError, "one list per image"),
        (lambda p: p(images=random_image(8, 8), text=["the car", "   "]), ValueError, "Expression 1 is empty"),
        (lambda p: p(images=random_image(8, 8), text=[]), ValueError, "non-empty list"),
        (lambda p: p(images=random_image(8, 8), text=[3]), TypeError, "Expression 0 must be a string"),
        (lambda p: p(images=random_image(8, 8), text="the car", segmentation_maps=[np.zeros((8, 8))] * 2),
         ValueError, "2 segmentation maps for 1 expressions"),
        (lambda p: p(text="the car", segmentation_maps=[np.zeros((8, 8))]), ValueError, "pass images too"),
        (lambda p: p(images=random_image(8, 8), text="the car", return_tensors="np"), ValueError, "PyTorch tensors only"),
        (lambda p: p(), ValueError, "Pass images, text, or both"),
    ],
)
def test_bad_pairings_raise_clear_errors(processor, call, error, message):
    with pytest.raises(error, match=message):
        call(processor)


@needs_real_data
def test_real_images_of_different_sizes_come_back_at_their_own_size(processor, model):
    images = [Image.open(REAL_800), Image.open(REAL_1111)]
    encoding = processor(images=images, text=["the baseball field is on the right", "the airplane"])
    original_sizes = encoding.pop("original_sizes")
    assert original_sizes == [(800, 800), (1182, 1111)]
    with torch.no_grad():
        outputs = model(**encoding)
    results = processor.post_process_referring_segmentation(outputs, target_sizes=original_sizes)
    for result, (height, width) in zip(results, original_sizes):
        assert result["mask"].shape == (height, width) and result["mask"].dtype == torch.bool
        assert result["probabilities"].shape == (height, width)
        assert result["uncertainty"].shape == (height, width)
        assert 0 <= result["uncertainty"].min() and result["uncertainty"].max() <= 1
        assert 0.0 <= result["score"] <= 1.0


def test_polygon_mask_survives_the_round_trip_through_labels():
    processor = make_processor(size=480)
    height, width = 1182, 1111
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon([(100, 150), (700, 120), (1000, 900), (400, 1100), (150, 700)], fill=1)
    labels = processor(images=random_image(width, height), text="the field", segmentation_maps=[mask])["labels"]
    as_logits = (labels.float() * 20 - 10)[:, None]  # a perfectly confident prediction of the labels
    outputs = type("Outputs", (), {"logits": as_logits, "uncertainty_logits": None})()
    restored = processor.post_process_referring_segmentation(outputs, target_sizes=[(height, width)])[0]["mask"]
    original = torch.from_numpy(np.asarray(mask) > 0)
    iou = (restored & original).sum() / (restored | original).sum()
    assert iou >= 0.98, float(iou)


def test_pipeline_single_and_several_expressions(model, processor):
    pipe = crobim_u.referring_segmentation_pipeline(model, processor=processor)
    assert isinstance(pipe, CrobimUReferringSegmentationPipeline)
    image = random_image(90, 70)
    single = pipe(image, "the red car")
    assert single["mask"].size == (90, 70) and single["mask"].mode == "L"
    assert set(np.unique(np.asarray(single["mask"]))) <= {0, 255}
    assert single["uncertainty"].shape == (70, 90)
    assert isinstance(single["score"], float) and single["expression"] == "the red car"
    several = pipe(image, ["the red car", "the large building"])
    assert [result["expression"] for result in several] == ["the red car", "the large building"]
    assert np.array_equal(np.asarray(several[0]["mask"]), np.asarray(single["mask"]))
    as_dicts = pipe([{"image": image, "expression": "the red car"}, {"image": image, "expression": "the car"}])
    assert len(as_dicts) == 2 and np.array_equal(np.asarray(as_dicts[0]["mask"]), np.asarray(single["mask"]))
    with pytest.raises(ValueError, match="Pass an expression"):
        pipe(image)


def test_pipeline_without_rus_has_no_uncertainty(processor):
    model = tiny_model(text_config={"vocab_size": len(WORDS)}, use_rus=False, use_ugf=False, use_udlr=False)
    result = crobim_u.referring_segmentation_pipeline(model, processor=processor)(random_image(40, 40), "the car")
    assert result["uncertainty"] is None


def save_everything(model, processor, folder):
    crobim_u.referring_segmentation_pipeline(model, processor=processor).save_pretrained(folder)
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer_config.json", "configuration_crobim_u.py", "modeling_crobim_u.py",
            "image_processing_crobim_u.py", "processing_crobim_u.py", "pipeline_crobim_u.py"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["referring-image-segmentation"]["impl"] == (
        "pipeline_crobim_u.CrobimUReferringSegmentationPipeline"
    )


def test_saved_folder_reloads_through_every_auto_class_with_the_package(model, processor, tmp_path):
    save_everything(model, processor, tmp_path)
    image = random_image(60, 50)
    assert type(AutoModel.from_pretrained(tmp_path)) is type(model)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is CrobimUImageProcessor
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded_processor) is CrobimUProcessor
    expected = crobim_u.referring_segmentation_pipeline(model, processor=processor)(image, "the red car")
    got = crobim_u.referring_segmentation_pipeline(str(tmp_path))(image, "the red car")
    assert np.array_equal(np.asarray(expected["mask"]), np.asarray(got["mask"]))
    np.testing.assert_array_equal(expected["uncertainty"], got["uncertainty"])
    # The generic entry point finds the task in config.json.
    generic = pipeline(model=str(tmp_path), trust_remote_code=True)
    assert np.array_equal(np.asarray(generic(image, "the red car")["mask"]), np.asarray(expected["mask"]))


CLEAN_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc, json
    class BlockCrobimU(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "crobim_u" or name.startswith("crobim_u."):
                raise ImportError("crobim_u is blocked in this process")
    sys.meta_path.insert(0, BlockCrobimU())
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, pipeline
    folder, image_path, output_path = sys.argv[1:4]
    image = Image.open(image_path)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pipe = pipeline(model=folder, trust_remote_code=True)
    modules = [type(x).__module__ for x in (processor, image_processor, model, pipe)]
    assert all(m.startswith("transformers_modules") for m in modules), modules
    encoding = processor(images=image, text=["the red car", "the large building"])
    sizes = encoding.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**encoding)
    masks = [r["mask"].numpy() for r in processor.post_process_referring_segmentation(outputs, target_sizes=sizes)]
    result = pipe(image, "the red car")
    np.savez(output_path, logits=outputs.logits.numpy(), mask0=masks[0], mask1=masks[1],
             pipe_mask=np.asarray(result["mask"]), pipe_uncertainty=result["uncertainty"])
    """
)


def test_saved_folder_reloads_without_the_package_and_gives_the_same_outputs(model, processor, tmp_path):
    folder = tmp_path / "checkpoint"
    save_everything(model, processor, folder)
    image = random_image(77, 55, seed=3)
    image.save(tmp_path / "image.png")
    result = run_without_crobim_u(
        CLEAN_PROCESS_SCRIPT, str(folder), str(tmp_path / "image.png"), str(tmp_path / "out.npz"), tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = np.load(tmp_path / "out.npz")

    encoding = processor(images=Image.open(tmp_path / "image.png"), text=["the red car", "the large building"])
    sizes = encoding.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**encoding)
    results = processor.post_process_referring_segmentation(outputs, target_sizes=sizes)
    # Another process: floats to a few float32 steps, masks exactly away from the threshold (helpers.py).
    assert_close_across_processes(remote["logits"], outputs.logits.numpy())
    for index, result in enumerate(results):
        probabilities = result["probabilities"].numpy()
        assert_masks_equal_away_from_threshold(remote[f"mask{index}"], result["mask"].numpy(), probabilities)
    local = crobim_u.referring_segmentation_pipeline(model, processor=processor)(Image.open(tmp_path / "image.png"), "the red car")
    assert_masks_equal_away_from_threshold(remote["pipe_mask"], np.asarray(local["mask"]), results[0]["probabilities"])
    assert_close_across_processes(remote["pipe_uncertainty"], local["uncertainty"])


def test_pixel_values_sit_in_torch_memory_at_one_alignment_in_every_call(processor):
    # numpy's buffers are 16-byte aligned at addresses that vary between calls and processes; BLAS kernels may block
    # by alignment, so the model always gets torch's 64-byte-aligned memory.
    for seed in range(6):
        pixel_values = processor(images=random_image(30 + seed, 20, seed=seed), text=["the red car"])["pixel_values"]
        assert pixel_values.data_ptr() % 64 == 0


def test_cross_process_tolerance_still_fails_on_a_real_difference():
    values = np.linspace(-8, 8, 101, dtype=np.float32)
    assert_close_across_processes(np.nextafter(values, np.float32(np.inf)), values)  # one float32 step passes
    with pytest.raises(AssertionError):
        assert_close_across_processes(values + 1e-4, values)  # e.g. another resize or a bfloat16 round trip
    probabilities = np.linspace(0.0, 1.0, 1001)
    with pytest.raises(AssertionError):
        assert_masks_equal_away_from_threshold(probabilities > 0.6, probabilities > 0.5, probabilities)
