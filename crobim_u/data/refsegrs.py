"""RefSegRS loader (Yuan et al., "RRSIS: Referring Remote Sensing Image Segmentation", 2024)."""

import logging
import os
from collections.abc import Sequence

from datasets import DatasetDict

from .features import load_phrase_dataset


logger = logging.getLogger(__name__)

# The RefSegRS masks are grayscale; values above 50 are the foreground.
REFSEGRS_MASK_THRESHOLD = 50


def load_refsegrs(root: str, splits: Sequence[str] | None = None, skip_invalid: bool = False) -> DatasetDict:
    """Loads RefSegRS as canonical referring-segmentation records (see `crobim_u.data.features`).

    Layout under `root`: `images/<id>.tif`, `masks/<id>.tif` (grayscale, foreground is `value > 50`) and
    `output_phrase_{train,val,test}.txt` with one `<id> <expression>` per line, split at the first whitespace.
    The `val` split is returned as `validation`. `image_id` is `<id>`; `category` is `""` (RefSegRS has no
    categories). Only file paths are stored: the image and mask of a row are decoded when the row is read.

    Args:
        root (`str`):
            The RefSegRS folder.
        splits (`Sequence[str]`, *optional*):
            Splits to load (`"train"`, `"val"` or `"validation"`, `"test"`). Defaults to every split whose phrase
            file exists.
        skip_invalid (`bool`, *optional*, defaults to `False`):
            Skip malformed lines and lines whose image or mask file is missing, and log their count, instead of
            raising [`~crobim_u.data.DatasetFormatError`] or [`~crobim_u.data.MissingDataFileError`].

    Returns:
        `datasets.DatasetDict`: one dataset per split, one row per phrase line.
    """

    def locate(image_id: str) -> tuple[str, str, str]:
        return (
            os.path.join(root, "images", f"{image_id}.tif"),
            os.path.join(root, "masks", f"{image_id}.tif"),
            image_id,
        )

    return load_phrase_dataset(root, splits, skip_invalid, locate, REFSEGRS_MASK_THRESHOLD, "RefSegRS", logger)
