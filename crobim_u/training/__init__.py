"""Fine-tuning CroBIM-U with the transformers `Trainer`: `python -m crobim_u.training.run config.json`."""

from .arguments import CrobimUTrainingArguments, DataArguments, ModelArguments, parse_arguments
from .collator import CrobimUDataCollator, ImageGroupedDataset
from .model_card import ModelCardInfo, render_model_card
from .preprocessed import PreprocessedSceneDataset, collate_preprocessed_scenes, preprocess_scenes
from .trainer import CrobimUTrainer, load_weights_like_from_pretrained, parameter_groups


__all__ = [
    "CrobimUDataCollator",
    "CrobimUTrainer",
    "CrobimUTrainingArguments",
    "DataArguments",
    "ImageGroupedDataset",
    "ModelArguments",
    "ModelCardInfo",
    "PreprocessedSceneDataset",
    "collate_preprocessed_scenes",
    "load_weights_like_from_pretrained",
    "parameter_groups",
    "parse_arguments",
    "preprocess_scenes",
    "render_model_card",
]
