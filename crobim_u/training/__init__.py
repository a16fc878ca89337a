"""Fine-tuning CroBIM-U with the transformers `Trainer`: `python -m crobim_u.training.run config.json`."""

from .arguments import CrobimUTrainingArguments, DataArguments, ModelArguments, parse_arguments
from .collator import CrobimUDataCollator
from .model_card import ModelCardInfo, render_model_card
from .trainer import CrobimUTrainer, load_weights_like_from_pretrained, parameter_groups


__all__ = [
    "CrobimUDataCollator",
    "CrobimUTrainer",
    "CrobimUTrainingArguments",
    "DataArguments",
    "ModelArguments",
    "ModelCardInfo",
    "load_weights_like_from_pretrained",
    "parameter_groups",
    "parse_arguments",
    "render_model_card",
]
