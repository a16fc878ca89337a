"""Renders `model_card.md` into the README.md of every checkpoint and of the final model folder."""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from ..configuration_crobim_u import CrobimUConfig
from ..metrics import METRIC_ORDER, format_metric_table


# The template shipped inside the package, found the same way in a checkout and in an installed wheel. It is a copy of
# model_card.md at the repository root (the file to edit); tests/test_repository.py keeps the two identical.
DEFAULT_TEMPLATE = resources.files("crobim_u") / "templates" / "model_card.md"
# Config fields that carry "our interpretation" choices, shown with this checkpoint's values.
INTERPRETATION_FIELDS = (
    "use_rus", "use_ugf", "use_udlr", "num_prompts", "capm_num_layers", "mid_layers_per_level", "mask_head_dim",
    "mask_stride", "ugf_levels", "ugf_gate_scale_init", "ugf_gate_bias_init", "udlr_mask_threshold",
    "udlr_mask_temperature", "uncertainty_target", "uncertainty_pooling", "uncertainty_loss_weight",
    "uncertainty_warmup_steps", "detach_uncertainty", "bce_weight", "dice_weight", "coarse_loss_weight",
    "num_pointers", "pointer_loss_weight", "position_encoding",
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class ModelCardInfo:
    """
    What the card says about a training run beyond the model config and the `TrainingArguments`.

    Args:
        dataset (`str`): Data set name (`rrsisd`, `synthetic`, ...) or Hub dataset id (`owner/name`); only a Hub id is
            listed in the card's `datasets`.
        splits (`dict[str, str]`): Metric prefix -> split name, e.g. `{"eval": "validation", "test": "test"}`.
        num_train_samples (`int`, *optional*): Rows in the training split.
        init (`str`): How the weights started, e.g. "preset `tiny`, random initialisation".
        base_models (`list[str]`): Hub ids of the pretrained weights the model started from.
        image_size (`int`): Model input side.
        max_length (`int`): Token limit per expression.
        extra (`dict[str, Any]`): More rows for the training table.
    """

    dataset: str = "unknown"
    splits: dict[str, str] = field(default_factory=dict)
    num_train_samples: int | None = None
    init: str = "unknown"
    base_models: list[str] = field(default_factory=list)
    image_size: int | None = None
    max_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def hub_ids(*names: str | None) -> list[str]:
    """The names that are Hub ids (`owner/name`, not a local folder), in order, without repeats."""
    ids = []
    for name in names:
        if name and _HUB_ID.match(name) and not os.path.exists(name) and name not in ids:
            ids.append(name)
    return ids


def _table(rows: dict[str, Any], as_code: bool) -> str:
    """A two-column Markdown table; `as_code` puts the values in backticks (config values, not prose)."""
    lines = ["| setting | value |", "|---|---|"]
    for key, value in rows.items():
        if value is not None:
            text = f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {f'`{text}`' if as_code else text} |")
    return "\n".join(lines)


def _training_rows(config: CrobimUConfig, args: Any, info: ModelCardInfo, step: int | None) -> dict[str, Any]:
    rows = {
        "initialisation": info.init,
        "image encoder": f"{config.backbone_config.model_type} ({type(config.backbone_config).__name__})",
        "text encoder": f"{config.text_config.model_type}, hidden size {config.text_config.hidden_size}",
        "data set": f"{info.dataset}, {info.splits.get('train', 'train')} split"
        + ("" if info.num_train_samples is None else f" ({info.num_train_samples} samples)"),
        "input size": None if info.image_size is None else f"{info.image_size}x{info.image_size}",
        "max tokens per expression": info.max_length,
    }
    if args is not None:
        schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        schedule += f" {args.lr_scheduler_kwargs}" if args.lr_scheduler_kwargs else ""
        schedule += f", warm-up {args.warmup_steps:g}" if args.warmup_steps else ""
        batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        backbone_scale = getattr(args, "backbone_learning_rate_scale", 1)
        text_scale = getattr(args, "text_encoder_learning_rate_scale", 1)
        length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
        rows.update(
            {
                "optimizer": f"{getattr(args.optim, 'value', args.optim)}, weight decay {args.weight_decay:g} "
                "(none on norms, biases, position tables, prompts, gates)",
                "learning rate": f"{args.learning_rate:g} (backbone x{backbone_scale:g}, text encoder x{text_scale:g})",
                "schedule": schedule,
                "batch size": f"{batch} ({args.per_device_train_batch_size} per device x {args.world_size} process(es) "
                f"x {args.gradient_accumulation_steps} accumulation)",
                "training length": length,
                "steps done": step,
                "seed": args.seed,
                "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                "gradient checkpointing": bool(args.gradient_checkpointing),
            }
        )
    rows.update(info.extra)
    return rows


def _evaluation_text(metrics: dict[str, dict[str, Any]], info: ModelCardInfo, image_size: int | None) -> str:
    if not metrics:
        return "No evaluation was run for this checkpoint."
    resolution = "the model's input size"
    if image_size is not None:
        resolution = f"{image_size}x{image_size} ({resolution})"
    sections = []
    for prefix, values in metrics.items():
        split = info.splits.get(prefix, prefix)
        header = f"{info.dataset}, `{split}` split"
        details = [f"{values['num_samples']} samples" if "num_samples" in values else None,
                   f"weights of step {values['step']}" if values.get("step") is not None else None,
                   f"scored at {resolution}"]
        header += " (" + ", ".join(d for d in details if d) + ")"
        body = format_metric_table(values) if all(name in values for name in METRIC_ORDER) else "Metrics incomplete."
        sections.append(f"{header}:\n\n{body}")
    return "\n\n".join(sections)


def render_model_card(
    config: CrobimUConfig,
    training_args: Any = None,
    info: ModelCardInfo | None = None,
    metrics: dict[str, dict[str, Any]] | None = None,
    model_id: str | None = None,
    step: int | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """
    Renders the model card template (front matter plus Markdown with `$placeholders`).

    Args:
        config ([`CrobimUConfig`]): The model's config.
        training_args ([`CrobimUTrainingArguments`], *optional*): The run's arguments, for the training table.
        info ([`ModelCardInfo`], *optional*): Data set, initialisation and base models.
        metrics (`dict[str, dict]`, *optional*): Metric prefix (`eval`, `test`) -> fractions as returned by
            [`~crobim_u.metrics.ReferringSegmentationMetric.compute`], plus `step`.
        model_id (`str`, *optional*): Hub id or folder used in the snippets and the title.
        step (`int`, *optional*): Optimisation steps done.
        template (`str` or `os.PathLike`, *optional*): Template file; defaults to the package's `DEFAULT_TEMPLATE`.

    Returns:
        `str`: the README.md text.
    """
    info = info or ModelCardInfo()
    metrics = metrics or {}
    template_text = (Path(template) if template else DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    repo_id = model_id or "path/to/checkpoint"
    description = f"This checkpoint: {info.init}, trained on {info.dataset}."
    body = string.Template(template_text).substitute(
        title=repo_id.rstrip("/").split("/")[-1],
        description=description,
        repo_id=repo_id,
        training_table=_table(_training_rows(config, training_args, info, step), as_code=False),
        evaluation=_evaluation_text(metrics, info, info.image_size),
        interpretation_table=_table({name: getattr(config, name) for name in INTERPRETATION_FIELDS}, as_code=True),
        max_length=info.max_length or "the processor's maximum",
        image_size=f"{info.image_size}x{info.image_size}" if info.image_size else "a fixed square size",
        dataset=info.dataset,
    )
    card = ModelCard(body)
    if info.base_models:
        card.data.base_model = list(info.base_models)
    # The Hub links `datasets` and the model index's dataset type to dataset repositories: Hub ids only.
    dataset_ids = hub_ids(info.dataset)
    if dataset_ids:
        card.data.datasets = dataset_ids
    results = []
    for prefix, values in metrics.items():
        split = info.splits.get(prefix, prefix)
        for name in ("oIoU", "mIoU"):
            if name in values:
                results.append(
                    EvalResult(
                        task_type="image-segmentation", task_name="Referring image segmentation",
                        dataset_type=(dataset_ids or [info.dataset])[0], dataset_name=f"{info.dataset} ({split})",
                        dataset_split=split,
                        metric_type=name, metric_name=name, metric_value=round(100 * float(values[name]), 2),
                    )
                )
    if results:
        card.data.model_name = repo_id.rstrip("/").split("/")[-1]
        card.data.eval_results = results
    return str(card)


__all__ = ["DEFAULT_TEMPLATE", "ModelCardInfo", "hub_ids", "render_model_card"]
