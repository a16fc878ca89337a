"""`CrobimUTrainer`: the transformers `Trainer` with CroBIM-U's parameter groups, loss warm-up, streamed metrics,
model card, and checkpoint loading that agrees with `from_pretrained`."""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from ..metrics import build_compute_metrics
from ..modeling_crobim_u import CrobimUSegmentationOutput
from .model_card import ModelCardInfo, render_model_card


logger = logging.getLogger(__name__)

# Parameters without weight decay beyond biases and norms: position tables, embeddings of positions and scales,
# prompts and gates (decay would pull them towards "no position", "no prompt", "half-open gate").
NO_DECAY_NAME = re.compile(
    r"position_embeddings|relative_position_bias_table|(^|\.)(prompts|level_embeddings|gate_scale|gate_bias|mask_bias)$"
)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Outputs left out of evaluation: only `logits` reach the metrics, so nothing else is gathered per batch.
_EVAL_IGNORE_KEYS = [name for name in CrobimUSegmentationOutput.__dataclass_fields__ if name not in ("loss", "logits")]
# Checkpoint files the Trainer does not copy to the output folder when it pushes a checkpoint.
_CARD_AND_CODE = re.compile(r"^(README\.md|.*\.py)$")


def is_norm(module: nn.Module) -> bool:
    """Normalization layers of torch and of transformers models (`SwinLayerNorm`, `BertLayerNorm`, RMS norms)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: biases and other vectors, norms, positions, prompts, gates."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(prefix=module_name, recurse=False):
            if param.ndim <= 1 or is_norm(module) or NO_DECAY_NAME.search(param_name):
                names.add(param_name)
    return names


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    backbone_scale: float = 1.0,
    text_encoder_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """
    Optimizer parameter groups: {backbone, text encoder, rest} x {decay, no decay}, each with its learning rate
    and weight decay and a `name`; empty groups and frozen parameters are left out.
    """
    no_decay = no_decay_parameter_names(model)
    scales = {"backbone": backbone_scale, "text_encoder": text_encoder_scale}
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = name.split(".")[0] if name.split(".")[0] in scales else "heads"
        scale = scales.get(part, 1.0)
        decays = name not in no_decay
        key = f"{part}/{'decay' if decays else 'no_decay'}"
        group = groups.setdefault(
            key,
            {"name": key, "params": [], "lr": learning_rate * scale, "weight_decay": weight_decay if decays else 0.0},
        )
        group["params"].append(param)
    return list(groups.values())


@torch.no_grad()
def load_weights_like_from_pretrained(model: PreTrainedModel, folder: str) -> None:
    """
    Loads the weights of a saved folder into `model` exactly as `from_pretrained` reads them.

    The Trainer's resume and `load_best_model_at_end` read the safetensors file into `load_state_dict` directly. In
    transformers 5.x, `save_pretrained` writes some sub-models' keys in their legacy names (the Swin backbone's
    `backbone.swin.encoder...attention.q_proj` as `backbone.encoder...attention.self.query`), and only
    `from_pretrained` renames them back (huggingface/transformers#43701): a raw load leaves the backbone at its
    current values with a warning. Loading through `from_pretrained` applies the same conversion, so resumed and
    best weights equal `from_pretrained` of the same folder; a key that still does not match raises.
    """
    reference = type(model).from_pretrained(folder, config=copy.deepcopy(model.config))
    model.load_state_dict(reference.state_dict(), strict=True)


class CrobimUTrainer(Trainer):
    """
    `Trainer` for [`CrobimUForReferringSegmentation`].

    - Optimizer groups: the backbone and the text encoder learn at `learning_rate` times
      `backbone_learning_rate_scale` / `text_encoder_learning_rate_scale`; norms, biases, position tables, prompts
      and gates get no weight decay.
    - The optimisation step reaches the model as `global_step`, which drives the uncertainty-loss warm-up.
    - Evaluation returns only the mask logits, scored per batch by `compute_metrics` (`batch_eval_metrics=True`);
      `compute_metrics` defaults to [`~crobim_u.metrics.build_compute_metrics`] (oIoU, mIoU, Pr@X).
    - Every checkpoint and the final folder get a model card (README.md) rendered from `model_card.md`.
    - Resume and `load_best_model_at_end` load weights as `from_pretrained` does (huggingface/transformers#43701).

    Args:
        model_card_info ([`ModelCardInfo`], *optional*): Run details for the model card.
        All other arguments are those of `Trainer`.
    """

    def __init__(self, *args: Any, model_card_info: ModelCardInfo | None = None, **kwargs: Any):
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = build_compute_metrics()
        super().__init__(*args, **kwargs)
        self.model_card_info = model_card_info or ModelCardInfo()
        # Metric prefix ("eval", "test") -> the last metrics measured with it, for the model card.
        self.measured_metrics: dict[str, dict[str, Any]] = {}
        # The step whose weights the model holds when it differs from `state.global_step` (best model loaded).
        self.weights_step: int | None = None

    # ---- Optimisation ----

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = (
                self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            )
            groups = parameter_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay,
                getattr(self.args, "backbone_learning_rate_scale", 1.0),
                getattr(self.args, "text_encoder_learning_rate_scale", 1.0),
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        no_decay = no_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters() if name not in no_decay]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            inputs = {**inputs, "global_step": self.state.global_step}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ---- Evaluation ----

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        ignore_keys = _EVAL_IGNORE_KEYS if ignore_keys is None else ignore_keys
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        start = len(metric_key_prefix) + 1
        measured = {key[start:]: value for key, value in metrics.items() if key.startswith(f"{metric_key_prefix}_")}
        step = self.state.global_step if self.weights_step is None else self.weights_step
        self.measured_metrics[metric_key_prefix] = {**measured, "step": step}
        return metrics

    # ---- Saving, model card and the Hub ----

    def render_model_card(self, model_id: str | None = None) -> str:
        """The README.md of the current model: config, run arguments and the metrics measured so far."""
        model = self.accelerator.unwrap_model(self.model)
        template = getattr(self.args, "model_card_template", None)
        return render_model_card(
            model.config, self.args, self.model_card_info, self.measured_metrics,
            model_id=model_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            step=self.state.global_step, template=template,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as file:
                file.write(self.render_model_card())

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Writes this package's model card (not the Trainer's generic one) to the output folder."""
        if self.is_world_process_zero():
            model_id = self.hub_model_id or self.args.hub_model_id
            with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as file:
                file.write(self.render_model_card(model_id))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies config and weights to the pushed output folder; the card and the code files belong
        # there too, or the pushed repository would not load with trust_remote_code.
        if self.is_world_process_zero():
            for name in os.listdir(checkpoint_folder):
                if _CARD_AND_CODE.match(name):
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    # ---- Loading checkpoints (huggingface/transformers#43701) ----

    def _loads_plain_state_dict(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and isinstance(
            self.accelerator.unwrap_model(self.model), PreTrainedModel
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._loads_plain_state_dict():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info(f"Loading model weights from {resume_from_checkpoint} as from_pretrained reads them.")
        load_weights_like_from_pretrained(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._loads_plain_state_dict():
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        load_weights_like_from_pretrained(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
        self.weights_step = self.state.best_global_step
        self.model_card_info.extra["weights"] = (
            f"best checkpoint by {self.args.metric_for_best_model} (step {self.state.best_global_step})"
        )


__all__ = ["CrobimUTrainer", "load_weights_like_from_pretrained", "no_decay_parameter_names", "parameter_groups"]
