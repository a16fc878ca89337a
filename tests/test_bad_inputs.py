"""The bad-input table: one row per bad input, each with its expected outcome, either handled (and how) or a specific
exception whose message names the problem. docs/input-handling.md summarises it."""

import io
import json
import logging
import os
import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    WORDS,
    make_processor,
    rrsisd_instances,
    rrsisd_refs,
    tiny_inputs,
    tiny_model,
    write_refsegrs,
    write_rrsisd,
)
from PIL import Image

from crobim_u import CrobimUImageProcessor
from crobim_u.data import DatasetFormatError, MissingDataFileError, load_refsegrs, load_risbench, load_rrsisd
from crobim_u.inference.loading import load_checkpoint
from crobim_u.inference.predict import PredictOptions, predict_files


SIZE = 64
IMAGE_PROCESSOR = CrobimUImageProcessor(size={"height": SIZE, "width": SIZE})
PROCESSOR = make_processor(size=SIZE, max_length=12)
# One normalized 8-bit level: the tolerance of colour checks.
LEVEL = 1 / 255 / 0.224 + 1e-6


@dataclass(frozen=True)
class Row:
    """A bad input: `act(tmp_path, context)` feeds it in; the outcome is `error` matching `message`, or `check`."""

    name: str
    act: Callable[[Path, SimpleNamespace], Any]
    error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    message: str | None = None
    check: Callable[[Any], None] | None = None


def raises(name: str, act, error, message: str, **marks) -> Any:
    return pytest.param(Row(name, act, error=error, message=message), id=name, **marks)


def handled(name: str, act, check, **marks) -> Any:
    return pytest.param(Row(name, act, check=check), id=name, **marks)


# ---- Helpers that build the bad inputs ----


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height`: a decompression bomb's header, in 70 bytes."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def random_rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pixel(outputs, y: int = 0, x: int = 0) -> np.ndarray:
    """The 8-bit RGB value a normalized pixel came from."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return (outputs.pixel_values[0, :, y, x].numpy() * std + mean) * 255


def segment(context: SimpleNamespace, image: Any, text: Any) -> list[dict]:
    inputs = PROCESSOR(images=image, text=text)
    sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        return PROCESSOR.post_process_referring_segmentation(context.model(**inputs), target_sizes=sizes)


def forward_with_labels(context: SimpleNamespace, labels: torch.Tensor) -> torch.Tensor:
    inputs = tiny_inputs(batch_size=2, size=SIZE)
    with torch.no_grad():
        return context.loss_model(**{**inputs, "labels": labels}).loss


def copy_checkpoint(tmp: Path, context: SimpleNamespace) -> Path:
    return Path(shutil.copytree(context.checkpoint, tmp / "checkpoint"))


def edit_config(tmp: Path, context: SimpleNamespace, **changes: Any) -> Path:
    folder = copy_checkpoint(tmp, context)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def truncated_weights(tmp: Path, context: SimpleNamespace) -> Path:
    folder = copy_checkpoint(tmp, context)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def tampered_header(tmp: Path, context: SimpleNamespace) -> Path:
    """A safetensors file whose header gives a tensor a shape its bytes cannot hold."""
    folder = copy_checkpoint(tmp, context)
    data = (folder / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(key for key in header if key != "__metadata__")
    header[name]["shape"] = [7, 7, 7, 7]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (folder / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])
    return folder


def tampered_data(tmp: Path, context: SimpleNamespace) -> tuple[Any, Any]:
    """The last 64 bytes of tensor data flipped: the header is intact."""
    folder = copy_checkpoint(tmp, context)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-64:] = bytes(255 - byte for byte in data[-64:])
    (folder / "model.safetensors").write_bytes(bytes(data))
    return load_checkpoint(folder)[0], context.model


def pickled_weights_only(tmp: Path, context: SimpleNamespace) -> Path:
    folder = copy_checkpoint(tmp, context)
    (folder / "model.safetensors").unlink()
    torch.save(context.model.state_dict(), folder / "pytorch_model.bin")
    return folder


def refsegrs_with(tmp: Path, phrases: str | None = None, remove: str | None = None) -> Path:
    write_refsegrs(tmp)
    if phrases is not None:
        (tmp / "output_phrase_train.txt").write_text(phrases)
    if remove is not None:
        (tmp / remove).unlink()
    return tmp


def refsegrs_with_small_mask(tmp: Path) -> Path:
    write_refsegrs(tmp)
    Image.new("L", (5, 5)).save(tmp / "masks" / "0.tif")
    return tmp


def rrsisd_instances_file(tmp: Path, text: str | None) -> Path:
    """RRSIS-D with `instances.json` replaced by `text`, or removed (`None`)."""
    write_rrsisd(tmp)
    path = tmp / "rrsisd" / "instances.json"
    path.unlink() if text is None else path.write_text(text)
    return tmp


def rrsisd_with(tmp: Path, change: Callable[[list, dict], None]) -> Path:
    refs, instances = rrsisd_refs(), rrsisd_instances()
    change(refs, instances)
    write_rrsisd(tmp, refs, instances)
    return tmp


def load_malicious_pickle(tmp: Path, context: SimpleNamespace) -> None:
    marker = tmp / "pwned"

    class RunsCommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_rrsisd(tmp, refs=[RunsCommand()])
    try:
        load_rrsisd(str(tmp))
    finally:
        assert not marker.exists(), "the pickle ran its command"


def skip_malformed_lines(tmp: Path, context: SimpleNamespace) -> tuple[Any, str]:
    root = refsegrs_with(tmp, phrases="0 road along the river\n7\n1 the white building\n")
    logger = logging.getLogger("crobim_u.data")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        dataset = load_refsegrs(str(root), splits=["train"], skip_invalid=True)
    finally:
        logger.removeHandler(handler)
    return dataset["train"].with_format(None)["expression"], " ".join(record.getMessage() for record in records)


def risbench_grey_mask(tmp: Path, context: SimpleNamespace) -> np.ndarray:
    for folder in ("img_rgb", "mask"):
        (tmp / folder).mkdir()
    Image.fromarray(random_rgb(10, 12)).save(tmp / "img_rgb" / "a.png")
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 128  # neither 1 nor 255
    mask[0, 0] = 100  # faint: background
    Image.fromarray(mask).save(tmp / "mask" / "a.png")
    (tmp / "output_phrase_train.txt").write_text("a.png the pond\n")
    return np.asarray(load_risbench(str(tmp))["train"][0]["mask"])


def predict_with_truncated_file(tmp: Path, context: SimpleNamespace) -> list[dict]:
    good = tmp / "good.png"
    Image.fromarray(random_rgb()).save(good)
    write(tmp / "bad.jpg", png_bytes(Image.fromarray(random_rgb()))[:200])
    return predict_files(context.model, PROCESSOR, [good, tmp / "bad.jpg"], ["the red car"], tmp / "out",
                         PredictOptions(), progress=False)


def every_pil_mode(tmp: Path, context: SimpleNamespace) -> dict[str, Any]:
    return {mode: IMAGE_PROCESSOR(Image.new(mode, (5, 4))) for mode in Image.MODES if mode != "LAB"}


# ---- Checks of handled inputs ----


def check_one_pixel(results: list[dict]) -> None:
    assert len(results) == 1 and results[0]["mask"].shape == (1, 1) and results[0]["uncertainty"].shape == (1, 1)


def check_every_mode(outputs: dict[str, Any]) -> None:
    assert len(outputs) == len(Image.MODES) - 1 >= 19
    for mode, output in outputs.items():
        assert output.pixel_values.shape == (1, 3, SIZE, SIZE) and output.original_sizes == [(4, 5)], mode


def check_truncated_file_is_reported(records: list[dict]) -> None:
    assert [(Path(record["input"]).name, record["status"]) for record in records] == [("good.png", "ok"),
                                                                                      ("bad.jpg", "error")]
    assert records[1]["error"] == "OSError: image file is truncated" and records[1]["mask"] is None


def check_sizes(*expected: tuple[int, int]) -> Callable[[Any], None]:
    def check(outputs: Any) -> None:
        assert outputs.original_sizes == list(expected)
        assert outputs.pixel_values.shape == (len(expected), 3, SIZE, SIZE)

    return check


def check_colour(rgb: tuple[int, int, int]) -> Callable[[Any], None]:
    def check(outputs: Any) -> None:
        np.testing.assert_allclose(pixel(outputs), rgb, atol=0.51)

    return check


def check_truncated_text(encoding: Any) -> None:
    assert encoding["input_ids"].shape == (1, 12)
    assert PROCESSOR.tokenizer.convert_ids_to_tokens(encoding["input_ids"][0].tolist())[-1] == "[SEP]"


def check_unknown_words(results: tuple[list[str], list[dict]]) -> None:
    tokens, predictions = results
    # Words outside the vocabulary (the emoji, "café", each CJK character) become [UNK]; known words stay.
    assert tokens == ["[CLS]", "the", "[UNK]", "[UNK]", "the", "[UNK]", "[UNK]", "[UNK]", "[SEP]"]
    assert predictions[0]["mask"].shape == (20, 30)


def check_same_loss(losses: tuple[torch.Tensor, ...]) -> None:
    reference, *others = losses
    for loss in others:
        torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def check_skipped(result: tuple[list[str], str]) -> None:
    expressions, log = result
    assert expressions == ["road along the river", "the white building"]
    assert "Skipped 1 invalid items" in log and "line 2: expected '<id> <expression>', got '7'" in log


def check_grey_mask(mask: np.ndarray) -> None:
    expected = np.zeros((10, 12), np.uint8)
    expected[2:6, 3:9] = 1
    np.testing.assert_array_equal(mask, expected)


def check_tampered_data_loads(models: tuple[Any, Any]) -> None:
    loaded, original = models
    different = [name for name, value in original.state_dict().items()
                 if not torch.equal(value, loaded.state_dict()[name])]
    assert len(different) >= 1  # the change went unnoticed: safetensors has no checksum


# ---- The table ----


ROWS = [
    # Image files
    raises("corrupt-image-bytes", lambda tmp, c: IMAGE_PROCESSOR(write(tmp / "bad.png", os.urandom(256))),
           Image.UnidentifiedImageError, r"cannot identify image file '.*bad\.png'"),
    raises("truncated-png",
           lambda tmp, c: IMAGE_PROCESSOR(write(tmp / "half.png", png_bytes(Image.fromarray(random_rgb()))[:600])),
           OSError, r"^images\[0\] \(.*half\.png\): the image data cannot be decoded \(image file is truncated"),
    handled("truncated-file-in-predict", predict_with_truncated_file, check_truncated_file_is_reported),
    raises("missing-image-file", lambda tmp, c: IMAGE_PROCESSOR(tmp / "nowhere.png"),
           FileNotFoundError, r"nowhere\.png"),
    raises("decompression-bomb-header",
           lambda tmp, c: IMAGE_PROCESSOR(write(tmp / "bomb.png", png_claiming_size(100_000, 100_000))),
           Image.DecompressionBombError,
           r"^images\[0\] \(.*bomb\.png\): Image size \(10000000000 pixels\) exceeds limit.*MAX_IMAGE_PIXELS"),
    # Image sizes, modes, dtypes, layouts, values
    raises("zero-size-pil", lambda tmp, c: IMAGE_PROCESSOR(Image.new("RGB", (0, 5))),
           ValueError, r"^images\[0\]: the image is empty \(size 0x5\)"),
    raises("zero-size-array", lambda tmp, c: IMAGE_PROCESSOR(np.zeros((0, 5, 3), np.uint8)),
           ValueError, r"^images\[0\]: the image is empty \(shape \(0, 5, 3\)\)"),
    handled("one-pixel-image", lambda tmp, c: segment(c, Image.new("RGB", (1, 1), (200, 30, 30)), "the red car"),
            check_one_pixel),
    handled("every-pil-mode-but-lab", every_pil_mode, check_every_mode),
    raises("pil-mode-lab", lambda tmp, c: IMAGE_PROCESSOR(Image.new("LAB", (4, 4))),
           ValueError, r"^images\[0\]: unsupported PIL mode 'LAB'"),
    handled("rgba-transparent", lambda tmp, c: IMAGE_PROCESSOR(Image.new("RGBA", (4, 4), (250, 250, 250, 0))),
            check_colour((0, 0, 0))),
    handled("uint16-array", lambda tmp, c: IMAGE_PROCESSOR(np.full((4, 4, 3), [65535, 257 * 100, 128], np.uint16)),
            check_colour((255, 100, 0))),
    handled("float-array-0-1", lambda tmp, c: IMAGE_PROCESSOR(np.full((4, 4, 3), [1.0, 0.5, 0.0], np.float32)),
            check_colour((255, 128, 0))),
    raises("float-array-0-255", lambda tmp, c: IMAGE_PROCESSOR(np.full((4, 4, 3), 200.0, np.float32)),
           ValueError, r"^images\[0\]: float images must hold values in \[0, 1\]; got values in \[200, 200\]"),
    raises("int-array-above-255", lambda tmp, c: IMAGE_PROCESSOR(np.full((4, 4, 3), 1000, np.int32)),
           ValueError, r"^images\[0\]: int32 images must hold values in \[0, 255\]; got values in \[1000, 1000\]"),
    raises("nan-pixels", lambda tmp, c: IMAGE_PROCESSOR(np.where(np.eye(4)[..., None], np.nan, 0.5)),
           ValueError, r"^images\[0\]: the image contains NaN or infinite values"),
    raises("inf-pixels", lambda tmp, c: IMAGE_PROCESSOR(torch.full((3, 4, 4), float("inf"))),
           ValueError, r"^images\[0\]: the image contains NaN or infinite values"),
    raises("4-band-array", lambda tmp, c: IMAGE_PROCESSOR(np.zeros((20, 30, 4), np.uint16)),
           ValueError, r"^images\[0\]: expected 1 or 3 channels .* \(20, 30, 4\)\. 4 bands may be RGBA or RGB\+NIR"),
    raises("13-band-array", lambda tmp, c: IMAGE_PROCESSOR(np.zeros((13, 20, 30), np.uint16)),
           ValueError, r"^images\[0\]: .*\(13, 20, 30\)\. multispectral input needs band selection"),
    handled("chw-numpy", lambda tmp, c: IMAGE_PROCESSOR(random_rgb().transpose(2, 0, 1)), check_sizes((20, 30))),
    handled("hwc-torch", lambda tmp, c: IMAGE_PROCESSOR(torch.from_numpy(random_rgb())), check_sizes((20, 30))),
    handled("ambiguous-layout-numpy-is-hwc", lambda tmp, c: IMAGE_PROCESSOR(np.zeros((3, 20, 3), np.uint8)),
            check_sizes((3, 20))),
    handled("ambiguous-layout-with-input-data-format",
            lambda tmp, c: IMAGE_PROCESSOR(np.zeros((3, 20, 3), np.uint8), input_data_format="channels_first"),
            check_sizes((20, 3))),
    # Expressions
    raises("empty-expression", lambda tmp, c: PROCESSOR(images=random_rgb(), text=""),
           ValueError, r"Expression 0 is empty or whitespace only"),
    raises("whitespace-only-expression", lambda tmp, c: PROCESSOR(images=random_rgb(), text=["the car", " \t\n "]),
           ValueError, r"Expression 1 is empty or whitespace only"),
    raises("invisible-characters-only", lambda tmp, c: PROCESSOR(images=random_rgb(), text="\u200b\u200b"),
           ValueError, r"Expression 0 \('\\u200b\\u200b'\) has no token besides the special ones"),
    raises("non-string-expression", lambda tmp, c: PROCESSOR(images=random_rgb(), text=[42]),
           TypeError, r"Expression 0 must be a string, got int"),
    handled("1000-word-expression", lambda tmp, c: PROCESSOR(images=random_rgb(), text=" ".join(["red"] * 1000)),
            check_truncated_text),
    handled("non-ascii-and-emoji", lambda tmp, c: (
        PROCESSOR.tokenizer.convert_ids_to_tokens(PROCESSOR(text="the 🚗 near the café 東京")["input_ids"][0]),
        segment(c, random_rgb(), "the 🚗 near the café 東京"),
    ), check_unknown_words),
    raises("more-expressions-than-images",
           lambda tmp, c: PROCESSOR(images=[random_rgb()] * 2, text=["the car", "a road", "the pond"]),
           ValueError, r"Got 2 images and 3 expressions"),
    raises("model-images-vs-expressions", lambda tmp, c: c.model(
        pixel_values=torch.zeros(2, 3, SIZE, SIZE), input_ids=torch.ones(3, 4, dtype=torch.long)),
           ValueError, r"pixel_values has 2 images for 3 expressions"),
    # Masks and labels
    raises("mask-of-another-size",
           lambda tmp, c: IMAGE_PROCESSOR(np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2), np.uint8)),
           ValueError, r"segmentation_maps\[0\] is 3x2 \(HxW\) but images\[0\] is 2x2"),
    raises("mask-values-0-128",
           lambda tmp, c: IMAGE_PROCESSOR(np.zeros((2, 2, 3), np.uint8), np.array([[0, 128], [0, 0]], np.uint8)),
           ValueError, r"segmentation_maps\[0\]: mask values must be \{0, 1\} or \{0, 255\}.*found \[128\]"),
    raises("mask-values-0-1-255",
           lambda tmp, c: IMAGE_PROCESSOR(np.zeros((2, 2, 3), np.uint8), np.array([[0, 1], [255, 0]], np.uint8)),
           ValueError, r"segmentation_maps\[0\]: .*found \[1\]"),
    handled("labels-of-any-numeric-dtype", lambda tmp, c: tuple(
        forward_with_labels(c, tiny_inputs(size=SIZE)["labels"].to(dtype))
        for dtype in (torch.float32, torch.int64, torch.bool, torch.uint8, torch.float16)
    ), check_same_loss),
    raises("labels-0-255", lambda tmp, c: forward_with_labels(c, tiny_inputs(size=SIZE)["labels"] * 255),
           ValueError, r"labels must be binary masks in \{0, 1\}, got values \[0\.0, 255\.0\]"),
    raises("labels-nan", lambda tmp, c: forward_with_labels(c, torch.full((2, SIZE, SIZE), float("nan"))),
           ValueError, r"labels contain NaN or Inf"),
    raises("labels-of-another-size", lambda tmp, c: forward_with_labels(c, torch.zeros(2, 32, 32)),
           ValueError, r"labels must have shape .* = \(2, 64, 64\) .* got \(2, 32, 32\)"),
    handled("labels-on-another-device",
            lambda tmp, c: (forward_with_labels(c, tiny_inputs(size=SIZE)["labels"]),
                            forward_with_labels(c, tiny_inputs(size=SIZE)["labels"].cuda()).cpu()),
            check_same_loss, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")),
    raises("labels-on-the-meta-device",
           lambda tmp, c: forward_with_labels(c, torch.zeros(2, SIZE, SIZE, device="meta")),
           ValueError, r"labels are on the meta device"),
    raises("labels-complex-dtype",
           lambda tmp, c: forward_with_labels(c, torch.zeros(2, SIZE, SIZE, dtype=torch.complex64)),
           ValueError, r"labels must be real binary masks .*complex64"),
    # Data sets
    raises("dataset-missing-image-file", lambda tmp, c: load_refsegrs(str(refsegrs_with(tmp, remove="images/0.tif"))),
           MissingDataFileError, r"output_phrase_train\.txt, line 1: image file .*images/0\.tif does not exist"),
    raises("dataset-missing-phrase-files", lambda tmp, c: load_refsegrs(str(tmp)),
           FileNotFoundError, r"No RefSegRS phrase file in .*: expected output_phrase_\{train,val,test\}\.txt"),
    raises("dataset-missing-instances-json", lambda tmp, c: load_rrsisd(str(rrsisd_instances_file(tmp, None))),
           FileNotFoundError, r"RRSIS-D file .*instances\.json does not exist"),
    raises("malformed-phrase-line", lambda tmp, c: load_refsegrs(str(refsegrs_with(tmp, "0 the road\n7\n"))),
           DatasetFormatError, r"output_phrase_train\.txt, line 2: expected '<id> <expression>', got '7'"),
    handled("malformed-phrase-line-skipped", skip_malformed_lines, check_skipped),
    raises("duplicated-ref-ids", lambda tmp, c: load_rrsisd(str(rrsisd_with(tmp, lambda r, i: r.append(dict(r[0]))))),
           DatasetFormatError, r"refs\[3\]\.ref_id: expected unique ref ids, got 0 again \(first at refs\[0\]\)"),
    raises("duplicated-annotation-ids", lambda tmp, c: load_rrsisd(str(rrsisd_with(
        tmp, lambda r, i: i["annotations"].append(dict(i["annotations"][1]))))),
           DatasetFormatError, r"annotations\[3\]\.id: expected unique annotations ids, got 2 again"),
    raises("malformed-instances-json", lambda tmp, c: load_rrsisd(str(rrsisd_instances_file(tmp, '{"images": [,]}'))),
           DatasetFormatError, r"instances\.json, line 1 column 13: expected valid JSON"),
    raises("malicious-pickle", load_malicious_pickle,
           pickle.UnpicklingError, r"refs\(unc\)\.p: refusing to load the global (posix|os)\.system"),
    raises("dataset-mask-of-another-size", lambda tmp, c: load_refsegrs(str(refsegrs_with_small_mask(tmp)))["train"][0],
           DatasetFormatError, r"masks/0\.tif, mask size: expected the size of .*images/0\.tif, 12x10, got 5x5"),
    handled("dataset-mask-grey-values", risbench_grey_mask, check_grey_mask),
    # Checkpoints and configs
    raises("truncated-safetensors", lambda tmp, c: load_checkpoint(truncated_weights(tmp, c)),
           OSError, r"checkpoint: model\.safetensors is not a valid, complete safetensors file \(.*not fully covered"),
    raises("tampered-safetensors-header", lambda tmp, c: load_checkpoint(tampered_header(tmp, c)),
           OSError, r"model\.safetensors is not a valid, complete safetensors file \(.*invalid shape"),
    handled("tampered-safetensors-data", tampered_data, check_tampered_data_loads),
    raises("pickled-weights-only", lambda tmp, c: load_checkpoint(pickled_weights_only(tmp, c)),
           OSError, r"checkpoint: model\.safetensors is missing"),
    raises("config-of-another-model-type", lambda tmp, c: load_checkpoint(edit_config(tmp, c, model_type="bert")),
           ValueError, r"config\.json has model_type 'bert'; expected 'crobim_u'"),
    raises("config-with-zero-d-model", lambda tmp, c: load_checkpoint(edit_config(tmp, c, d_model=0)),
           ValueError, r"d_model \(0\) must be a positive multiple of num_attention_heads \(4\)"),
    raises("config-with-zero-heads", lambda tmp, c: load_checkpoint(edit_config(tmp, c, num_attention_heads=0)),
           ValueError, r"num_attention_heads \(0\), which must be at least 1"),
    raises("config-not-json", lambda tmp, c: load_checkpoint(
        write(copy_checkpoint(tmp, c) / "config.json", b'{"model_type": "crobim_u",').parent),
           OSError, r"config file at '.*config\.json' is not a valid JSON file"),
]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> SimpleNamespace:
    model = tiny_model(text_config={"vocab_size": len(WORDS)})
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(checkpoint)
    PROCESSOR.save_pretrained(checkpoint)
    return SimpleNamespace(model=model, loss_model=tiny_model(), checkpoint=checkpoint)


def test_the_table_has_a_row_for_every_kind_of_bad_input():
    names = {param.id for param in ROWS}
    assert len(names) == len(ROWS) >= 30


@pytest.mark.parametrize("row", ROWS)
def test_bad_input(row: Row, tmp_path: Path, context: SimpleNamespace):
    if row.error is not None:
        with pytest.raises(row.error, match=row.message):
            row.act(tmp_path, context)
    else:
        row.check(row.act(tmp_path, context))
