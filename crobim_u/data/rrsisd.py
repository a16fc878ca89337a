"""RRSIS-D loader (Liu et al., "Rotated Multi-Scale Interaction Network for Referring Remote Sensing Image
Segmentation", 2024), in the REFER layout of its release."""

import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from datasets import DatasetDict

from .errors import DatasetFormatError, InvalidItems, MissingDataFileError
from .features import build_dataset_dict, canonical_split_name, storage_row
from .safe_pickle import load_pickle_safely


logger = logging.getLogger(__name__)

_IMAGE_FIELDS = {"id": int, "file_name": str, "height": int, "width": int}
_ANNOTATION_FIELDS = {"id": int, "image_id": int, "category_id": int, "segmentation": (list, dict)}
_CATEGORY_FIELDS = {"id": int, "name": str}
_REF_FIELDS = {"ref_id": int, "ann_id": int, "image_id": int, "category_id": int, "split": str, "sentences": list}


def load_rrsisd(
    root: str, splits: Sequence[str] | None = None, skip_invalid: bool = False, split_by: str = "unc"
) -> DatasetDict:
    """Loads RRSIS-D as canonical referring-segmentation records (see `crobim_u.data.features`).

    Layout under `root`: `rrsisd/refs(unc).p`, a pickled list of refs (`ref_id`, `ann_id`, `image_id`, `split`,
    `category_id`, `sentences`: `[{raw, sent, tokens, sent_id}]`, ...); `rrsisd/instances.json`, COCO-style
    `images`, `annotations` and `categories`; and the images in `images/rrsisd/JPEGImages/`. The pickle is read
    with an unpickler that refuses every global (see `crobim_u.data.safe_pickle`).

    One row per sentence. `expression` is the sentence's `sent` (REFER's normalised form: lower case, tokens joined
    by spaces), not `raw`. `image_id` is the COCO image id as a string, `category` the category name, and the split
    `val` is returned as `validation`. The image file name comes from `instances.json` (a ref's own `file_name`
    is REFER's per-annotation name, not a file).

    Lazy decoding: rows store the image path and the annotation's segmentation (an RLE, compressed or not, a list
    of RLEs or a list of polygons) as a JSON string; the mask, the union of the segmentation's parts, is rasterized
    with pycocotools only when a row is read. (REFER's own `getMask` sums the parts, so pixels covered twice read
    as 2 there; a union has no such pixels.) Every segmentation used is checked at load time (RLE size equal to the
    image's, run lengths adding up to height x width, polygons of at least three points), because pycocotools
    returns garbage for a malformed RLE instead of failing.

    Args:
        root (`str`):
            The folder that holds `rrsisd/` and `images/rrsisd/JPEGImages/`.
        splits (`Sequence[str]`, *optional*):
            Splits to load (`"train"`, `"val"` or `"validation"`, `"test"`). Defaults to all splits in the refs.
        skip_invalid (`bool`, *optional*, defaults to `False`):
            Skip malformed entries, refs with unknown or duplicated ids and refs whose image file is missing, and
            log their count, instead of raising [`~crobim_u.data.DatasetFormatError`] or
            [`~crobim_u.data.MissingDataFileError`].
        split_by (`str`, *optional*, defaults to `"unc"`):
            Selects the refs file `refs({split_by}).p`.

    Returns:
        `datasets.DatasetDict`: one dataset per split, one row per sentence.
    """
    refs_path, instances_path, image_dir = _rrsisd_paths(root, split_by)
    requested_splits = None if splits is None else {canonical_split_name(split) for split in splits}
    refs = _read_refs(refs_path)
    invalid_items = InvalidItems(skip_invalid)
    instances = _Instances(instances_path, image_dir, invalid_items)
    rows_by_split = _rows_by_split(refs, refs_path, requested_splits, instances, invalid_items)
    invalid_items.log_summary(logger, root)
    splits_found = {
        canonical_split_name(ref["split"]) for ref in refs if isinstance(ref, dict) and isinstance(ref.get("split"), str)
    }
    return build_dataset_dict(rows_by_split, requested_splits, refs_path, splits_found)


def _rrsisd_paths(root: str, split_by: str) -> tuple[str, str, str]:
    """The refs pickle, `instances.json` and the image folder under `root`; the two files must exist."""
    refs_path = os.path.join(root, "rrsisd", f"refs({split_by}).p")
    instances_path = os.path.join(root, "rrsisd", "instances.json")
    image_dir = os.path.join(root, "images", "rrsisd", "JPEGImages")
    for path in (refs_path, instances_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"RRSIS-D file {path} does not exist")
    return refs_path, instances_path, image_dir


def _read_refs(refs_path: str) -> list:
    """The refs pickle's list, read with an unpickler that refuses every global; its entries are checked later."""
    refs = load_pickle_safely(refs_path)
    if not isinstance(refs, list):
        raise DatasetFormatError(refs_path, "top level", "a list of refs", type(refs).__name__)
    return refs


def _rows_by_split(
    refs: list,
    refs_path: str,
    requested_splits: set[str] | None,
    instances: "_Instances",
    invalid_items: InvalidItems,
) -> dict[str, list[dict]]:
    """
    One storage row per sentence of each ref in `requested_splits` (every split for `None`), by split. A malformed
    ref, a repeated ref id, a ref whose annotation, image, category or image file is wrong, and a malformed sentence
    go to `invalid_items` (raised, or skipped with `skip_invalid`).
    """
    rows_by_split: dict[str, list[dict]] = {}
    seen_ref_ids: dict[int, int] = {}
    for index, ref in enumerate(refs):
        where = f"refs[{index}]"
        problem = _field_problem(ref, _REF_FIELDS)
        if problem is not None:
            field, expected, got = problem
            invalid_items.handle(DatasetFormatError(refs_path, f"{where}{field}", expected, got))
            continue
        split = canonical_split_name(ref["split"])
        if requested_splits is not None and split not in requested_splits:
            continue
        if ref["ref_id"] in seen_ref_ids:
            invalid_items.handle(
                DatasetFormatError(
                    refs_path, f"{where}.ref_id", "unique ref ids",
                    f"{ref['ref_id']} again (first at refs[{seen_ref_ids[ref['ref_id']]}])",
                )
            )
            continue
        seen_ref_ids[ref["ref_id"]] = index
        try:
            target = instances.target_of(ref, refs_path, where)
        except (DatasetFormatError, MissingDataFileError) as error:
            invalid_items.handle(error)
            continue
        rows = rows_by_split.setdefault(split, [])
        rows.extend(_sentence_rows(ref, split, target, refs_path, where, invalid_items))
    return rows_by_split


def _sentence_rows(
    ref: dict, split: str, target: "_RefTarget", refs_path: str, where: str, invalid_items: InvalidItems
) -> list[dict]:
    """The storage rows of a ref's sentences (its `sent`, stripped); an empty or missing one is an invalid item."""
    rows = []
    for sentence_index, sentence in enumerate(ref["sentences"]):
        expression = sentence.get("sent") if isinstance(sentence, dict) else None
        if not isinstance(expression, str) or not expression.strip():
            invalid_items.handle(
                DatasetFormatError(
                    refs_path, f"{where}.sentences[{sentence_index}].sent", "a non-empty string",
                    _short_repr(expression),
                )
            )
            continue
        rows.append(
            storage_row(
                target.image_path, expression.strip(), target.image_id, split, category=target.category,
                mask_segmentation=target.segmentation,
            )
        )
    return rows


class _RefTarget(NamedTuple):
    """What a ref points at, checked: its image file, COCO image id, category name and stored segmentation."""

    image_path: str
    image_id: str
    category: str
    segmentation: str


class _Instances:
    """
    `instances.json` indexed by id (`images`, `annotations`, `categories`), and the checks of what a ref points at.

    Malformed and duplicated entries go to `invalid_items` while indexing. Image files are looked up once per file
    and segmentations checked once per annotation: many refs share them.
    """

    def __init__(self, instances_path: str, image_dir: str, invalid_items: InvalidItems):
        self.path = instances_path
        self.image_dir = image_dir
        instances = _read_json(instances_path)
        self.images = _CocoIndex(instances, "images", _IMAGE_FIELDS, instances_path, invalid_items)
        self.annotations = _CocoIndex(instances, "annotations", _ANNOTATION_FIELDS, instances_path, invalid_items)
        self.categories = _CocoIndex(instances, "categories", _CATEGORY_FIELDS, instances_path, invalid_items)
        self.is_file = functools.cache(os.path.isfile)
        self.checked_segmentations: dict[int, str] = {}  # ann_id -> stored JSON

    def target_of(self, ref: dict, refs_path: str, where: str) -> _RefTarget:
        """
        The annotation, image and category of `ref` (at `where` in `refs_path`); raises a `DatasetFormatError` for
        an unknown id, an annotation of another image or a malformed segmentation, a `MissingDataFileError` for a
        missing image file.
        """
        annotation_index, annotation = self.annotations.lookup(ref["ann_id"], refs_path, f"{where}.ann_id")
        image_index, image = self.images.lookup(ref["image_id"], refs_path, f"{where}.image_id")
        _, category = self.categories.lookup(ref["category_id"], refs_path, f"{where}.category_id")
        if annotation["image_id"] != ref["image_id"]:
            raise DatasetFormatError(
                refs_path, f"{where}.image_id",
                f"image {annotation['image_id']} (the image of annotation {ref['ann_id']})", str(ref["image_id"]),
            )
        image_path = os.path.join(self.image_dir, image["file_name"])
        if not self.is_file(image_path):
            raise MissingDataFileError(image_path, "image", f"{self.path}, images[{image_index}].file_name")
        if ref["ann_id"] not in self.checked_segmentations:
            self.checked_segmentations[ref["ann_id"]] = _stored_segmentation(
                annotation, image, self.path, f"annotations[{annotation_index}].segmentation"
            )
        return _RefTarget(image_path, str(image["id"]), category["name"], self.checked_segmentations[ref["ann_id"]])

class _CocoIndex:
    """The entries of one `instances.json` list (`images`, `annotations`, `categories`) by id.

    Malformed entries and all entries of a duplicated id are invalid items; a lookup of a duplicated id fails with
    its own message rather than "unknown id".
    """

    def __init__(
        self, instances: dict, key: str, fields: dict[str, type | tuple], path: str, invalid_items: InvalidItems
    ):
        self.key = key
        self.path = path
        entries = instances.get(key)
        if not isinstance(entries, list):
            raise DatasetFormatError(path, key, f"a list of {key}", _short_repr(entries))
        self.by_id: dict[int, tuple[int, dict]] = {}
        self.duplicated: set[int] = set()
        for index, entry in enumerate(entries):
            problem = _field_problem(entry, fields)
            if problem is not None:
                field, expected, got = problem
                invalid_items.handle(DatasetFormatError(path, f"{key}[{index}]{field}", expected, got))
                continue
            entry_id = entry["id"]
            if entry_id in self.by_id or entry_id in self.duplicated:
                first = self.by_id.pop(entry_id, None)
                first_text = f" (first at {key}[{first[0]}])" if first is not None else ""
                self.duplicated.add(entry_id)
                invalid_items.handle(
                    DatasetFormatError(
                        path, f"{key}[{index}].id", f"unique {key} ids", f"{entry_id} again{first_text}"
                    )
                )
                continue
            self.by_id[entry_id] = (index, entry)

    def lookup(self, entry_id: int, referenced_by: str, where: str) -> tuple[int, dict]:
        """Returns `(index, entry)` of an id, or raises a `DatasetFormatError` naming the referencing field."""
        if entry_id in self.by_id:
            return self.by_id[entry_id]
        state = "duplicated" if entry_id in self.duplicated else "unknown"
        raise DatasetFormatError(
            referenced_by, where, f"an id defined once in {self.path} {self.key}", f"{state} id {entry_id}"
        )


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as file:
        try:
            instances = json.load(file)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(
                path, f"line {error.lineno} column {error.colno}", "valid JSON", error.msg
            ) from error
    if not isinstance(instances, dict):
        raise DatasetFormatError(path, "top level", "an object with images, annotations, categories",
                                 type(instances).__name__)
    return instances


def _field_problem(entry: Any, fields: dict[str, type | tuple]) -> tuple[str, str, str] | None:
    """`(field, expected, got)` for the first missing or mistyped field of `entry`, `None` if it is well-formed."""
    if not isinstance(entry, dict):
        return "", "an object", _short_repr(entry)
    for name, expected_type in fields.items():
        if name not in entry:
            return f".{name}", f"a field {name!r}", "no such field"
        value = entry[name]
        # bool is a subclass of int, but True is never an id or a size
        if isinstance(value, bool) or not isinstance(value, expected_type):
            type_names = expected_type if isinstance(expected_type, tuple) else (expected_type,)
            return f".{name}", " or ".join(t.__name__ for t in type_names), _short_repr(value)
    return None


def _stored_segmentation(annotation: dict, image: dict, file: str, field: str) -> str:
    """The segmentation as stored with each row, after checking it; raises a `DatasetFormatError` naming `field`."""
    height, width = image["height"], image["width"]
    segmentation = annotation["segmentation"]
    problem = _segmentation_problem(segmentation, height, width)
    if problem is not None:
        raise DatasetFormatError(file, field, *problem)
    source = f"{file}, {field}"  # names the annotation in errors raised when the row is read
    return json.dumps({"segmentation": segmentation, "height": height, "width": width, "source": source})


def _segmentation_problem(segmentation: list | dict, height: int, width: int) -> tuple[str, str] | None:
    """`(expected, got)` when `segmentation` is not a valid COCO segmentation of a `height` x `width` image.

    Valid: an RLE, a non-empty list of RLEs (REFER's form), or a non-empty list of polygons.
    """
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    if not segmentation:
        return "at least one polygon or RLE", "[]"
    if all(isinstance(part, dict) for part in segmentation):
        for rle in segmentation:
            problem = _rle_problem(rle, height, width)
            if problem is not None:
                return problem
        return None
    for polygon in segmentation:
        # pycocotools reads a 4-number polygon as a box, and fewer than 3 points enclose nothing.
        if not (
            isinstance(polygon, list)
            and len(polygon) >= 6
            and len(polygon) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)
        ):
            return "polygons of at least 3 (x, y) points", _short_repr(polygon)
    return None


def _rle_problem(rle: dict, height: int, width: int) -> tuple[str, str] | None:
    if "counts" not in rle or "size" not in rle:
        return "a polygon list or an RLE with 'counts' and 'size'", _short_repr(rle)
    if rle["size"] != [height, width]:
        return f"an RLE of the image's size [{height}, {width}]", _short_repr(rle["size"])
    counts = _rle_counts(rle["counts"])
    if counts is None:
        return "RLE counts as a COCO compressed string or a list of integers", _short_repr(rle["counts"])
    if (counts < 0).any():
        return "non-negative RLE run lengths", _short_repr(counts.tolist())
    if counts.sum() != height * width:
        return f"RLE run lengths adding up to {height} x {width} = {height * width}", f"a sum of {counts.sum()}"
    return None


def _rle_counts(counts: Any) -> np.ndarray | None:
    """The run lengths of an RLE's `counts`, a list of integers or a COCO compressed string; `None` if malformed."""
    if isinstance(counts, str):
        return _compressed_rle_counts(counts)
    # `type(...) is int` rules out bools; the bound keeps the sum within int64
    if isinstance(counts, list) and all(type(count) is int and abs(count) < 2**35 for count in counts):
        return np.array(counts, dtype=np.int64)
    return None


def _compressed_rle_counts(text: str) -> np.ndarray | None:
    """Decodes COCO's compressed RLE string (pycocotools `rleFrString`) into run lengths; `None` if malformed.

    Each count is a little-endian run of 5-bit groups (character - 48); 0x20 in a group marks a continuation and
    0x10 in the last group the sign. From the third count on, counts are stored as the difference to the count two
    before. Vectorized: RRSIS-D has some 17,000 annotations to check at load time.
    """
    if not text.isascii():
        return None
    groups = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if groups.size == 0:
        return groups
    if groups.min() < 0 or groups.max() >= 64 or groups[-1] & 0x20:
        return None
    ends = np.flatnonzero((groups & 0x20) == 0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 35 bits count 34 billion pixels, more than any image; this also rules out overflow
        return None
    shifts = 5 * (np.arange(groups.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((groups & 0x1F) << shifts, starts)
    negative = (groups[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
