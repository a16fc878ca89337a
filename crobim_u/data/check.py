"""
Reading every row of a data set before training, so that an unreadable image or mask is found in seconds, all at
once, instead of stopping a run at the step that meets it (and again at every resume).

`crobim-u check-data` runs it from the command line; `python -m crobim_u.training.run` runs it on every split it uses
before the first step (`--check_data`, on by default) and stops with the list of invalid rows, or drops and counts
them with `--skip_invalid_rows true`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset
from tqdm.auto import tqdm


# Invalid rows named in one error message; the rest are counted.
MAX_LISTED_ROWS = 20


@dataclass
class InvalidRow:
    """
    A row that cannot be read or prepared.

    Attributes:
        split (`str`): Its split.
        index (`int`): Its index in the split.
        image (`str` or `None`): Its image file (`None` for images stored as bytes).
        error (`str`): The exception, with its type.
    """

    split: str
    index: int
    image: str | None
    error: str

    def __str__(self) -> str:
        return f"{self.split} row {self.index} ({self.image or 'image in memory'}): {self.error}"


class InvalidRowsError(ValueError):
    """Rows of a data set that cannot be read or prepared; the message lists them (the first `MAX_LISTED_ROWS`)."""

    def __init__(self, rows: Sequence[InvalidRow], source: str):
        self.rows = list(rows)
        listed = "\n  ".join(str(row) for row in self.rows[:MAX_LISTED_ROWS])
        more = len(self.rows) - MAX_LISTED_ROWS
        super().__init__(
            f"{source}: {len(self.rows)} invalid row(s) found before training:\n  {listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix or remove them, or pass --skip_invalid_rows true to train without them (they are counted in the "
            "log and the model card)."
        )


def check_record(record: dict[str, Any]) -> None:
    """Raises a `ValueError` unless a decoded canonical record has an image, and a non-blank expression."""
    if record.get("image") is None:
        raise ValueError("the row has no image")
    expression = record.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expected a non-empty expression, got {expression!r}")


def find_invalid_rows(
    dataset: Dataset,
    split: str,
    prepare: Callable[[dict[str, Any]], Any] = check_record,
    progress: bool = False,
) -> list[InvalidRow]:
    """
    Reads (decodes) every row of `dataset` and calls `prepare` on it; returns the rows where either raised.

    Args:
        dataset (`datasets.Dataset`): A split as the loaders return it (rows decoded on access).
        split (`str`): Its name, for the report.
        prepare (`Callable`, *optional*, defaults to [`check_record`]): What training does with a row, e.g. the
            collator on a batch of that one row; its exception marks the row invalid.
        progress (`bool`, *optional*, defaults to `False`): Show a progress bar.

    Returns:
        `list[InvalidRow]`: In row order; empty when every row is valid.
    """
    images = dataset.with_format("arrow")["image"]
    paths = pc.struct_field(images, "path").to_pylist()
    invalid = []
    for index in tqdm(range(len(dataset)), desc=f"checking {split}", unit="row", disable=not progress):
        try:
            prepare(dataset[index])
        except Exception as error:  # every failure is reported with its row, none stops the check
            invalid.append(InvalidRow(split, index, paths[index], f"{type(error).__name__}: {error}"))
    return invalid


def check_data_command(args: argparse.Namespace) -> int:
    """Runs `crobim-u check-data` (its parser is built in `crobim_u.cli`): lists the rows training could not read."""
    from ..processing_crobim_u import CrobimUProcessor
    from ..training.collator import CrobimUDataCollator
    from . import load_referring_dataset

    dataset = load_referring_dataset(args.dataset, args.data_dir)
    splits = args.split or list(dataset)
    unknown = [split for split in splits if split not in dataset]
    if unknown:
        raise SystemExit(f"error: no split {', '.join(unknown)} in the data set; it has {sorted(dataset)}.")
    prepare = check_record
    if args.model is not None:
        try:
            collator = CrobimUDataCollator(CrobimUProcessor.from_pretrained(args.model))
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: no processor could be loaded from {args.model}: {error}") from None

        def prepare(record: dict[str, Any]) -> None:
            check_record(record)
            collator([record])

    invalid = []
    for split in splits:
        rows = find_invalid_rows(dataset[split], split, prepare, args.progress)
        print(f"{split}: {len(dataset[split])} rows, {len(rows)} invalid")
        invalid += rows
    for row in invalid:
        print(f"INVALID {row}")
    return 1 if invalid else 0


__all__ = ["InvalidRow", "InvalidRowsError", "check_data_command", "check_record", "find_invalid_rows"]
