"""Command-line and JSON arguments of `python -m crobim_u.training.run`, as `HfArgumentParser` dataclasses."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class ModelArguments:
    """Which model to train: a preset built from scratch, a CroBIM-U checkpoint, or pretrained components."""

    preset: str = field(
        default="tiny",
        metadata={
            "help": "CrobimUConfig preset (tiny, swin-base, convnext-base): the whole architecture for a model from "
            "scratch, or the fusion and uncertainty settings around --backbone/--text_encoder."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CroBIM-U checkpoint (folder or Hub id) to fine-tune; overrides --preset."}
    )
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained AutoBackbone, e.g. microsoft/swin-base-patch4-window12-384-in22k; needs --text_encoder."
        },
    )
    text_encoder: str | None = field(
        default=None,
        metadata={"help": "Pretrained BERT-like encoder (e.g. google-bert/bert-base-uncased); needs --backbone."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer; defaults to the checkpoint's processor or the text encoder's tokenizer. A preset from "
            "scratch on the synthetic data gets a word-level tokenizer over the generator's vocabulary."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": 'CrobimUConfig fields as a JSON object (an object in a config file), e.g. \'{"use_udlr": false, '
            '"text_config": {"hidden_dropout_prob": 0.0}}\'; sub-config dicts update the preset\'s field by field.'
        },
    )
    use_rus: bool | None = field(default=None, metadata={"help": "Referring Uncertainty Scorer on/off."})
    use_ugf: bool | None = field(default=None, metadata={"help": "Uncertainty-Gated Fusion on/off (needs RUS)."})
    use_udlr: bool | None = field(default=None, metadata={"help": "Uncertainty-Driven Local Refinement on/off."})
    uncertainty_warmup_steps: int | None = field(
        default=None, metadata={"help": "Steps over which the uncertainty-loss weight ramps up from 0."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Square input size, a multiple of 32 (default: the checkpoint's, or 480)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens per expression with special tokens (default: the checkpoint's, or 20)."}
    )

    def __post_init__(self):
        if (self.backbone is None) != (self.text_encoder is None):
            raise ValueError("--backbone and --text_encoder go together: pass both or neither.")
        if self.model_name_or_path is not None and self.backbone is not None:
            raise ValueError("Pass either --model_name_or_path (a CroBIM-U checkpoint) or --backbone/--text_encoder.")
        if self.image_size is not None and self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}.")

    def config_changes(self) -> dict[str, Any]:
        """The config fields to change: `config_overrides` plus the switch flags that were given."""
        changes = self.config_overrides
        if isinstance(changes, str):
            changes = json.loads(changes)
        changes = dict(changes or {})
        if not isinstance(changes, dict):
            raise ValueError(f"config_overrides must be a JSON object, got {self.config_overrides!r}.")
        for name in ("use_rus", "use_ugf", "use_udlr", "uncertainty_warmup_steps"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        return changes


@dataclass
class DataArguments:
    """Which referring-segmentation data to train and evaluate on."""

    dataset_name: str = field(
        default="synthetic",
        metadata={
            "help": "refsegrs, rrsisd, risbench, folder, synthetic, parquet or imagefolder (with --data_dir), or a Hub "
            "dataset id or folder that datasets.load_dataset reads."
        },
    )
    dataset_columns: str | None = field(
        default=None,
        metadata={
            "help": "For Hub data sets: JSON object mapping canonical columns to the data set's, e.g. "
            '\'{"expression": "sentence", "mask": "segmentation"}\'.'
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "Data set folder (all but synthetic)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="validation", metadata={"help": "Split to evaluate on; empty for none."})
    test_split: str | None = field(
        default=None, metadata={"help": "Split scored once after training (e.g. test), reported in the model card."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N rows of each scored split."})
    group_by_image: bool = field(
        default=False,
        metadata={
            "help": "Train on images rather than rows: consecutive training rows with one image_id (RRSIS-D's "
            "sentences of an object, synthetic scenes with --synthetic_expressions_per_image above 1) form one item, "
            "whose image is processed and encoded once per step for all of its expressions (the model's "
            "image_indices). --per_device_train_batch_size then counts images, each with all of its expressions. "
            "Evaluation still reads one row at a time."
        },
    )
    synthetic_num_train: int = field(default=2000, metadata={"help": "Synthetic train rows."})
    synthetic_num_validation: int = field(default=200, metadata={"help": "Synthetic validation rows."})
    synthetic_num_test: int = field(default=200, metadata={"help": "Synthetic test rows."})
    synthetic_image_size: int = field(default=256, metadata={"help": "Side of the generated scenes."})
    synthetic_difficulty: str = field(default="medium", metadata={"help": "easy, medium, hard or a float in [0, 1]."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the scene generator."})
    synthetic_expressions_per_image: int = field(
        default=1, metadata={"help": "Synthetic rows per scene (consecutive rows share one image)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache for the synthetic data."})
    check_data: bool = field(
        default=True,
        metadata={"help": "Read and prepare every row of the splits used before the first step; invalid rows stop "
                  "the run with their list (or are dropped with --skip_invalid_rows)."},
    )
    skip_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Drop the rows the data check finds invalid instead of stopping; their number goes to the "
                  "log and the model card."},
    )

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `load_referring_dataset` for this data set."""
        if self.dataset_columns is not None:
            columns = self.dataset_columns
            columns = json.loads(columns) if isinstance(columns, str) else columns
            if not isinstance(columns, dict):
                raise ValueError(f"dataset_columns must be a JSON object, got {self.dataset_columns!r}.")
            return {"columns": columns}
        if self.dataset_name != "synthetic":
            return {}
        difficulty: str | float = self.synthetic_difficulty
        try:
            difficulty = float(difficulty)
        except ValueError:
            pass
        return {
            "num_train": self.synthetic_num_train,
            "num_validation": self.synthetic_num_validation,
            "num_test": self.synthetic_num_test,
            "image_size": self.synthetic_image_size,
            "difficulty": difficulty,
            "seed": self.synthetic_seed,
            "expressions_per_image": self.synthetic_expressions_per_image,
            "cache_dir": self.cache_dir,
        }


@dataclass
class CrobimUTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` with the defaults CroBIM-U training needs and the field's recipe: AdamW, weight decay 0.01,
    polynomial decay with power 0.9, metrics streamed per batch, and lower learning rates for the pretrained
    encoders.
    """

    learning_rate: float = field(default=3e-5, metadata={"help": "Peak learning rate of the fusion and decoder."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on norms, biases, tables)."})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"power": 0.9}, metadata={"help": "Schedule options (JSON)."}
    )
    backbone_learning_rate_scale: float = field(
        default=0.1, metadata={"help": "Learning rate of the image backbone, relative to --learning_rate."}
    )
    text_encoder_learning_rate_scale: float = field(
        default=0.1, metadata={"help": "Learning rate of the text encoder, relative to --learning_rate."}
    )
    # The collator reads image, mask and expression, which the model does not take.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator reads raw columns."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label inputs."})
    # Metrics from per-batch counts: evaluation never holds every mask.
    batch_eval_metrics: bool = field(default=True, metadata={"help": "Stream evaluation metrics per batch."})
    # Parameters no forward pass reaches are frozen when the model is built (see `freeze_unused_parameters`), so DDP
    # needs no search for unused parameters.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP find_unused_parameters (not needed: unused parameters are frozen)."}
    )
    model_card_template: str | None = field(
        default=None,
        metadata={"help": "Model card template (Markdown with front matter); defaults to the packaged model_card.md."},
    )

    def __post_init__(self):
        # Launched in several processes (torchrun, accelerate launch) on a machine without an accelerator: accelerate
        # sets up gloo DDP only with `cpu=True`; otherwise every process trains alone on the whole data set.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            self.use_cpu = True
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CrobimUTrainingArguments)


class UnderscoreHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """
    Shows each flag in its underscore spelling only (`--output_dir`), the one the rest of the `crobim-u` command
    line uses. `HfArgumentParser` also accepts a dash twin (`--output-dir`) of every such flag; it keeps working, but
    listing both would show two styles.
    """

    def _format_action_invocation(self, action: argparse.Action) -> str:
        spellings = set(action.option_strings)
        shown = [
            option for option in action.option_strings
            if not (option.startswith("--") and "-" in option[2:] and "--" + option[2:].replace("-", "_") in spellings)
        ]
        if len(shown) != len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def build_argument_parser(prog: str | None = None) -> HfArgumentParser:
    """The parser of `crobim-u train` / `python -m crobim_u.training.run`: the three argument classes' fields."""
    return HfArgumentParser(ARGUMENT_CLASSES, prog=prog, formatter_class=UnderscoreHelpFormatter)


def parse_arguments(
    argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[ModelArguments, DataArguments, CrobimUTrainingArguments]:
    """
    Parses flags, or a JSON file of arguments (the first argument, ending in `.json`) with flags that override it:
    `run.py configs/synthetic-tiny.json --max_steps 10`.

    Raises:
        `ValueError`: the JSON file holds keys that no argument class knows.
    """
    parser = build_argument_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        with open(os.path.abspath(argv[0]), encoding="utf-8") as file:
            defaults = json.load(file)
        known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"{argv[0]}: unknown argument(s) {unknown}.")
        parser.set_defaults(**defaults)
        argv = argv[1:]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return model_args, data_args, training_args
