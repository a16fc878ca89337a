"""Processor of CroBIM-U: pairs images with referring expressions for [`CrobimUForReferringSegmentation`]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class CrobimUProcessor(ProcessorMixin):
    r"""
    Wraps a [`CrobimUImageProcessor`] and a BERT-style tokenizer into one processor.

    Images and expressions are paired in one of three ways:
    - one expression per image: `processor(images=[a, b], text=["x", "y"])`;
    - one image, several expressions: `processor(images=a, text=["x", "y", "z"])`;
    - several expressions per image: `processor(images=[a, b], text=[["x", "y"], ["z"]])`.
    In the last two, the image is processed once and `image_indices` (one image index per expression) tells the
    model which image each expression refers to, so the image encoder also runs once per image.

    Args:
        image_processor ([`CrobimUImageProcessor`]):
            Resizes and normalizes images, binarizes masks into `labels`, and post-processes model outputs.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The text encoder's tokenizer.
        max_length (`int`, *optional*, defaults to 20):
            Maximum number of tokens per expression, special tokens included; longer expressions are truncated
            (20 for RefSegRS and RRSIS-D, 40-50 for RISBench in the published recipes).
    """

    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 20, **kwargs):
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 (two special tokens and a word), got {max_length}.")
        self.max_length = max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        segmentation_maps: Any = None,
        max_length: int | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Prepares images, expressions and (optionally) ground-truth masks for the model.

        Args:
            images: One image or a list of images (PIL, NumPy, torch or file paths; see [`CrobimUImageProcessor`]).
            text: One expression, a list with one expression per image (or several for a single image), or a list
                of expression lists, one list per image.
            segmentation_maps: Ground-truth masks, one per expression, each of its image's size.
            max_length (`int`, *optional*): Overrides the processor's `max_length` for this call.
            return_tensors (`str`, *optional*, defaults to `"pt"`): Only `"pt"` is supported.
            kwargs: Passed to the image processor.

        Returns:
            [`BatchFeature`] with `pixel_values` (one per image), `input_ids`, `attention_mask` (and
            `token_type_ids` where the tokenizer makes them) per expression, `labels` when `segmentation_maps` are
            given, `image_indices` when images are shared by several expressions, and `original_sizes`: the
            `(height, width)` of each expression's image, for post-processing.
        """
        if return_tensors != "pt":
            raise ValueError(f"CrobimUProcessor returns PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}.")
        if images is None and text is None:
            raise ValueError("Pass images, text, or both.")
        encoding: dict[str, Any] = {}
        expressions, expression_to_group = (None, None) if text is None else _flatten_expressions(text)
        if expressions is not None:
            encoding.update(self._tokenize(expressions, max_length or self.max_length))
        if images is None:
            if segmentation_maps is not None:
                raise ValueError("segmentation_maps need their images: pass images too.")
            return BatchFeature(encoding, tensor_type=None)

        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        image_indices = None
        if expressions is not None:
            image_indices = _pair_images_with_expressions(len(image_list), expressions, expression_to_group)
        masks = None
        if segmentation_maps is not None:
            masks = list(segmentation_maps) if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
            expected = len(image_list) if image_indices is None else len(image_indices)
            if len(masks) != expected:
                raise ValueError(
                    f"Got {len(masks)} segmentation maps for {expected} expressions: pass one mask per expression."
                )
        # One expression per image: images and masks in one pass. Shared images: each image once, and its masks
        # checked against it (sizes) in a second pass.
        image_features = self.image_processor(
            images=image_list, segmentation_maps=masks if image_indices is None else None, return_tensors="pt", **kwargs
        )
        encoding["pixel_values"] = image_features["pixel_values"]
        original_sizes = [tuple(size) for size in image_features["original_sizes"]]
        if masks is not None:
            if image_indices is None:
                encoding["labels"] = image_features["labels"]
            else:
                encoding["labels"] = self.image_processor(
                    images=[image_list[i] for i in image_indices.tolist()], segmentation_maps=masks,
                    return_tensors="pt", **kwargs,
                )["labels"]

        if image_indices is not None:
            encoding["image_indices"] = image_indices
            original_sizes = [original_sizes[i] for i in image_indices.tolist()]
        encoding["original_sizes"] = original_sizes
        return BatchFeature(encoding, tensor_type=None)

    def _tokenize(self, expressions: list[str], max_length: int) -> dict[str, torch.Tensor]:
        for index, expression in enumerate(expressions):
            if not isinstance(expression, str):
                raise TypeError(f"Expression {index} must be a string, got {type(expression).__name__}.")
            if not expression.strip():
                raise ValueError(f"Expression {index} is empty or whitespace only; a referring expression needs words.")
        encoding = dict(
            self.tokenizer(
                expressions, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                return_special_tokens_mask=True,
            )
        )
        # Text of characters the tokenizer drops (zero-width spaces, control characters) encodes to special tokens
        # alone: the model would be asked to find an object from no words at all.
        special = encoding.pop("special_tokens_mask").bool()
        attended = encoding.get("attention_mask", torch.ones_like(special, dtype=torch.long)).bool()
        wordless = (attended & ~special).sum(dim=1).eq(0).nonzero().flatten().tolist()
        if wordless:
            index = wordless[0]
            raise ValueError(
                f"Expression {index} ({expressions[index]!r}) has no token besides the special ones: the tokenizer "
                "drops every character of it."
            )
        return encoding

    def post_process_referring_segmentation(
        self, outputs: Any, target_sizes: Any = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """
        Masks, probabilities, uncertainty and score per expression at `target_sizes`; see the image processor, whose
        default threshold (`DEFAULT_THRESHOLD`, 0.5) applies when `threshold` is `None`.
        """
        options = {} if threshold is None else {"threshold": threshold}
        return self.image_processor.post_process_referring_segmentation(outputs, target_sizes=target_sizes, **options)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "token_type_ids", "image_indices"]


def _flatten_expressions(text: Any) -> tuple[list[str], list[int] | None]:
    """Returns the flat expression list and, for a list of lists, the group (image) of each expression."""
    if isinstance(text, str):
        return [text], None
    if not isinstance(text, (list, tuple)) or not text:
        raise ValueError(f"text must be a string or a non-empty list of strings, got {type(text).__name__} {text!r}.")
    if all(isinstance(group, (list, tuple)) for group in text):
        flat, groups = [], []
        for group_index, group in enumerate(text):
            if not group:
                raise ValueError(f"Image {group_index} has an empty list of expressions.")
            flat.extend(group)
            groups.extend([group_index] * len(group))
        return flat, groups
    return list(text), None


def _pair_images_with_expressions(
    num_images: int, expressions: list[str], expression_to_group: list[int] | None
) -> torch.Tensor | None:
    """`None` for one expression per image, else the image index of every expression."""
    if expression_to_group is not None:
        if max(expression_to_group) + 1 != num_images:
            raise ValueError(
                f"Got {num_images} images and {max(expression_to_group) + 1} lists of expressions: pass one list per image."
            )
        return torch.tensor(expression_to_group, dtype=torch.long)
    if len(expressions) == num_images:
        return None
    if num_images == 1:
        return torch.zeros(len(expressions), dtype=torch.long)
    raise ValueError(
        f"Got {num_images} images and {len(expressions)} expressions: pass one expression per image, one image with "
        "several expressions, or a list of expression lists (one list per image)."
    )


__all__ = ["CrobimUProcessor"]
