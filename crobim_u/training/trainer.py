"""`CrobimUTrainer`: the transformers `Trainer` with CroBIM-U's parameter groups, loss warm-up, streamed metrics,
model card, checkpoint loading that agrees with `from_pretrained`, resume that skips half-written checkpoints, and
no pickled files in what it saves or pushes."""

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
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils import PushInProgress, hf_api

from ..metrics import build_compute_metrics
from ..modeling_crobim_u import CrobimUSegmentationOutput
from .checkpoints import CHECKPOINT_FOLDER, checkpoint_folders, checkpoint_problem, last_complete_checkpoint
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
# The run's arguments as JSON, in place of the pickle (`training_args.bin`) the Trainer writes.
TRAINING_ARGS_JSON_NAME = "training_args.json"
# What `_push_from_checkpoint` copies from a checkpoint to the pushed output folder.
_PUSHED_FROM_CHECKPOINT = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    rf"README\.md|.*\.py|{re.escape(TRAINING_ARGS_JSON_NAME)})$"
)


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
    reference = type(model).from_pretrained(folder, config=copy.deepcopy(model.config), use_safetensors=True)
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
    - `resume_from_checkpoint=True` picks the newest complete checkpoint: one half-written by a killed run is skipped.
    - No pickle is saved or pushed: the arguments go to `training_args.json`, not `training_args.bin`.

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
            # The Trainer pickles the arguments to training_args.bin. A pickle runs code when it is loaded, and
            # nothing reads that file back: the arguments are kept as JSON instead, and no pickle is saved or pushed.
            pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, TRAINING_ARGS_JSON_NAME), "w", encoding="utf-8") as file:
                file.write(self.args.to_json_string())
            with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as file:
                file.write(self.render_model_card())

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Writes this package's model card (not the Trainer's generic one) to the output folder."""
        if self.is_world_process_zero():
            model_id = self.hub_model_id or self.args.hub_model_id
            with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as file:
                file.write(self.render_model_card(model_id))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """
        Pushes a checkpoint as `Trainer._push_from_checkpoint` does, without its pickled `training_args.bin`.

        The weights, config, card, code files and `training_args.json` are copied from the checkpoint to the output
        folder (the card and code too, or the pushed repository would not load with `trust_remote_code`), the
        processor is saved there, and both folders are uploaded as `hub_strategy` asks.
        """
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        # An unfinished earlier push is not joined by this one unless hub_always_push is set.
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        for name in os.listdir(checkpoint_folder):
            if _PUSHED_FROM_CHECKPOINT.match(name):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        jobs = [
            hf_api().upload_folder(
                repo_id=self.hub_model_id, folder_path=output_dir, commit_message=commit_message,
                token=self.args.hub_token, run_as_future=True, revision=self.args.hub_revision,
                ignore_patterns=["_*", "checkpoint-*", TRAINING_ARGS_NAME],
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT
                else os.path.basename(checkpoint_folder)
            )
            jobs.append(
                hf_api().upload_folder(
                    repo_id=self.hub_model_id, folder_path=checkpoint_folder, path_in_repo=path_in_repo,
                    commit_message=commit_message + ", checkpoint", token=self.args.hub_token, run_as_future=True,
                    revision=self.args.hub_revision, ignore_patterns=[TRAINING_ARGS_NAME],
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    # ---- Resuming ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """
        `Trainer.train`, except that `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint of
        `output_dir` (see [`~crobim_u.training.checkpoints.checkpoint_problem`]) rather than the newest folder, and a
        checkpoint path that is incomplete raises a `ValueError` naming the problem. Incomplete checkpoints newer than
        the one resumed from, left by a run killed while saving, are deleted: this run writes those steps again.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                found = [folder.name for _, folder in checkpoint_folders(self.args.output_dir)]
                raise ValueError(
                    f"No complete checkpoint to resume from in {self.args.output_dir} (checkpoint folders found: "
                    f"{found or 'none'}). Train from the start, without resume_from_checkpoint."
                )
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                complete = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: {problem}. "
                    + (f"The newest complete checkpoint beside it is {complete}." if complete else "")
                )
        if resume_from_checkpoint and self.is_world_process_zero():
            self._remove_incomplete_checkpoints_after(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _remove_incomplete_checkpoints_after(self, checkpoint: str) -> None:
        match = CHECKPOINT_FOLDER.match(os.path.basename(os.path.normpath(checkpoint)))
        if match is None:
            return
        for step, folder in checkpoint_folders(self.args.output_dir):
            if step > int(match[1]):
                problem = checkpoint_problem(folder)
                if problem is not None:
                    logger.warning(f"Deleting incomplete checkpoint {folder} ({problem}); this run saves it again.")
                    shutil.rmtree(folder)

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
