"""Turns canonical referring-segmentation records into model inputs, one image per row or one per image group."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from ..processing_crobim_u import CrobimUProcessor


@dataclass
class CrobimUDataCollator:
    """
    Collates canonical records (`image`, `mask`, `expression`, ...) into a batch for
    [`CrobimUForReferringSegmentation`]: the processor resizes and normalizes the images, binarizes the masks into
    `labels` and tokenizes the expressions. Processing happens here, per batch, so the data sets keep their own
    decoding transform and nothing is preprocessed up front.

    A record may also be an image group of [`ImageGroupedDataset`]: one `image` with lists of `expression`s and
    `mask`s. Its image is then processed (and encoded by the model) once, and `image_indices` pairs it with each of
    its expressions.

    Args:
        processor ([`CrobimUProcessor`]): The processor saved with every checkpoint.
        max_length (`int`, *optional*): Token limit per expression; defaults to the processor's.
    """

    processor: CrobimUProcessor
    max_length: int | None = None

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """
        Returns:
            `dict[str, torch.Tensor]`: `pixel_values` `(num_images, 3, H, W)`, `input_ids`, `attention_mask` (and
            `token_type_ids`) `(B, L)` for the B expressions, `labels` `(B, H, W)` int64 in {0, 1} when the records
            have masks, and for image groups `image_indices` `(B,)`, the image of each expression.
        """
        if not records:
            raise ValueError("Cannot collate an empty batch.")
        has_masks = records[0].get("mask") is not None
        if isinstance(records[0]["expression"], (list, tuple)):  # image groups: a list of expressions per image
            text = [list(record["expression"]) for record in records]
            masks = [mask for record in records for mask in record["mask"]] if has_masks else None
        else:
            text = [record["expression"] for record in records]
            masks = [record["mask"] for record in records] if has_masks else None
        encoding = self.processor(
            images=[record["image"] for record in records], text=text, segmentation_maps=masks,
            max_length=self.max_length,
        )
        # Only the post-processing of predictions needs the original sizes; the model takes tensors only.
        return {key: value for key, value in encoding.items() if key != "original_sizes"}


def consecutive_image_groups(image_ids: Sequence[Any]) -> list[range]:
    """
    The runs of consecutive rows that share an image id.

    Example: `["a", "a", "b", "a"]` gives `[range(0, 2), range(2, 3), range(3, 4)]`; the last "a" is a run of its own.
    """
    groups, start = [], 0
    for _, run in itertools.groupby(image_ids):
        length = sum(1 for _ in run)
        groups.append(range(start, start + length))
        start += length
    return groups


class ImageGroupedDataset(torch.utils.data.Dataset):
    """
    The rows of a referring-segmentation split grouped by image, for training that encodes each image once per step.

    Consecutive rows with one `image_id` form one item: `{"image": image, "expression": [...], "mask": [...],
    "image_id": image_id}`, which [`CrobimUDataCollator`] turns into one image and its expressions, paired by
    `image_indices`. Loaders keep the expressions of an image together (RRSIS-D's sentences of a ref,
    `load_synthetic(expressions_per_image=K)`'s scenes); rows of one image further apart form items of their own.
    A batch of `n` items holds `n` images and all of their expressions.

    Args:
        dataset (`datasets.Dataset`): Canonical records with `image`, `expression`, `image_id` (and `mask`).

    Raises:
        `ValueError`: the data set has no `image_id` column.
    """

    def __init__(self, dataset: Dataset):
        if "image_id" not in dataset.column_names:
            raise ValueError(
                f"Grouping rows by image needs an image_id column; the data set has {dataset.column_names}."
            )
        self.dataset = dataset
        # Without the loaders' decoding transform: reading a column through it would decode every image.
        self.groups = consecutive_image_groups(list(dataset.with_format(None)["image_id"]))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = self.groups[index]
        rows = self.dataset[group.start : group.stop]
        item = {"image": rows["image"][0], "expression": rows["expression"], "image_id": rows["image_id"][0]}
        if "mask" in rows:
            item["mask"] = rows["mask"]
        return item


__all__ = ["CrobimUDataCollator", "ImageGroupedDataset", "consecutive_image_groups"]
