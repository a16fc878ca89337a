"""The `imagefolder`-style layout: image and mask files plus `metadata.jsonl`, readable by this package, by
`datasets.load_dataset("imagefolder", ...)` and by the Hub once the folder is uploaded."""

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
import PIL.Image
from datasets import DatasetDict

from .errors import DatasetFormatError, InvalidItems
from .features import build_dataset_dict, canonical_split_name, missing_file_error, storage_row


logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
_REQUIRED_FIELDS = ("file_name", "mask_file_name", "expression")
_OPTIONAL_FIELDS = ("image_id", "split", "category")
_SAFE_FILE_STEM = re.compile(r"[A-Za-z0-9._-]+")


def load_folder(root: str, splits: Sequence[str] | None = None, skip_invalid: bool = False) -> DatasetDict:
    """Loads a folder of images, masks and `metadata.jsonl` as canonical referring-segmentation records.

    Each metadata line is a JSON object with `file_name` (the image), `mask_file_name` and `expression`, and
    optionally `image_id` (default: the image file name without extension), `split` and `category` (default `""`).
    File names are relative to the folder of the metadata file. Two layouts:

    - one `root/metadata.jsonl`, the split of each row given by its `split` field (default `"train"`);
    - one `root/<split>/metadata.jsonl` per split; a row's `split` field, if any, must name that folder.

    `val` is returned as `validation`. Masks are read with the "auto" rule: a mask with values in {0, 1} is taken
    as is, any other has foreground `value > 127`. Only file paths are stored: the image and mask of a row are
    decoded when the row is read. [`export_folder`] writes this layout.

    Args:
        root (`str`):
            The folder.
        splits (`Sequence[str]`, *optional*):
            Splits to load. Defaults to all.
        skip_invalid (`bool`, *optional*, defaults to `False`):
            Skip malformed lines and lines whose image or mask file is missing, and log their count, instead of
            raising [`~crobim_u.data.DatasetFormatError`] or [`~crobim_u.data.MissingDataFileError`].

    Returns:
        `datasets.DatasetDict`: one dataset per split, one row per metadata line.
    """
    metadata_files = _metadata_files(root)
    requested_splits = None if splits is None else {canonical_split_name(split) for split in splits}
    invalid_items = InvalidItems(skip_invalid)
    is_file = functools.cache(os.path.isfile)  # many expressions share one image
    rows_by_split: dict[str, list[dict]] = {}
    splits_found: set[str] = set()
    for folder_split, metadata_file in metadata_files:
        base_dir = os.path.dirname(metadata_file)
        for line_number, record in _read_metadata(metadata_file, invalid_items):
            where = f"line {line_number}"
            split = canonical_split_name(record.get("split", folder_split or "train"))
            if folder_split is not None and split != folder_split:
                invalid_items.handle(
                    DatasetFormatError(
                        metadata_file, f"{where}, field 'split'", f"{folder_split!r} (the split of its folder)",
                        repr(split),
                    )
                )
                continue
            splits_found.add(split)
            if requested_splits is not None and split not in requested_splits:
                continue
            image_path = os.path.join(base_dir, record["file_name"])
            mask_path = os.path.join(base_dir, record["mask_file_name"])
            missing = missing_file_error(image_path, mask_path, f"{metadata_file}, {where}", is_file)
            if missing is not None:
                invalid_items.handle(missing)
                continue
            image_id = record.get("image_id", os.path.splitext(os.path.basename(record["file_name"]))[0])
            rows_by_split.setdefault(split, []).append(
                storage_row(
                    image_path, record["expression"].strip(), image_id, split,
                    category=record.get("category", ""), mask_path=mask_path,
                )
            )
    invalid_items.log_summary(logger, root)
    return build_dataset_dict(rows_by_split, requested_splits, root, splits_found)


def export_folder(dataset_dict: DatasetDict, root: str) -> None:
    """Writes canonical referring-segmentation records as a folder that [`load_folder`] reads back exactly.

    Layout: `root/<split>/metadata.jsonl` and, beside it, `images/<image_id>.png` (one file per image id) and
    `masks/<image_id>_<hash>.png` (one file per distinct mask). Masks are written with values 0/1, so
    `datasets.load_dataset("imagefolder", data_dir=root)` (or the Hub, after uploading the folder) also yields
    0/1 masks. Images are written as PNG, so their pixels are kept exactly. Rows with the same `image_id` in a split
    must have identical images.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            Splits of rows with `image`, `mask` (values 0/1), `expression`, `image_id` and optionally `category`,
            e.g. the output of any loader of this package.
        root (`str`):
            The output folder; it must not exist or be empty.
    """
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"Export folder {root} is not empty")
    for split, dataset in dataset_dict.items():
        split_dir = os.path.join(root, split)
        os.makedirs(os.path.join(split_dir, "images"), exist_ok=True)
        os.makedirs(os.path.join(split_dir, "masks"), exist_ok=True)
        image_digests: dict[str, tuple[str, int]] = {}  # image_id -> (digest, first row)
        with open(os.path.join(split_dir, METADATA_FILE), "w", encoding="utf-8") as metadata:
            for index, row in enumerate(dataset):
                image_id = row["image_id"]
                stem = _file_stem(image_id)
                image_file = f"images/{stem}.png"
                digest = _image_digest(row["image"])
                if image_id not in image_digests:
                    row["image"].save(os.path.join(split_dir, image_file))
                    image_digests[image_id] = (digest, index)
                elif image_digests[image_id][0] != digest:
                    raise ValueError(
                        f"Split {split!r}: rows {image_digests[image_id][1]} and {index} have image_id {image_id!r} "
                        "but different images"
                    )
                mask_values = np.asarray(row["mask"])
                if mask_values.ndim != 2 or not np.isin(mask_values, (0, 1)).all():
                    raise ValueError(
                        f"Split {split!r}, row {index}: expected a single-band mask with values 0/1, got shape "
                        f"{mask_values.shape} and values {np.unique(mask_values)[:5].tolist()}"
                    )
                mask = PIL.Image.fromarray(mask_values.astype(np.uint8))
                mask_file = f"masks/{stem}_{_image_digest(mask)[:12]}.png"
                if not os.path.exists(os.path.join(split_dir, mask_file)):
                    mask.save(os.path.join(split_dir, mask_file))
                record = {
                    "file_name": image_file,
                    "mask_file_name": mask_file,
                    "expression": row["expression"],
                    "image_id": image_id,
                    "category": row.get("category") or "",
                }
                metadata.write(json.dumps(record, ensure_ascii=False) + "\n")


def _metadata_files(root: str) -> list[tuple[str | None, str]]:
    """`(split of the folder or None, path)` of each metadata file, for either layout."""
    root_metadata = os.path.join(root, METADATA_FILE)
    split_metadata = sorted(
        (canonical_split_name(name), os.path.join(root, name, METADATA_FILE))
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if os.path.isfile(os.path.join(root, name, METADATA_FILE))
    )
    if os.path.isfile(root_metadata):
        if split_metadata:
            raise DatasetFormatError(
                root, "layout", f"either {METADATA_FILE} or <split>/{METADATA_FILE}",
                f"both {root_metadata} and {split_metadata[0][1]}",
            )
        return [(None, root_metadata)]
    if not split_metadata:
        raise FileNotFoundError(f"No {METADATA_FILE} in {root} nor in any of its subfolders")
    return split_metadata


def _read_metadata(path: str, invalid_items: InvalidItems) -> list[tuple[int, dict]]:
    """The well-formed records of a metadata file with their line numbers; blank lines are ignored."""
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                invalid_items.handle(DatasetFormatError(path, where, "a JSON object", error.msg))
                continue
            if not isinstance(record, dict):
                invalid_items.handle(DatasetFormatError(path, where, "a JSON object", type(record).__name__))
                continue
            problem = _record_problem(record)
            if problem is not None:
                field, expected, got = problem
                invalid_items.handle(DatasetFormatError(path, f"{where}, field {field!r}", expected, got))
                continue
            records.append((line_number, record))
    return records


def _record_problem(record: dict) -> tuple[str, str, str] | None:
    """`(field, expected, got)` for the first missing or mistyped field of a metadata record."""
    for field in _REQUIRED_FIELDS:
        if not isinstance(record.get(field), str) or not record[field].strip():
            return field, "a non-empty string", repr(record.get(field))
    for field in _OPTIONAL_FIELDS:
        if field in record and not isinstance(record[field], str):
            return field, "a string", repr(record[field])
    return None


def _file_stem(image_id: str) -> str:
    """A file name for an image id: the id itself when safe, else a sanitized id plus a hash that keeps it unique."""
    if _SAFE_FILE_STEM.fullmatch(image_id):
        return image_id
    sanitized = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
    return f"{sanitized}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def _image_digest(image: PIL.Image.Image) -> str:
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
