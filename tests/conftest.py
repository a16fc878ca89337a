"""
Session settings and the fixtures several test modules share. Plain builders (tiny models, processors, data-set
writers, tolerances) are in `helpers.py`.
"""

import os

# Tests never reach the Hub: tiny random configs, in-memory tokenizers and generated data only. Set before anything
# imports huggingface_hub or datasets, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_inputs, tiny_model  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine (or beside the multi-process tests)
# spinning threads make each forward pass many times slower.
torch.set_num_threads(1)


@pytest.fixture
def model():
    """A seeded tiny random model (`helpers.tiny_model`)."""
    return tiny_model()


@pytest.fixture
def inputs():
    """A batch of two for `model` (`helpers.tiny_inputs`)."""
    return tiny_inputs()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """A data set cache folder, one per test module (the synthetic data of `helpers.run_flags` is written there)."""
    return str(tmp_path_factory.mktemp("synthetic-cache"))
