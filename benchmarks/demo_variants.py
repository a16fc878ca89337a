"""Variants of the demo's recipe at one budget: which image encoder, mask stride and optimiser settings learn fastest.

    python benchmarks/demo_variants.py [--variants NAME ...] [--max-steps 600] [--threads 1] [--output FILE]

BENCHMARKS.md runs the batch-16 variants for 600 steps and the batch-8 ones for 1,200 (the same samples seen).

By default every variant trains on 6,000 synthetic training scenes at 160x160, difficulty medium, seed 0, one
expression each (the data of the demo when its model was chosen; `--difficulty easy --num-train 16000
--expressions-per-image 2 --relational-share 0.5` gives the demo's data now: 16,000 expressions about 8,000 scenes,
half of them relational or size comparisons) with the demo's
recipe and seed, changed only as its entry in `VARIANTS` says, and is scored on 300 test scenes, overall and
on the samples with a same-class distractor, next to the class-only reference. This is how the demo's model
(`crobim_u.demo.DEMO_MODEL_OVERRIDES`) was chosen; BENCHMARKS.md, "What we tried", has the results.
"""

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from crobim_u.demo import (
    DEMO_MODEL_OVERRIDES,
    DemoRecipe,
    load_demo_splits,
    score_with_distractor_subset,
    train_on_synthetic,
)
from crobim_u.inference.evaluation import evaluate_reference_masks


RESNET = DEMO_MODEL_OVERRIDES["backbone_config"]
RESNET_STRIDE_2 = {"backbone_config": RESNET, "mask_stride": 2}
# Name -> DemoRecipe fields; each entry spells out what it changes from the recipe's defaults that matter here.
# `model_overrides` replaces the demo's own as a whole (`{}`: the plain `tiny` preset).
BATCH_16 = {"batch_size": 16, "warmup_steps": 30}
BATCH_8 = {"batch_size": 8, "warmup_steps": 60}
VARIANTS: dict[str, dict[str, Any]] = {
    # Batch 16 (BENCHMARKS.md runs them for 600 steps).
    "swin, stride 4": {**BATCH_16, "model_overrides": {}, "learning_rate": 1e-3},
    "swin, stride 2": {**BATCH_16, "model_overrides": {"mask_stride": 2}, "learning_rate": 1e-3},
    "swin, stride 2, init 0.05": {
        **BATCH_16, "model_overrides": {"mask_stride": 2, "initializer_range": 0.05}, "learning_rate": 1e-3,
    },
    "resnet, stride 2": {**BATCH_16, "model_overrides": RESNET_STRIDE_2, "learning_rate": 1e-3},
    "resnet, stride 2, init 0.05": {
        **BATCH_16, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.05}, "learning_rate": 1e-3,
    },
    "resnet, stride 2, init 0.05, dice weight 2": {
        **BATCH_16, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.05}, "learning_rate": 1e-3,
        "dice_weight": 2.0,
    },
    "resnet, stride 2, init 0.05, lr 2e-3": {
        **BATCH_16, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.05}, "learning_rate": 2e-3,
    },
    "resnet, stride 2, init 0.05, lr 2e-3, 16-channel pixel embedding": {
        **BATCH_16, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.05, "mask_head_dim": 16},
        "learning_rate": 2e-3,
    },
    # Batch 8 (BENCHMARKS.md runs them for 1,200 steps: the same samples as 600 steps of batch 16).
    "batch 8, init 0.05, lr 2e-3": {
        **BATCH_8, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.05}, "learning_rate": 2e-3,
    },
    "batch 8, init 0.05, lr 1e-3": {
        **BATCH_8, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.05}, "learning_rate": 1e-3,
    },
    "batch 8, init 0.1, lr 2e-3": {
        **BATCH_8, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.1}, "learning_rate": 2e-3,
    },
    "batch 8, init 0.1, lr 1e-3": {
        **BATCH_8, "model_overrides": {**RESNET_STRIDE_2, "initializer_range": 0.1}, "learning_rate": 1e-3,
    },
    # The demo's recipe as it is now.
    "demo": {},
    # The lighter stride-4 settings, each alone over the demo's model, then together (`udlr_hidden_dim` halved: the
    # demo's `tiny` preset has 16 where the full-size presets have 64).
    "demo, stride-4 word context from stride 8": {
        "model_overrides": {**DEMO_MODEL_OVERRIDES, "lgfa_fine_attention": "upsampled"}
    },
    "demo, depthwise stride-4 smoothing": {"model_overrides": {**DEMO_MODEL_OVERRIDES, "lgfa_fine_smoothing": "depthwise"}},
    "demo, separable pixel head": {"model_overrides": {**DEMO_MODEL_OVERRIDES, "mask_head_conv": "separable"}},
    "demo, half-width UDLR": {"model_overrides": {**DEMO_MODEL_OVERRIDES, "udlr_hidden_dim": 8}},
    "demo, depthwise smoothing and separable pixel head": {
        "model_overrides": {**DEMO_MODEL_OVERRIDES, "lgfa_fine_smoothing": "depthwise", "mask_head_conv": "separable"}
    },
    "demo, lighter stride-4 path": {
        "model_overrides": {
            **DEMO_MODEL_OVERRIDES, "lgfa_fine_attention": "upsampled", "lgfa_fine_smoothing": "depthwise",
            "mask_head_conv": "separable", "udlr_hidden_dim": 8,
        }
    },
}


def run_variant(
    name: str, max_steps: int, work_dir: str, data: Any, expressions_per_image: int = 1
) -> dict[str, Any]:
    recipe = DemoRecipe(max_steps=max_steps, expressions_per_image=expressions_per_image, **VARIANTS[name])
    started = time.time()
    model, processor, trainer = train_on_synthetic(recipe, data["train"], work_dir, seed=0, progress=False)
    train_seconds = time.time() - started
    scores = score_with_distractor_subset(model, processor, data["test"], recipe.eval_batch_size, progress=False)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "variant": name,
        "batch_size": recipe.batch_size,
        "mIoU": scores["mIoU"],
        "oIoU": scores["oIoU"],
        "with_distractor_mIoU": scores["with_distractor"]["mIoU"],
        "by_family_mIoU": {
            family: {"count": block["count"], "model": block["model"]["mIoU"], "class_only": block["class_only"]["mIoU"]}
            for family, block in scores["by_family"].items()
        },
        "final_logged_loss": losses[-1] if losses else None,
        "train_seconds": train_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-test", type=int, default=DemoRecipe.num_test)
    parser.add_argument("--difficulty", default="medium", help="of the generated scenes (easy, medium, hard)")
    parser.add_argument(
        "--expressions-per-image", type=int, default=1, help="training expressions per scene (the demo's: 2)"
    )
    parser.add_argument(
        "--relational-share", type=float, default=0.0,
        help="share of training expressions from the relation and size families only (DemoRecipe.relational_share)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one variant at a time)")
    parser.add_argument("--output", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_recipe = DemoRecipe(
        difficulty=args.difficulty, num_train=args.num_train, num_test=args.num_test,
        expressions_per_image=args.expressions_per_image, relational_share=args.relational_share,
    )
    train, test = load_demo_splits(data_recipe, seed=0)
    data = {"train": train, "test": test}
    class_only = evaluate_reference_masks(data["test"], "class_mask")
    with_distractor = data["test"].filter(lambda flag: flag, input_columns="has_distractor")
    class_only_distractor = evaluate_reference_masks(with_distractor, "class_mask")
    results = []
    for name in args.variants:
        with tempfile.TemporaryDirectory() as work_dir:
            results.append(run_variant(name, args.max_steps, work_dir, data, args.expressions_per_image))
        print(json.dumps(results[-1]), flush=True)

    print(
        f"\n{args.max_steps} steps; class-only reference: mIoU "
        f"{100 * class_only['mIoU']:.2f}, {100 * class_only_distractor['mIoU']:.2f} with a distractor"
    )
    print("| variant | batch | mIoU | oIoU | mIoU, with distractor |")
    print("|---|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['variant']} | {row['batch_size']} | {100 * row['mIoU']:.2f} | {100 * row['oIoU']:.2f} | "
              f"{100 * row['with_distractor_mIoU']:.2f} |")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(
                {"args": vars(args), "class_only": class_only, "class_only_with_distractor": class_only_distractor,
                 "results": results},
                file, indent=2,
            )


if __name__ == "__main__":
    main()
