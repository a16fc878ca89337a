"""
Training data processed once, before the first step, for splits that fit in memory (the demo's synthetic scenes).

- [`preprocess_scenes`] runs the processor over a split once, so that training reads tensors instead of decoding
  JPEGs at every step, and groups the rows of one scene into one item: a step then encodes each image once.
- With a frozen text encoder ([`frozen_text_encoder`]), [`encode_distinct_expressions`] runs it once per distinct
  expression, and its hidden states replace the token ids (the model's `text_hidden_states` input).
- [`collate_preprocessed_scenes`] turns such items into a batch of expressions with `image_indices`.

Splits read from files at every step go through [`CrobimUDataCollator`] instead; with `--group_by_image` the
`crobim_u.training.run` entry point shares each image among its expressions too ([`ImageGroupedDataset`]).
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm
from transformers import default_data_collator

from ..modeling_crobim_u import CrobimUForReferringSegmentation
from ..processing_crobim_u import CrobimUProcessor
from .collator import CrobimUDataCollator


# Token columns padded to one length across chunks, so that any batch of items stacks.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "text_hidden_states")


class PreprocessedSceneDataset(torch.utils.data.Dataset):
    """
    Scenes processed once (see [`preprocess_scenes`]): item `i` holds row `i` of every column.

    Args:
        columns (`dict[str, torch.Tensor]`):
            `pixel_values` `(num_scenes, 3, H, W)`, one image per scene, and the expressions' columns
            `(num_scenes, expressions_per_scene, ...)`: `labels`, `attention_mask`, `input_ids` (and `token_type_ids`)
            or `text_hidden_states`, optionally `reference_labels`.
    """

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def frozen_text_encoder(model: CrobimUForReferringSegmentation) -> torch.nn.Module | None:
    """The model's text encoder in eval mode where it is frozen (its features can then be computed once), else None."""
    if any(parameter.requires_grad for parameter in model.text_encoder.parameters()):
        return None
    return model.text_encoder.eval()


def preprocess_scenes(
    dataset: Dataset,
    processor: CrobimUProcessor,
    chunk_size: int = 256,
    progress: bool = True,
    frozen_text_encoder: torch.nn.Module | None = None,
    expressions_per_image: int = 1,
    reference_masks: bool = False,
) -> PreprocessedSceneDataset:
    """
    Runs the processor over a split once, so that training reads tensors instead of decoding JPEGs at every step.

    Images are kept as float16 (halving the memory; the model computes in float32) and masks as uint8. With a
    `frozen_text_encoder`, its hidden states replace the token ids (the model's `text_hidden_states` input), so that
    no training step runs it again.

    Args:
        dataset (`datasets.Dataset`):
            Canonical records (`image`, `mask`, `expression`, `image_id`), `expressions_per_image` consecutive rows
            per scene.
        processor ([`CrobimUProcessor`]): Resizes, normalizes and tokenizes, as at inference.
        chunk_size (`int`, *optional*, defaults to 256): Rows processed at a time.
        progress (`bool`, *optional*, defaults to `True`): A progress bar over the chunks.
        frozen_text_encoder (`torch.nn.Module`, *optional*):
            The model's frozen text encoder ([`frozen_text_encoder`]); its hidden states are stored instead of tokens.
        expressions_per_image (`int`, *optional*, defaults to 1): Rows (expressions) per scene.
        reference_masks (`bool`, *optional*, defaults to `False`):
            Store the split's `reference_mask` column as `reference_labels` (the target of the model's first spatial
            pointer).

    Returns:
        [`PreprocessedSceneDataset`]: one item per scene, its image (`pixel_values` `(3, H, W)`) and its
        `expressions_per_image` expressions (the other columns, `(K, ...)`); [`collate_preprocessed_scenes`] pairs
        them with `image_indices`.

    Raises:
        `ValueError`: the rows do not split into scenes of `expressions_per_image` consecutive rows with one `image_id`.
    """
    per_scene = expressions_per_image
    image_ids = dataset["image_id"]
    if len(image_ids) % per_scene:
        raise ValueError(f"{len(image_ids)} rows do not split into scenes of {per_scene} expressions.")
    for row, image_id in enumerate(image_ids):
        if image_id != image_ids[row - row % per_scene]:
            raise ValueError(
                f"Row {row} has image_id {image_id!r}, expected {image_ids[row - row % per_scene]!r}: each scene's "
                f"{per_scene} rows must be consecutive."
            )
    collate = CrobimUDataCollator(processor)
    parts = []
    encoded: dict[str, torch.Tensor] = {}  # expression -> hidden states of its tokens; expressions repeat a lot
    for start in tqdm(range(0, len(dataset), chunk_size), desc="preprocess", unit="chunk", disable=not progress):
        rows = dataset.select(range(start, min(start + chunk_size, len(dataset))))
        batch = collate(list(rows.select_columns(["image", "mask", "expression"])))
        batch["pixel_values"] = batch["pixel_values"].half()
        batch["labels"] = batch["labels"].to(torch.uint8)
        if reference_masks:
            side = (processor.image_processor.size["width"], processor.image_processor.size["height"])
            batch["reference_labels"] = torch.from_numpy(np.stack([
                np.asarray(mask.resize(side, Image.NEAREST)) for mask in rows["reference_mask"]
            ]))
        if frozen_text_encoder is not None:
            text = {key: batch.pop(key) for key in ("input_ids", "token_type_ids") if key in batch}
            batch["text_hidden_states"] = encode_distinct_expressions(
                frozen_text_encoder, rows["expression"], text, batch["attention_mask"], encoded
            )
        parts.append(batch)
    # Pad every chunk's tokens to one length so that any batch stacks.
    length = max(part["attention_mask"].shape[1] for part in parts)
    columns = {}
    for name in parts[0]:
        tensors = [part[name] for part in parts]
        if name in TOKEN_COLUMNS:
            pad = processor.tokenizer.pad_token_id if name == "input_ids" else 0
            widths = (0, 0) if name == "text_hidden_states" else ()
            tensors = [torch.nn.functional.pad(t, (*widths, 0, length - t.shape[1]), value=pad) for t in tensors]
        stacked = torch.cat(tensors)  # one row per expression; a scene's image is in each of its rows
        columns[name] = stacked[::per_scene] if name == "pixel_values" else stacked.unflatten(0, (-1, per_scene))
    return PreprocessedSceneDataset(columns)


@torch.no_grad()
def encode_distinct_expressions(
    encoder: torch.nn.Module,
    expressions: list[str],
    text: dict[str, torch.Tensor],
    attention_mask: torch.Tensor,
    encoded: dict[str, torch.Tensor],
) -> torch.Tensor:
    """
    A frozen text encoder's hidden states for tokenized expressions, running it only on the distinct expressions
    that `encoded` does not hold yet.

    Args:
        encoder (`torch.nn.Module`): A BERT-like encoder returning `last_hidden_state`.
        expressions (`list[str]`): The expressions, one per row of `text`; they key `encoded`.
        text (`dict[str, torch.Tensor]`): `input_ids` (and `token_type_ids`) `(B, L)`.
        attention_mask (`torch.Tensor` of shape `(B, L)`): 1 on the expressions' tokens.
        encoded (`dict[str, torch.Tensor]`):
            Expression -> hidden states `(tokens, D)` of its tokens, from earlier calls; extended in place.

    Returns:
        `torch.Tensor` of shape `(B, L, D)`: the hidden states, zero at padded positions (the model reads them
        through the attention mask only).
    """
    first_rows = {}
    for row, expression in enumerate(expressions):
        first_rows.setdefault(expression, row)
    new_rows = [row for expression, row in first_rows.items() if expression not in encoded]
    if new_rows:
        new_text = {key: value[new_rows] for key, value in text.items()}
        hidden = encoder(**new_text, attention_mask=attention_mask[new_rows])
        for row, states in zip(new_rows, hidden.last_hidden_state):
            encoded[expressions[row]] = states[: int(attention_mask[row].sum())]
    length = attention_mask.shape[1]
    return torch.stack([
        torch.nn.functional.pad(encoded[expression], (0, 0, 0, length - len(encoded[expression])))
        for expression in expressions
    ])


def collate_preprocessed_scenes(scenes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """
    A batch of expressions from items of [`PreprocessedSceneDataset`], the `data_collator` of their `Trainer`.

    Returns:
        `dict[str, torch.Tensor]`: `pixel_values` `(num_scenes, 3, H, W)` float32 in channels-last layout, each
        expression's columns flattened to `(num_scenes * K, ...)`, and `image_indices` (`[0, 0, 1, 1, ...]`) where a
        scene has several (`K > 1`) expressions.
    """
    batch = default_data_collator(scenes)
    per_scene = batch["labels"].shape[1]
    batch = {name: value if name == "pixel_values" else value.flatten(0, 1) for name, value in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.float32, memory_format=torch.channels_last)
    if per_scene > 1:
        batch["image_indices"] = torch.arange(len(scenes)).repeat_interleave(per_scene)
    return batch


__all__ = [
    "PreprocessedSceneDataset",
    "collate_preprocessed_scenes",
    "encode_distinct_expressions",
    "frozen_text_encoder",
    "preprocess_scenes",
]
