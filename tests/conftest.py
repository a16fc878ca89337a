import os

# Tests never reach the Hub: tiny random configs, in-memory tokenizers and generated data only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import numpy as np
import pytest
import torch

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation

TINY_VOCAB_SIZE = 99

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine (or beside the multi-process tests)
# spinning threads make each forward pass many times slower.
torch.set_num_threads(1)

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


def tiny_config(**overrides) -> CrobimUConfig:
    """The `tiny` preset with a small vocabulary, for fast tests."""
    text_config = {"vocab_size": TINY_VOCAB_SIZE, **overrides.pop("text_config", {})}
    return CrobimUConfig.from_preset("tiny", text_config=text_config, **overrides)


def tiny_model(seed: int = 0, **overrides) -> CrobimUForReferringSegmentation:
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


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def inputs():
    return tiny_inputs()
