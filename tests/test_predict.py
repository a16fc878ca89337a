"""`crobim-u predict`: real images, corrupt files, folders and list files, naming, the tile rule."""

import numpy as np
import pytest
import torch
from helpers import (
    REAL_800,
    REAL_1111,
    make_processor,
    needs_real_data,
    random_image,
    read_results,
    save_checkpoint,
)
from PIL import Image

from crobim_u.cli import main
from crobim_u.inference.predict import PredictOptions, choose_mode, expand_inputs

EXPRESSIONS = ["the airplane on the right", "the large building"]


def corrupt_jpeg(path) -> str:
    """The first kilobyte of a real JPEG: opens, but fails to decode."""
    buffer = path.parent / "whole.jpg"
    random_image(64, 64).save(buffer, quality=90)
    path.write_bytes(buffer.read_bytes()[:1024])
    buffer.unlink()
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@needs_real_data
def test_real_images_and_a_corrupt_file(checkpoint, tmp_path, capsys):
    corrupt = corrupt_jpeg(tmp_path / "corrupt.jpg")
    output = tmp_path / "out"
    flags = ["--tile", "--window", "600", "--no_progress"]
    expression_flags = [flag for expression in EXPRESSIONS for flag in ("--expression", expression)]
    status = main(["predict", "--model", checkpoint, "--output_dir", str(output), *expression_flags, *flags,
                   str(REAL_800), corrupt, str(REAL_1111)])
    assert status == 1
    summary = capsys.readouterr().out
    assert f"FAILED {corrupt}" in summary and "1 failed" in summary and "REAL" not in summary

    records = read_results(output)
    assert [(record["input"], record["expression"]) for record in records] == [
        (path, expression) for path in (str(REAL_800), corrupt, str(REAL_1111)) for expression in EXPRESSIONS
    ]
    for record in records:
        if record["input"] == corrupt:
            assert record["status"] == "error" and "truncated" in record["error"] and record["mask"] is None
            continue
        assert record["status"] == "ok" and record["error"] is None and record["mode"] == "tiled"
        with Image.open(REAL_800 if record["input"] == str(REAL_800) else REAL_1111) as image:
            size = image.size
        with Image.open(record["mask"]) as mask:
            assert mask.size == size and mask.mode == "L" and set(np.unique(mask)) <= {0, 255}
            assert record["mask_area"] == np.count_nonzero(np.asarray(mask))
        with Image.open(record["uncertainty"]) as uncertainty:
            assert uncertainty.size == size and uncertainty.mode == "RGB"
        with Image.open(record["overlay"]) as overlay:
            assert overlay.width == 2 * size[0]
        assert 0 <= record["score"] <= 1 and record["vector"] is None
    assert {record["num_windows"] for record in records if record["status"] == "ok"} == {4, 9}


@needs_real_data
def test_folder_and_list_file_inputs(checkpoint, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / REAL_800.name).symlink_to(REAL_800)
    corrupt = corrupt_jpeg(folder / "broken.jpg")
    (folder / "notes.md").write_text("not an image")
    listing = tmp_path / "list" / "inputs.txt"
    listing.parent.mkdir()
    listing.write_text(f"# scenes\n{REAL_1111}\n\n../folder/{REAL_800.name}\n")

    output = tmp_path / "out"
    status = main(["predict", "--model", checkpoint, "--output_dir", str(output), "--expression", EXPRESSIONS[0],
                   "--tile", "never", "--no_progress", str(folder), str(listing)])
    assert status == 1
    records = read_results(output)
    assert [record["input"] for record in records] == [
        str(folder / REAL_800.name), corrupt, str(REAL_1111), str(listing.parent / ".." / "folder" / REAL_800.name)
    ]
    assert [record["status"] for record in records] == ["ok", "error", "ok", "ok"]
    done = [record for record in records if record["status"] == "ok"]
    assert all(record["mode"] == "resize" and record["num_windows"] == 1 for record in done)
    # Two inputs named 04133.png: their outputs do not overwrite each other.
    assert len({record["mask"] for record in done}) == 3
    assert f"FAILED {corrupt}" in capsys.readouterr().out


def test_small_images_go_through_the_processor_unchanged(checkpoint, tmp_path):
    image = random_image(50, 40)
    image.save(tmp_path / "small.png")
    status = main(["predict", "--model", checkpoint, "--output_dir", str(tmp_path / "out"), "--expression", "the red car",
                   "--no_progress", str(tmp_path / "small.png")])
    assert status == 0
    (record,) = read_results(tmp_path / "out")
    assert record["mode"] == "resize"

    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)
    encoding = processor(images=image, text=["the red car"])
    sizes = encoding.pop("original_sizes")
    with torch.inference_mode():
        expected = processor.post_process_referring_segmentation(model(**encoding), sizes)[0]
    with Image.open(record["mask"]) as mask:
        np.testing.assert_array_equal(np.asarray(mask) > 0, expected["mask"].numpy())
    assert record["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_no_inputs_found_is_a_failure(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="error: no input images found in "):
        main(["predict", "--model", checkpoint, "--output_dir", str(tmp_path / "out"), "--expression", "the car",
              "--no_progress", str(tmp_path / "empty")])


def test_expand_inputs(tmp_path):
    for name in ("b.png", "a.TIF", "c.txt", "d.json"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.png").write_bytes(b"")
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text("deep.png\n  \n# comment\n../b.png\n")
    assert expand_inputs([tmp_path, listing, tmp_path / "missing.jpg"]) == [
        str(tmp_path / "a.TIF"), str(tmp_path / "b.png"),
        str(tmp_path / "sub" / "deep.png"), str(tmp_path / "sub" / ".." / "b.png"),
        str(tmp_path / "missing.jpg"),
    ]


@pytest.mark.parametrize(
    "height, width, tile, expected",
    [(96, 96, "auto", "resize"), (97, 64, "auto", "tiled"), (800, 800, "never", "resize"), (64, 64, "always", "tiled")],
)
def test_tile_rule(height, width, tile, expected):
    # Tiled when a side exceeds 1.5 x the window, unless forced either way.
    assert choose_mode(height, width, (64, 64), PredictOptions(tile=tile)) == expected


def test_output_names_of_same_named_inputs(checkpoint, tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        random_image(40, 40).save(tmp_path / folder / "scene.png")
    output = tmp_path / "out"
    status = main(["predict", "--model", checkpoint, "--output_dir", str(output), "--expression", "The red car!",
                   "--no_progress", str(tmp_path / "x" / "scene.png"), str(tmp_path / "y" / "scene.png")])
    assert status == 0
    names = sorted(path.name for path in output.glob("*_mask.png"))
    assert names == ["scene-2_0_the-red-car_mask.png", "scene_0_the-red-car_mask.png"]


def test_a_one_pixel_high_image_gets_every_output(checkpoint, tmp_path):
    # The overlay is downscaled to 2048 wide and 1 high: it keeps both axes.
    image = random_image(5000, 1)
    image.save(tmp_path / "thin.png")
    status = main(["predict", "--model", checkpoint, "--output_dir", str(tmp_path / "out"), "--expression", "the road",
                   "--no_progress", str(tmp_path / "thin.png")])
    assert status == 0
    (record,) = read_results(tmp_path / "out")
    assert record["status"] == "ok" and record["error"] is None
    for field, size in (("mask", (5000, 1)), ("uncertainty", (5000, 1)), ("overlay", (2 * 2048, 1 + 14))):
        with Image.open(record[field]) as picture:
            assert picture.size == size, field


def test_a_failed_overlay_keeps_the_mask_and_is_recorded(checkpoint, tmp_path, monkeypatch, capsys):
    from crobim_u.inference import predict

    def broken_overlay(*args, **kwargs):
        raise RuntimeError("no room for the picture")

    random_image(40, 30).save(tmp_path / "scene.png")
    monkeypatch.setattr(predict, "draw_overlay", broken_overlay)
    arguments = ["predict", "--model", checkpoint, "--output_dir", str(tmp_path / "out"), "--expression", "the car",
                 "--no_progress", str(tmp_path / "scene.png")]
    assert main(arguments) == 1
    (record,) = read_results(tmp_path / "out")
    assert record["status"] == "partial" and record["overlay"] is None
    assert record["error"] == "overlay: RuntimeError: no room for the picture"
    with Image.open(record["mask"]) as mask, Image.open(record["uncertainty"]) as uncertainty:
        assert mask.size == uncertainty.size == (40, 30)
    assert not list((tmp_path / "out").glob("*overlay*")) and not list((tmp_path / "out").glob(".*"))
    assert f"PARTIAL {tmp_path / 'scene.png'}: overlay: RuntimeError" in capsys.readouterr().out
    # A partial input is not done: --resume writes its overlay once drawing works again.
    monkeypatch.undo()
    assert main([*arguments, "--resume"]) == 0
    (record,) = read_results(tmp_path / "out")
    assert record["status"] == "ok" and Image.open(record["overlay"]).size == (80, 30 + 14)


@pytest.mark.parametrize(
    "model, message",
    [
        ("{tmp}/no/such/model", "error: {tmp}/no/such/model does not exist; expected a checkpoint folder (with "
                                "config.json and model.safetensors) or a Hub model id (user/model)."),
        ("{tmp}/scene.png", "error: {tmp}/scene.png is a file; expected a checkpoint folder"),
        ("no-such-user/no-such-model", "error: no-such-user/no-such-model is not a local folder, and loading it as a "
                                       "Hub model id failed: "),
    ],
)
def test_a_model_that_is_not_there_is_named(tmp_path, model, message):
    random_image(40, 30).save(tmp_path / "scene.png")
    model = model.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as raised:
        main(["predict", "--model", model, "--output_dir", str(tmp_path / "out"), "--expression", "the car",
              "--no_progress", str(tmp_path / "scene.png")])
    assert str(raised.value.code).startswith(message.format(tmp=tmp_path))


def refuse_model_loading(monkeypatch):
    from crobim_u.inference import predict

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(predict, "load_checkpoint_or_exit", fail)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--expression", "the car", "--expression", " "],
         "error: --expression number 2 is empty; a referring expression needs words."),
        (["--expression", "the car", "--output_dir", "{tmp}/taken"],
         "error: {tmp}/taken is an existing file; the output must be a folder (created if missing)."),
        (["--expression", "the car", "--overlap", "1.5"], "error: overlap must lie in [0, 1), got 1.5."),
        (["--expression", "the car", "--threshold", "1"], "error: threshold must lie in (0, 1), got 1.0."),
        (["--expression", "the car", "--window", "0"], "error: window must be positive, got (0, 0)."),
        (["--expression", "the car", "--stretch", "90,10"],
         "error: percentiles must satisfy 0 <= low < high <= 100, got (90.0, 10.0)."),
    ],
)
def test_bad_arguments_are_refused_once_before_the_model_loads(tmp_path, monkeypatch, flags, message):
    refuse_model_loading(monkeypatch)
    (tmp_path / "taken").write_text("")
    inputs = []
    for index in range(3):
        random_image(40, 30).save(tmp_path / f"scene{index}.png")
        inputs.append(str(tmp_path / f"scene{index}.png"))
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    if "--output_dir" not in flags:
        flags += ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as raised:
        main(["predict", "--model", "unused", "--no_progress", *flags, *inputs])
    assert raised.value.code == message.format(tmp=tmp_path)
    assert not (tmp_path / "out").exists()


def test_predict_files_refuses_an_empty_expression_before_reading_inputs(tmp_path):
    from crobim_u.inference.predict import predict_files

    with pytest.raises(ValueError, match="Expression 1 is empty or whitespace only"):
        predict_files(None, make_processor(), [tmp_path / "missing.png"], ["the car", ""], tmp_path / "out")
    with pytest.raises(NotADirectoryError, match="is an existing file; the output must be a folder"):
        (tmp_path / "file").write_text("")
        predict_files(None, make_processor(), [tmp_path / "missing.png"], ["the car"], tmp_path / "file")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_subfolders_says_how_to_include_them(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "scenes" / "2024").mkdir(parents=True)
    random_image(40, 30).save(tmp_path / "scenes" / "2024" / "scene.png")
    arguments = ["predict", "--model", checkpoint, "--output_dir", str(tmp_path / "out"), "--expression", "the car",
                 "--no_progress", str(tmp_path / "scenes")]
    with monkeypatch.context() as patch:
        refuse_model_loading(patch)
        with pytest.raises(SystemExit) as raised:
            main(arguments)
    assert str(raised.value.code).startswith(f"error: no input images found in {tmp_path / 'scenes'} (image suffixes")
    assert str(raised.value.code).endswith(
        "Subfolders of folder inputs are not searched; add --recursive to include them."
    )
    assert main([*arguments, "--recursive"]) == 0
    (record,) = read_results(tmp_path / "out")
    assert record["input"] == str(tmp_path / "scenes" / "2024" / "scene.png") and record["status"] == "ok"


def test_expand_inputs_recursive(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("top.png", "a/mid.jpg", "a/b/deep.tif", "a/b/notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([tmp_path]) == [str(tmp_path / "top.png")]
    assert expand_inputs([tmp_path], recursive=True) == [
        str(tmp_path / "a" / "b" / "deep.tif"), str(tmp_path / "a" / "mid.jpg"), str(tmp_path / "top.png")
    ]
