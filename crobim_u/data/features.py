"""The canonical referring-segmentation record and the on-access decoding that all file loaders share.

Every loader returns a `datasets.DatasetDict` whose rows read as the canonical record ([`CANONICAL_FEATURES`]):
`image` (PIL image), `mask` (PIL image, mode "L", values 0/1), `expression`, `image_id`, `split` and `category`
(`""` when the data set has no categories). One row per image-expression pair.

Loaders do not decode anything up front. The Arrow table ([`STORAGE_FEATURES`]) holds file paths in the `image`
and `mask` columns and two more columns that say how to make the 0/1 mask:

- `mask_threshold`: for masks stored as image files, foreground is `value > mask_threshold`. Null means "auto": a
  mask whose values are all 0 or 1 is taken as is, any other mask has foreground `value > 127`.
- `mask_segmentation`: for masks stored as COCO segmentations (RRSIS-D), a JSON object with `segmentation`,
  `height`, `width` and `source`; the `mask` column is then null.

The loaders set [`decode_referring_batch`] as the datasets' transform, so `dataset[i]` decodes the image file and
builds the 0/1 mask of that row only. Another transform or format (`set_transform`, `with_format("torch")`)
replaces it; compose the two instead:

```python
dataset.set_transform(lambda batch: preprocess(decode_referring_batch(batch)))
```

Reading a text column of a transformed dataset (`dataset["expression"]`) decodes every row; read
`dataset.with_format(None)["expression"]` instead. `save_to_disk`/`push_to_hub` store the storage columns: use
[`~crobim_u.data.export_folder`] to write the canonical records.
"""

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
from datasets import Dataset, DatasetDict, Features, Image, Value
from pycocotools import mask as coco_mask

from .errors import DatasetFormatError, InvalidItems, MissingDataFileError


CANONICAL_FEATURES = Features(
    {
        "image": Image(),
        "mask": Image(),
        "expression": Value("string"),
        "image_id": Value("string"),
        "split": Value("string"),
        "category": Value("string"),
    }
)
STORAGE_ONLY_COLUMNS = ("mask_threshold", "mask_segmentation")
STORAGE_FEATURES = Features(
    {**CANONICAL_FEATURES, "mask_threshold": Value("int32"), "mask_segmentation": Value("string")}
)
# Masks kept in their own mode; any other mode (RGB, "1", ...) is reduced to grayscale first. Palette ("P") masks
# keep their indices, which is what a palette mask means.
_SINGLE_BAND_MASK_MODES = ("L", "P", "I", "I;16", "F")
_SPLIT_ALIASES = {"val": "validation"}
PHRASE_FILE_SPLITS = ("train", "val", "test")
SPLIT_ORDER = ("train", "validation", "test")


def canonical_split_name(name: str) -> str:
    """Maps the file-name spelling of a split to the `DatasetDict` key: `val` becomes `validation`."""
    return _SPLIT_ALIASES.get(name, name)


def file_image(path: str) -> dict:
    """An `Image` feature value that points to a file: it is decoded only when the row is read."""
    return {"path": os.path.abspath(path), "bytes": None}


def storage_row(
    image_path: str,
    expression: str,
    image_id: str,
    split: str,
    category: str = "",
    mask_path: str | None = None,
    mask_threshold: int | None = None,
    mask_segmentation: str | None = None,
) -> dict:
    """One stored row: a mask file (`mask_path`, `mask_threshold`) or a COCO segmentation (`mask_segmentation`)."""
    return {
        "image": file_image(image_path),
        "mask": file_image(mask_path) if mask_path is not None else None,
        "expression": expression,
        "image_id": image_id,
        "split": split,
        "category": category,
        "mask_threshold": mask_threshold,
        "mask_segmentation": mask_segmentation,
    }


def build_dataset_dict(
    rows_by_split: dict[str, list[dict]],
    requested_splits: set[str] | None = None,
    source: str = "",
    available_splits: set[str] | None = None,
) -> DatasetDict:
    """Builds the `DatasetDict` of stored rows (see [`storage_row`]) with [`decode_referring_batch`] as transform.

    Splits come in the order train, validation, test, then any others in their given order. A requested split
    without rows is an error naming `source` (the file or folder the rows came from) and the splits the source holds
    (`available_splits`, before the rows were filtered to the requested ones; by default those of `rows_by_split`).
    """
    if requested_splits is not None and not requested_splits <= rows_by_split.keys():
        found = rows_by_split.keys() if available_splits is None else available_splits
        raise ValueError(
            f"{source} has no rows for split(s) {sorted(requested_splits - rows_by_split.keys())}; "
            f"found {sorted(found)}"
        )
    order = sorted(rows_by_split, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))
    # from_dict rather than from_list: from_list drops the columns of a split whose rows were all skipped
    dataset_dict = DatasetDict(
        {
            split: Dataset.from_dict(
                {name: [row[name] for row in rows_by_split[split]] for name in STORAGE_FEATURES},
                features=STORAGE_FEATURES,
            )
            for split in order
        }
    )
    return dataset_dict.with_transform(decode_referring_batch)


def read_phrase_file(path: str, invalid_items: InvalidItems) -> Iterator[tuple[int, str, str]]:
    """Reads a phrase file of `<key> <expression>` lines, split at the first whitespace.

    Blank lines are ignored. A line without an expression is an invalid item. Lines are yielded one by one, so
    the caller's checks and these run in line order and the first error raised is the first in the file.

    Args:
        path (`str`):
            The phrase file, UTF-8.
        invalid_items (`InvalidItems`):
            Raises or records malformed lines.

    Yields:
        `tuple[int, str, str]`: `(line_number, key, expression)` for every well-formed line.
    """
    with open(path, encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) < 2:
                invalid_items.handle(
                    DatasetFormatError(path, f"line {line_number}", "'<id> <expression>'", repr(line.rstrip("\n")))
                )
                continue
            yield line_number, parts[0], parts[1].strip()


def missing_file_error(
    image_path: str, mask_path: str, referenced_by: str, is_file: Callable[[str], bool]
) -> MissingDataFileError | None:
    """The error for the first of a row's image and mask files that does not exist; `None` if both exist."""
    for path, kind in ((image_path, "image"), (mask_path, "mask")):
        if not is_file(path):
            return MissingDataFileError(path, kind, referenced_by)
    return None


def find_phrase_files(root: str, splits: Sequence[str] | None, dataset_name: str) -> dict[str, str]:
    """Maps each split (canonical name) to its `output_phrase_{train,val,test}.txt` file under `root`.

    `splits=None` takes every split whose phrase file exists; a split asked for by name must have one.
    """
    available = {
        canonical_split_name(split): os.path.join(root, f"output_phrase_{split}.txt") for split in PHRASE_FILE_SPLITS
    }
    if splits is None:
        found = {split: path for split, path in available.items() if os.path.isfile(path)}
        if not found:
            raise FileNotFoundError(
                f"No {dataset_name} phrase file in {root}: expected output_phrase_{{train,val,test}}.txt"
            )
        return found
    requested = {}
    for split in splits:
        name = canonical_split_name(split)
        if name not in available:
            raise ValueError(f"Unknown {dataset_name} split {split!r}; expected train, val (or validation), test.")
        if not os.path.isfile(available[name]):
            raise FileNotFoundError(f"{dataset_name} phrase file {available[name]} for split {split!r} does not exist")
        requested[name] = available[name]
    return requested


def load_phrase_dataset(
    root: str,
    splits: Sequence[str] | None,
    skip_invalid: bool,
    locate: Callable[[str], tuple[str, str, str]],
    mask_threshold: int | None,
    dataset_name: str,
    logger: logging.Logger,
) -> DatasetDict:
    """Loads a data set made of phrase files (`<key> <expression>` lines) and one image and mask file per key.

    Args:
        root (`str`):
            The data set folder, holding `output_phrase_{train,val,test}.txt`.
        splits (`Sequence[str]`, *optional*):
            See [`find_phrase_files`].
        skip_invalid (`bool`):
            Skip (and log) malformed lines and lines whose files are missing instead of raising.
        locate (`Callable[[str], tuple[str, str, str]]`):
            Maps a line's key to `(image_path, mask_path, image_id)`.
        mask_threshold (`int` or `None`):
            Stored with each row, see [`binarize_mask`].
        dataset_name (`str`):
            Used in messages.
        logger (`logging.Logger`):
            Receives the summary of skipped items.
    """
    invalid_items = InvalidItems(skip_invalid)
    is_file = functools.cache(os.path.isfile)  # many expressions share one image
    rows_by_split = {}
    for split, phrase_file in find_phrase_files(root, splits, dataset_name).items():
        rows = []
        for line_number, key, expression in read_phrase_file(phrase_file, invalid_items):
            image_path, mask_path, image_id = locate(key)
            missing = missing_file_error(image_path, mask_path, f"{phrase_file}, line {line_number}", is_file)
            if missing is not None:
                invalid_items.handle(missing)
                continue
            rows.append(
                storage_row(
                    image_path, expression, image_id, split, mask_path=mask_path, mask_threshold=mask_threshold
                )
            )
        rows_by_split[split] = rows
    invalid_items.log_summary(logger, root)
    return build_dataset_dict(rows_by_split)


def binarize_mask(mask: PIL.Image.Image, threshold: int | None) -> np.ndarray:
    """Returns the foreground of a mask image as a boolean array of shape (height, width).

    Args:
        mask (`PIL.Image.Image`):
            The mask as stored in its file.
        threshold (`int` or `None`):
            Foreground is `value > threshold`. `None` is "auto": a mask with values in {0, 1} is taken as is,
            otherwise foreground is `value > 127` (so {0, 255} masks and {0, 1} masks both read correctly).
    """
    if mask.mode not in _SINGLE_BAND_MASK_MODES:
        mask = mask.convert("L")
    values = np.asarray(mask)
    if threshold is None:
        threshold = 0 if values.max(initial=0) <= 1 else 127
    return values > threshold


def decode_coco_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Rasterizes a COCO segmentation into a boolean array: the union of its parts.

    Accepts an RLE (compressed string or uncompressed list `counts`), a list of RLEs (REFER's form) or a list of
    polygons. The segmentation must be valid (the RRSIS-D loader checks it): pycocotools does not check that RLE
    run lengths add up to `height * width` and returns garbage when they do not.
    """
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if isinstance(segmentation[0], dict):
        rles = [
            coco_mask.frPyObjects(rle, height, width) if isinstance(rle["counts"], list) else rle
            for rle in segmentation
        ]
    else:
        rles = coco_mask.frPyObjects(segmentation, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def _canonical_mask(
    image: PIL.Image.Image, mask: PIL.Image.Image | None, threshold: int | None, segmentation: str | None
) -> PIL.Image.Image:
    if mask is not None:
        source = getattr(mask, "filename", "") or "mask"
        foreground = binarize_mask(mask, threshold)
    elif segmentation is not None:
        coco = json.loads(segmentation)
        source = coco["source"]
        foreground = decode_coco_segmentation(coco["segmentation"], coco["height"], coco["width"])
    else:
        raise ValueError("A stored row has neither a mask file nor a mask segmentation.")
    mask_size = (foreground.shape[1], foreground.shape[0])
    if mask_size != image.size:
        image_source = getattr(image, "filename", "") or "image"
        raise DatasetFormatError(
            source, "mask size", f"the size of {image_source}, {image.size[0]}x{image.size[1]}",
            f"{mask_size[0]}x{mask_size[1]}",
        )
    return PIL.Image.fromarray(foreground.astype(np.uint8))


def decode_referring_batch(batch: dict[str, list]) -> dict[str, list]:
    """Turns a batch of stored rows into canonical records: the 0/1 `mask`, without the storage-only columns.

    Used as the `datasets` transform of every loader's output (images are decoded by the `Image` feature before
    the transform runs). A mask whose size differs from its image's raises a [`DatasetFormatError`].

    Args:
        batch (`dict[str, list]`):
            Columns of [`STORAGE_FEATURES`], images decoded.

    Returns:
        `dict[str, list]`: the columns of [`CANONICAL_FEATURES`] present in `batch`.
    """
    records = {name: values for name, values in batch.items() if name not in STORAGE_ONLY_COLUMNS}
    if "mask" in batch:
        records["mask"] = [
            _canonical_mask(image, mask, threshold, segmentation)
            for image, mask, threshold, segmentation in zip(
                batch["image"], batch["mask"], batch["mask_threshold"], batch["mask_segmentation"]
            )
        ]
    return records
