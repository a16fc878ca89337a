"""
Plain builders shared by the test modules: `from helpers import ...` (pytest puts `tests/` on `sys.path`).

Fixtures and session settings live in `conftest.py`; everything here is an ordinary function, class or constant.
No test module imports another test module (`test_repository.py` checks it): a helper two modules need moves here.

Sections, by what they build:
- real test images and cross-process tolerances
- tiny models and checkpoints
- processors and tokenizers
- images and data sets
- data-set file writers (RefSegRS, RRSIS-D, RISBench in their official layouts; the metadata.jsonl folder)
- CLI runners and their outputs
"""

import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from pycocotools import mask as coco_mask
from transformers import BertTokenizer
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation, CrobimUImageProcessor, CrobimUProcessor
from crobim_u.inference.predict import RESULTS_FILE


# --- real test images and cross-process tolerances ------------------------------------------------------------------


# Third-party fixtures (test use only, never copied into the repository): ../shared/data/real beside the checkout,
# or wherever CROBIM_U_REAL_DATA points.
REAL_DATA = pathlib.Path(
    os.environ.get("CROBIM_U_REAL_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
)
REAL_800 = REAL_DATA / "geochat" / "demo_images" / "04133.png"  # 800x800
REAL_1111 = REAL_DATA / "dota-devkit" / "example" / "images" / "P0706.png"  # 1111 wide, 1182 high
needs_real_data = pytest.mark.skipif(not REAL_800.exists(), reason=f"real test images not found under {REAL_DATA}")


# Bit equality is asserted where it is the point: the same process, the same code path (reload, determinism, a shared
# image against its copies). Floats computed in another process (a child without the package, a killed job resumed)
# may differ in their last bits: hosts differ (Intel, AMD), and BLAS kernels may pick a blocking by memory alignment.
# Those are compared to CROSS_PROCESS_STEPS float32 steps of max(|value|, 1): far below what a wrong path gives (another
# resize, dtype or order of operations differs by 1e-4 or more).
CROSS_PROCESS_STEPS = 16
CROSS_PROCESS_ATOL = CROSS_PROCESS_STEPS * float(np.finfo(np.float32).eps)


def assert_close_across_processes(actual, expected) -> None:
    """Floats from two processes agree to `CROSS_PROCESS_STEPS` float32 steps (relative above 1, absolute below)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=CROSS_PROCESS_ATOL, atol=CROSS_PROCESS_ATOL)


def assert_masks_equal_away_from_threshold(actual, expected, probabilities, threshold: float = 0.5) -> None:
    """
    Thresholded masks from two processes are equal wherever the probability lies more than the cross-process tolerance
    from the threshold (a pixel within a float32 step of it may fall either way); returns nothing, asserts.
    """
    actual, expected = np.asarray(actual).astype(bool), np.asarray(expected).astype(bool)
    clear = np.abs(np.asarray(probabilities, dtype=np.float64) - threshold) > CROSS_PROCESS_ATOL
    assert clear.mean() > 0.99, "almost every probability sits at the threshold: the comparison would mean nothing"
    np.testing.assert_array_equal(actual[clear], expected[clear])


# --- tiny models and checkpoints ------------------------------------------------------------------------------------


TINY_VOCAB_SIZE = 99


def tiny_config(**overrides) -> CrobimUConfig:
    """The `tiny` preset with a small vocabulary, for fast tests."""
    text_config = {"vocab_size": TINY_VOCAB_SIZE, **overrides.pop("text_config", {})}
    return CrobimUConfig.from_preset("tiny", text_config=text_config, **overrides)


def tiny_model(seed: int = 0, **overrides) -> CrobimUForReferringSegmentation:
    """A seeded random model of `tiny_config(**overrides)`, in eval mode."""
    torch.manual_seed(seed)
    return CrobimUForReferringSegmentation(tiny_config(**overrides)).eval()


def tiny_inputs(batch_size: int = 2, size: int = 64, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images, token ids with some padding, and blob-shaped binary labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TINY_VOCAB_SIZE, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, length - 2 :] = 0
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(size // 4, 3 * size // 4, (batch_size, 2), generator=generator)
    labels = torch.stack([((ys - cy) ** 2 + (xs - cx) ** 2 < (size // 6) ** 2) for cy, cx in centres.tolist()])
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels.float(),
    }


class BrightnessModel(torch.nn.Module):
    """
    A stand-in with the model's interface whose logits are a fixed function of each pixel: `20 * (brightness - 0.5)`,
    so bright pixels are foreground. Every window sees the same value for a pixel, which makes blending testable
    exactly; it counts its text encodings.
    """

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and dtype
        self.text_encodings = 0

    def encode_text(self, input_ids, attention_mask=None, token_type_ids=None):
        self.text_encodings += 1
        return torch.zeros(*input_ids.shape, 1), attention_mask.bool()

    def forward(self, pixel_values, input_ids=None, attention_mask=None, image_indices=None, text_embeddings=None):
        if text_embeddings is None:
            self.encode_text(input_ids, attention_mask)
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        brightness = (pixel_values * std + mean).mean(dim=1, keepdim=True)
        if image_indices is not None:
            brightness = brightness[image_indices]
        logits = 20 * (brightness - 0.5)
        return SimpleNamespace(logits=logits, uncertainty_logits=F.avg_pool2d(logits, 32))


def save_checkpoint(path) -> str:
    """A tiny random model with a 64x64 processor, saved as `crobim-u predict --model` loads it."""
    tiny_model(text_config={"vocab_size": len(WORDS)}).save_pretrained(path)
    make_processor(size=64).save_pretrained(path)
    return str(path)


# --- processors and tokenizers --------------------------------------------------------------------------------------


# The vocabulary of `make_processor`'s tokenizer: every word of the test expressions.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "car", "left", "of", "large", "building",
         "white", "on", "right", "airplane", "baseball", "field", "is"]


def make_processor(size: int = 64, max_length: int = 12) -> CrobimUProcessor:
    """A processor resizing to `size` x `size`, with an in-memory word-level tokenizer over `WORDS`."""
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)})
    return CrobimUProcessor(CrobimUImageProcessor(size={"height": size, "width": size}), tokenizer, max_length=max_length)


# --- images and data sets -------------------------------------------------------------------------------------------


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A seeded RGB image of uniform noise."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def small_dataset(num: int = 5) -> Dataset:
    """`num` test-split rows of different sizes, with masks, class masks and two alternating expressions."""
    rng = np.random.default_rng(0)
    rows = {"image": [], "mask": [], "expression": [], "image_id": [], "split": [], "category": [], "class_mask": []}
    for index in range(num):
        height, width = 40 + 8 * index, 56 - 4 * index  # sizes differ between samples
        mask = np.zeros((height, width), np.uint8)
        mask[5 : 5 + 3 * index + 4, 10:30] = 1
        rows["image"].append(PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
        rows["mask"].append(PIL.Image.fromarray(mask))
        rows["class_mask"].append(PIL.Image.fromarray(np.maximum(mask, np.eye(height, width, dtype=np.uint8))))
        rows["expression"].append(["the red car", "the large building on the left"][index % 2])
        rows["image_id"].append(str(index))
        rows["split"].append("test")
        rows["category"].append("car")
    return Dataset.from_dict(rows)


# --- data-set file writers ------------------------------------------------------------------------------------------


HEIGHT, WIDTH = 10, 12  # RefSegRS images


def random_rgb(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A seeded uint8 (height, width, 3) array of uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(top: int, left: int, bottom: int, right: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A uint8 mask, 1 inside the box [top, bottom) x [left, right)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


REFSEGRS_MASKS = {"0": box_mask(2, 3, 5, 7), "1": box_mask(0, 0, 10, 2), "2": box_mask(6, 6, 9, 12)}
REFSEGRS_PHRASES = {
    "train": "0 road along the river\n1 the  white building\n0 road left\n",
    "val": "2 a car in the top right\n\n",  # a trailing blank line is not a sample
    "test": "1 building on the left\n",
}


def write_refsegrs(root) -> None:
    """RefSegRS under `root`: images/ and masks/ of `REFSEGRS_MASKS`, and one phrase file per split."""
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    for seed, (image_id, mask) in enumerate(REFSEGRS_MASKS.items()):
        PIL.Image.fromarray(random_rgb(seed)).save(root / "images" / f"{image_id}.tif")
        # Foreground is 200, and a faint 30 (below the threshold of 50) must stay background.
        stored = np.where(mask == 1, 200, 0).astype(np.uint8)
        stored[0, WIDTH - 1] = 30
        PIL.Image.fromarray(stored).save(root / "masks" / f"{image_id}.tif")
    for split, text in REFSEGRS_PHRASES.items():
        (root / f"output_phrase_{split}.txt").write_text(text)


RRSISD_HEIGHT, RRSISD_WIDTH = 8, 9


def rrsisd_masks() -> dict[int, np.ndarray]:
    """Expected masks by annotation id: compressed RLE (1), polygon (2), uncompressed RLE (3)."""
    return {
        1: box_mask(1, 1, 4, 5, RRSISD_HEIGHT, RRSISD_WIDTH),
        2: box_mask(1, 2, 4, 6, RRSISD_HEIGHT, RRSISD_WIDTH),  # the polygon below, rasterized the COCO way
        3: np.random.default_rng(3).integers(0, 2, (RRSISD_HEIGHT, RRSISD_WIDTH), dtype=np.uint8),
    }


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of `mask` (column-major run lengths, starting with a run of zeros)."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": counts if flat[0] == 0 else [0] + counts}


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of `mask`, its counts as a JSON-ready string."""
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def rrsisd_instances() -> dict:
    """instances.json: three images, one annotation each (the three segmentation kinds of `rrsisd_masks`)."""
    masks = rrsisd_masks()
    return {
        "images": [
            {"id": image_id, "file_name": f"{image_id:05d}.jpg", "height": RRSISD_HEIGHT, "width": RRSISD_WIDTH}
            for image_id in (10, 11, 12)
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "segmentation": compressed_rle(masks[1])},
            {"id": 2, "image_id": 11, "category_id": 6, "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            {"id": 3, "image_id": 12, "category_id": 5, "segmentation": uncompressed_rle(masks[3])},
        ],
        "categories": [{"id": 5, "name": "vehicle"}, {"id": 6, "name": "storage tank"}],
    }


def sentence(sent_id: int, sent: str) -> dict:
    """One entry of a ref's `sentences`, as refs(unc).p stores it."""
    return {"raw": sent.capitalize() + ".", "sent": sent, "tokens": sent.split(), "sent_id": sent_id}


def rrsisd_refs() -> list[dict]:
    """refs(unc).p: one ref per split (train has two sentences), over the annotations of `rrsisd_instances`."""

    def ref(ref_id, ann_id, image_id, category_id, split, sentences):
        return {
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": category_id, "split": split,
            "file_name": f"{image_id:05d}_{ann_id}.jpg", "sent_ids": [s["sent_id"] for s in sentences],
            "sentences": sentences,
        }

    return [
        ref(0, 1, 10, 5, "train", [sentence(0, "the vehicle on the left"), sentence(1, "a small car")]),
        ref(1, 2, 11, 6, "val", [sentence(2, "the storage tank")]),
        ref(2, 3, 12, 5, "test", [sentence(3, "scattered vehicles")]),
    ]


def write_rrsisd(root, refs=None, instances=None) -> None:
    """RRSIS-D under `root`: JPEG images, refs(unc).p and instances.json (by default `rrsisd_refs`, `_instances`)."""
    os.makedirs(root / "rrsisd", exist_ok=True)
    os.makedirs(root / "images" / "rrsisd" / "JPEGImages", exist_ok=True)
    for image_id in (10, 11, 12):
        PIL.Image.fromarray(random_rgb(image_id, RRSISD_HEIGHT, RRSISD_WIDTH)).save(
            root / "images" / "rrsisd" / "JPEGImages" / f"{image_id:05d}.jpg"
        )
    with open(root / "rrsisd" / "refs(unc).p", "wb") as file:
        pickle.dump(rrsisd_refs() if refs is None else refs, file)
    (root / "rrsisd" / "instances.json").write_text(json.dumps(rrsisd_instances() if instances is None else instances))


RISBENCH_MASKS = {"a_1": box_mask(0, 0, 3, 3), "b_2": box_mask(5, 4, 10, 12)}  # by image id (file name stem)
RISBENCH_PHRASES = {
    "train": "a_1.png the field at the top left\nb_2.png a large ship\n",
    "test": "b_2.png the ship at the bottom right\n",  # no val file: the data set has no validation split
}


def write_risbench(root, image_dir: str = "img_rgb", mask_dir: str = "mask", foreground: int = 255) -> None:
    """
    RISBench under `root`: `image_dir`/ and `mask_dir`/ (either of its two layouts) of `RISBENCH_MASKS` as PNG, the
    foreground stored as `foreground` (255 or 1: both read as 1), and the phrase files `RISBENCH_PHRASES`.
    """
    os.makedirs(root / image_dir)
    os.makedirs(root / mask_dir)
    for seed, (image_id, mask) in enumerate(RISBENCH_MASKS.items()):
        PIL.Image.fromarray(random_rgb(seed)).save(root / image_dir / f"{image_id}.png")
        PIL.Image.fromarray((mask * foreground).astype(np.uint8)).save(root / mask_dir / f"{image_id}.png")
    for split, text in RISBENCH_PHRASES.items():
        (root / f"output_phrase_{split}.txt").write_text(text)


def folder_mask(seed: int) -> np.ndarray:
    """The 0/1 mask that `write_folder_images` writes for its `seed`-th name."""
    return box_mask(seed, seed, seed + 3, seed + 4)


def write_folder_images(folder, names) -> None:
    """`<name>.png` (`random_rgb(seed)`) and `<name>_mask.png` (`folder_mask(seed)`, stored 0/255) for each name."""
    os.makedirs(folder, exist_ok=True)
    for seed, name in enumerate(names):
        PIL.Image.fromarray(random_rgb(seed)).save(folder / f"{name}.png")
        PIL.Image.fromarray(folder_mask(seed) * 255).save(folder / f"{name}_mask.png")


def write_jsonl(path, records) -> None:
    """One line per record: a dict as JSON, a string as it is (for malformed lines)."""
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))


FOLDER_IMAGES = ("x", "y", "z")
FOLDER_RECORDS = [
    {"file_name": "x.png", "mask_file_name": "x_mask.png", "expression": "the pond", "split": "train",
     "category": "water"},
    {"file_name": "y.png", "mask_file_name": "y_mask.png", "expression": "a road", "split": "train",
     "category": "road"},
    {"file_name": "x.png", "mask_file_name": "x_mask.png", "expression": "the pond on the left", "split": "train",
     "category": "water"},
    {"file_name": "z.png", "mask_file_name": "z_mask.png", "expression": "a field", "split": "val"},  # no category
    {"file_name": "y.png", "mask_file_name": "y_mask.png", "expression": "the road at the top", "split": "test",
     "category": "road"},
]


def write_folder(root) -> None:
    """A `folder` data set under `root`: the images `FOLDER_IMAGES` and one `metadata.jsonl` of `FOLDER_RECORDS`."""
    write_folder_images(root, FOLDER_IMAGES)
    write_jsonl(root / "metadata.jsonl", FOLDER_RECORDS)


# --- CLI runners and their outputs ----------------------------------------------------------------------------------


TRAIN_IMAGE_SIZE = 64  # of `run_flags`' model and synthetic samples


def run_flags(output_dir, cache_dir, *extra) -> list[str]:
    """Flags of a tiny run on 16 synthetic 64x64 samples, 4 per batch."""
    return [
        "--preset", "tiny", "--image_size", str(TRAIN_IMAGE_SIZE), "--dataset_name", "synthetic",
        "--synthetic_num_train", "16", "--synthetic_num_validation", "4", "--synthetic_num_test", "0",
        "--synthetic_image_size", str(TRAIN_IMAGE_SIZE), "--cache_dir", cache_dir, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
        "--backbone_learning_rate_scale", "1", "--text_encoder_learning_rate_scale", "1", "--logging_steps", "1",
        "--disable_tqdm", "true", "--dataloader_pin_memory", "false", *extra,
    ]


def read_results(output) -> list[dict]:
    """The records of `crobim-u predict`'s results file in the folder `output`."""
    return [json.loads(line) for line in (pathlib.Path(output) / RESULTS_FILE).read_text().splitlines()]


def count_segmented_inputs(monkeypatch) -> list[str]:
    """
    Patches `predict`'s per-input segmentation so that each call records its input path; returns that list (resumed
    runs: what was segmented again).
    """
    from crobim_u.inference import predict as predict_module

    segmented: list[str] = []
    predict_scene = predict_module.predict_scene

    def counting_predict_scene(*args, **kwargs):
        segmented.append(args[2])
        return predict_scene(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_scene", counting_predict_scene)
    return segmented


def run_without_crobim_u(script: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    """Runs `script` in a new Python process where `crobim_u` cannot be imported."""
    # The same number of intra-op threads as this process, so float reductions run in the same order.
    environment = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
