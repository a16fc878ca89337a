"""Turns canonical referring-segmentation records into model inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..processing_crobim_u import CrobimUProcessor


@dataclass
class CrobimUDataCollator:
    """
    Collates canonical records (`image`, `mask`, `expression`, ...) into a batch for
    [`CrobimUForReferringSegmentation`]: the processor resizes and normalizes the images, binarizes the masks into
    `labels` and tokenizes the expressions. Processing happens here, per batch, so the data sets keep their own
    decoding transform and nothing is preprocessed up front.

    Args:
        processor ([`CrobimUProcessor`]): The processor saved with every checkpoint.
        max_length (`int`, *optional*): Token limit per expression; defaults to the processor's.
    """

    processor: CrobimUProcessor
    max_length: int | None = None

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """
        Returns:
            `dict[str, torch.Tensor]`: `pixel_values` `(B, 3, H, W)`, `input_ids`, `attention_mask` (and
            `token_type_ids`) `(B, L)`, and `labels` `(B, H, W)` int64 in {0, 1} when the records have masks.
        """
        if not records:
            raise ValueError("Cannot collate an empty batch.")
        has_masks = records[0].get("mask") is not None
        encoding = self.processor(
            images=[record["image"] for record in records],
            text=[record["expression"] for record in records],
            segmentation_maps=[record["mask"] for record in records] if has_masks else None,
            max_length=self.max_length,
        )
        # Only the post-processing of predictions needs the original sizes; the model takes tensors only.
        return {key: value for key, value in encoding.items() if key != "original_sizes"}


__all__ = ["CrobimUDataCollator"]
