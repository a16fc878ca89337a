"""
Trains CroBIM-U: `python -m crobim_u.training.run configs/synthetic-tiny.json [--flag value ...]`.

The same command runs under `torchrun --nproc_per_node N -m crobim_u.training.run ...` and
`accelerate launch --multi_gpu --num_processes N -m crobim_u.training.run ...` (gloo on CPU). Every argument is a
field of [`ModelArguments`], [`DataArguments`] or [`CrobimUTrainingArguments`]; a JSON file gives their values and
flags after it override them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer, BertTokenizer, set_seed

from ..configuration_crobim_u import CrobimUConfig
from ..data import load_referring_dataset
from ..data.check import InvalidRowsError, check_record, find_invalid_rows
from ..image_processing_crobim_u import CrobimUImageProcessor
from ..inference.loading import check_crobim_u_checkpoint
from ..inference.parallel import release_process_group
from ..metrics import format_metric_table
from ..modeling_crobim_u import CrobimUForReferringSegmentation
from ..processing_crobim_u import CrobimUProcessor
from .arguments import CrobimUTrainingArguments, DataArguments, ModelArguments, parse_arguments
from .collator import CrobimUDataCollator, ImageGroupedDataset
from .model_card import ModelCardInfo, hub_ids
from .trainer import CrobimUTrainer


logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_IMAGE_SIZE = 480
DEFAULT_MAX_LENGTH = 20
# Side of the dummy input with which `freeze_unused_parameters` finds the parameters a forward pass never reaches.
PROBE_SIZE = 64


def build_synthetic_tokenizer() -> BertTokenizer:
    """A word-level BERT tokenizer over the synthetic generator's vocabulary: offline, for models from scratch."""
    from ..data.synthetic import synthetic_vocabulary

    words = [*SPECIAL_TOKENS, *synthetic_vocabulary()]
    return BertTokenizer(vocab={word: index for index, word in enumerate(words)})


def build_processor(model_args: ModelArguments, data_args: DataArguments) -> CrobimUProcessor:
    """The checkpoint's processor, or a new one around the tokenizer the arguments name."""
    if model_args.model_name_or_path is not None and model_args.tokenizer_name_or_path is None:
        processor = CrobimUProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer_source = model_args.tokenizer_name_or_path or model_args.text_encoder
        if tokenizer_source is not None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        elif data_args.dataset_name == "synthetic":
            tokenizer = build_synthetic_tokenizer()
        else:
            raise ValueError(
                "A model from a preset needs --tokenizer_name_or_path for real data (google-bert/bert-base-uncased)."
            )
        processor = CrobimUProcessor(CrobimUImageProcessor(), tokenizer)
    if model_args.image_size is not None or model_args.model_name_or_path is None:
        side = model_args.image_size or DEFAULT_IMAGE_SIZE
        processor.image_processor = CrobimUImageProcessor.from_dict(
            processor.image_processor.to_dict(), size={"height": side, "width": side}
        )
    if model_args.max_length is not None or model_args.model_name_or_path is None:
        processor.max_length = model_args.max_length or DEFAULT_MAX_LENGTH
    return processor


def apply_config_changes(config: CrobimUConfig, changes: dict[str, Any]) -> CrobimUConfig:
    """Sets config fields in place; `backbone_config`/`text_config` dicts update the sub-configs field by field."""
    for key, value in changes.items():
        if key in ("backbone_config", "text_config") and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                setattr(getattr(config, key), sub_key, sub_value)
        else:
            setattr(config, key, value)
    config.validate_crobim_u()
    return config


def build_model(model_args: ModelArguments, vocab_size: int) -> CrobimUForReferringSegmentation:
    """Builds the model the arguments describe and freezes the parameters no forward pass reaches."""
    changes = model_args.config_changes()
    if model_args.model_name_or_path is not None:
        check_crobim_u_checkpoint(model_args.model_name_or_path)
        config = apply_config_changes(CrobimUConfig.from_pretrained(model_args.model_name_or_path), changes)
        model = CrobimUForReferringSegmentation.from_pretrained(
            model_args.model_name_or_path, config=config, use_safetensors=True
        )
    elif model_args.backbone is not None:
        if {"backbone_config", "text_config"} & set(changes):
            raise ValueError("Sub-config overrides do not apply to pretrained components; their configs are loaded.")
        model = CrobimUForReferringSegmentation.from_pretrained_components(
            model_args.backbone, model_args.text_encoder, config=CrobimUConfig.from_preset(model_args.preset, **changes)
        )
    else:
        changes.setdefault("text_config", {}).setdefault("vocab_size", vocab_size)
        model = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(model_args.preset, **changes))
    if model.config.text_config.vocab_size < vocab_size:
        raise ValueError(
            f"The tokenizer has {vocab_size} tokens but the text encoder only {model.config.text_config.vocab_size}."
        )
    frozen = freeze_unused_parameters(model)
    if frozen:
        logger.info(f"Frozen (no forward pass reaches them): {', '.join(frozen)}")
    return model


def freeze_unused_parameters(model: CrobimUForReferringSegmentation) -> list[str]:
    """
    Freezes (`requires_grad_(False)`) the parameters that no forward pass reaches, and returns their names.

    Some AutoBackbones keep modules only their classification model uses: Swin's final `swin.layernorm` gets no
    gradient here. DDP without `find_unused_parameters` fails on such parameters, and with it searches the graph at
    every step. Frozen, they stay in the checkpoints but out of the optimizer and of DDP's gradient reduction.

    One backward pass on a small zero input (eval mode: no dropout, no random numbers drawn) finds them, whatever
    the backbone.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    channels = getattr(model.config.backbone_config, "num_channels", 3)
    device = next(model.parameters()).device
    outputs = model(
        pixel_values=torch.zeros(1, channels, PROBE_SIZE, PROBE_SIZE, device=device),
        input_ids=torch.ones(1, 4, dtype=torch.long, device=device),
        labels=torch.zeros(1, PROBE_SIZE, PROBE_SIZE, device=device),
    )
    outputs.loss.backward()
    unused = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    model.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    model.train(was_training)
    return unused


def _describe_initialisation(model_args: ModelArguments) -> str:
    if model_args.model_name_or_path is not None:
        return f"fine-tuned from `{model_args.model_name_or_path}`"
    if model_args.backbone is not None:
        return (
            f"pretrained image encoder `{model_args.backbone}` and text encoder `{model_args.text_encoder}`; fusion, "
            f"decoder and uncertainty modules from random initialisation (`{model_args.preset}` preset settings)"
        )
    return f"`{model_args.preset}` preset, every weight from random initialisation"


def _limit(dataset, max_samples: int | None):
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def drop_invalid_rows(
    datasets: dict[str, Any], collator: CrobimUDataCollator, source: str, skip: bool
) -> dict[str, int]:
    """
    Reads and collates every row of each named split (see [`find_invalid_rows`]). Invalid rows raise an
    [`InvalidRowsError`] listing them, or with `skip` are dropped from the splits in place.

    Returns:
        `dict[str, int]`: Rows dropped per split name (splits without invalid rows left out).
    """

    def prepare(record: dict[str, Any]) -> None:
        check_record(record)
        collator([record])

    invalid = {name: find_invalid_rows(dataset, name, prepare) for name, dataset in datasets.items()}
    found = [row for rows in invalid.values() for row in rows]
    if found and not skip:
        raise InvalidRowsError(found, source)
    dropped = {}
    for name, rows in invalid.items():
        if rows:
            bad = {row.index for row in rows}
            datasets[name] = datasets[name].select([index for index in range(len(datasets[name])) if index not in bad])
            dropped[name] = len(rows)
            examples = "\n  ".join(str(row) for row in rows[:5])
            logger.warning(f"Skipped {len(rows)} invalid row(s) of {source} {name}. First:\n  {examples}")
    return dropped


def train_command(args: argparse.Namespace) -> int:
    """Runs `crobim-u train CONFIG.json [--flag value ...]`: the arguments of `python -m crobim_u.training.run`."""
    main(args.arguments, prog="crobim-u train")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, float]:
    """Parses the arguments, trains, scores the evaluation (and test) split, saves the final model.

    Invalid data rows found before training end the process with their list (exit status 1), without a traceback.

    Returns:
        `dict[str, float]`: the train, eval and test metrics.
    """
    model_args, data_args, training_args = parse_arguments(argv, prog=prog)
    try:
        return train(model_args, data_args, training_args)
    except InvalidRowsError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        release_process_group()


def train(
    model_args: ModelArguments, data_args: DataArguments, training_args: CrobimUTrainingArguments
) -> dict[str, float]:
    """Runs one training as `main` does, from parsed arguments."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)  # the same random initialisation in every process

    with training_args.main_process_first(desc="loading the data set"):
        dataset = load_referring_dataset(data_args.dataset_name, data_args.data_dir, **data_args.loader_kwargs())
    splits = {"train": data_args.train_split, "eval": data_args.eval_split or None,
              "test": data_args.test_split or None}
    for split in filter(None, splits.values()):
        if split not in dataset:
            raise ValueError(f"{data_args.dataset_name} has no split {split!r}; it has {sorted(dataset)}.")
    scored = {
        prefix: _limit(dataset[splits[prefix]], data_args.max_train_samples if prefix == "train" else
                       data_args.max_eval_samples)
        for prefix in ("train", "eval", "test") if splits[prefix]
    }

    processor = build_processor(model_args, data_args)
    collator = CrobimUDataCollator(processor)
    dropped = {}
    if data_args.check_data:
        dropped = drop_invalid_rows(scored, collator, data_args.data_dir or data_args.dataset_name,
                                    data_args.skip_invalid_rows)
    train_dataset, eval_dataset = scored.pop("train"), scored.get("eval")
    num_train_rows = len(train_dataset)
    extra = {f"invalid {prefix} rows skipped": count for prefix, count in dropped.items()}
    if data_args.group_by_image:
        train_dataset = ImageGroupedDataset(train_dataset)
        extra["batches"] = f"grouped by image: {len(train_dataset)} images carry the {num_train_rows} expressions"
        logger.info(f"Training on {num_train_rows} rows grouped into {len(train_dataset)} images (--group_by_image).")
    model = build_model(model_args, vocab_size=len(processor.tokenizer))
    info = ModelCardInfo(
        dataset=data_args.dataset_name,
        splits={key: value for key, value in splits.items() if value},
        num_train_samples=num_train_rows,
        init=_describe_initialisation(model_args),
        base_models=hub_ids(model_args.model_name_or_path, model_args.backbone, model_args.text_encoder),
        image_size=processor.image_processor.size.height,
        max_length=processor.max_length,
        extra=extra,
    )
    trainer = CrobimUTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        model_card_info=info,
    )

    resume = training_args.resume_from_checkpoint
    resume = True if isinstance(resume, str) and resume.lower() == "true" else resume
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    for prefix, split_dataset in scored.items():
        split_metrics = trainer.evaluate(split_dataset, metric_key_prefix=prefix)
        trainer.log_metrics(prefix, split_metrics)
        trainer.save_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
        if trainer.is_world_process_zero():
            table = format_metric_table(trainer.measured_metrics[prefix])
            print(f"{data_args.dataset_name} {splits[prefix]}:\n{table}")

    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
    else:
        trainer.save_model()
    return metrics


if __name__ == "__main__":
    main()
