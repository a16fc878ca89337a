"""RISBench loader (Dong et al., "Cross-Modal Bidirectional Interaction Model for Referring Remote Sensing Image
Segmentation", 2024)."""

import logging
import os
from collections.abc import Sequence

from datasets import DatasetDict

from .features import load_phrase_dataset


logger = logging.getLogger(__name__)

RISBENCH_IMAGE_DIRS = ("img_rgb", "images")
RISBENCH_MASK_DIRS = ("mask", "masks")


def load_risbench(root: str, splits: Sequence[str] | None = None, skip_invalid: bool = False) -> DatasetDict:
    """Loads RISBench as canonical referring-segmentation records (see `crobim_u.data.features`).

    Layout under `root`: images in `img_rgb/` (or `images/`), PNG masks of the same file name in `mask/` (or
    `masks/`), and `output_phrase_{train,val,test}.txt` with one `<file_name.png> <expression>` per line, split at
    the first whitespace. The `val` split is returned as `validation`. `image_id` is the file name without its
    extension; `category` is `""`. Masks are read with the "auto" rule: a mask with values in {0, 1} is taken as
    is, any other has foreground `value > 127`, so both {0, 1} and {0, 255} masks read correctly. Only file paths
    are stored: the image and mask of a row are decoded when the row is read.

    Args:
        root (`str`):
            The RISBench folder.
        splits (`Sequence[str]`, *optional*):
            Splits to load (`"train"`, `"val"` or `"validation"`, `"test"`). Defaults to every split whose phrase
            file exists.
        skip_invalid (`bool`, *optional*, defaults to `False`):
            Skip malformed lines and lines whose image or mask file is missing, and log their count, instead of
            raising [`~crobim_u.data.DatasetFormatError`] or [`~crobim_u.data.MissingDataFileError`].

    Returns:
        `datasets.DatasetDict`: one dataset per split, one row per phrase line.
    """
    image_dir = _first_existing_dir(root, RISBENCH_IMAGE_DIRS)
    mask_dir = _first_existing_dir(root, RISBENCH_MASK_DIRS)

    def locate(file_name: str) -> tuple[str, str, str]:
        return os.path.join(image_dir, file_name), os.path.join(mask_dir, file_name), os.path.splitext(file_name)[0]

    return load_phrase_dataset(root, splits, skip_invalid, locate, None, "RISBench", logger)


def _first_existing_dir(root: str, names: Sequence[str]) -> str:
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"RISBench folder {root} has none of the directories {', '.join(names)}")
