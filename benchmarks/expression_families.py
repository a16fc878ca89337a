"""Scores a model folder per expression family of the synthetic benchmark, beside the class-only reference.

    python benchmarks/expression_families.py --model outputs/demo [--difficulty easy] [--num-test 1000]

A referring model is worth what it reads beyond the class name: for each template family (class, attribute, size,
extreme, region, relation) the table gives the model's metrics and those of the class-only reference (every object
of the referred class), on the test scenes of `--seed` (the demo's test split is `--num-test 300 --seed 0`; more
scenes give each family more samples; the first 300 of a larger split are the demo's).
"""

import argparse
import json

import torch
from transformers import AutoModel, AutoProcessor

import crobim_u  # noqa: F401  (registers the classes with the Auto factories)
from crobim_u.data.synthetic import load_synthetic
from crobim_u.demo import DemoRecipe, score_with_distractor_subset


def format_family_table(by_family: dict) -> str:
    lines = [
        "| family | count | model mIoU | class-only mIoU | difference | model Pr@0.5 | class-only Pr@0.5 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family, block in by_family.items():
        model, class_only = block["model"], block["class_only"]
        lines.append(
            f"| {family} | {block['count']} | {100 * model['mIoU']:.2f} | {100 * class_only['mIoU']:.2f} | "
            f"{100 * (model['mIoU'] - class_only['mIoU']):+.2f} | {100 * model['Pr@0.5']:.2f} | "
            f"{100 * class_only['Pr@0.5']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (e.g. the demo's output folder)")
    parser.add_argument("--difficulty", default=DemoRecipe.difficulty)
    parser.add_argument("--image-size", type=int, default=DemoRecipe.image_size)
    parser.add_argument("--num-test", type=int, default=DemoRecipe.num_test)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--output", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = AutoModel.from_pretrained(args.model, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    test = load_synthetic(
        num_train=0, num_validation=0, num_test=args.num_test, image_size=args.image_size,
        difficulty=args.difficulty, seed=args.seed,
    )["test"]
    scores = score_with_distractor_subset(model, processor, test, progress=False)
    print(f"{len(test)} test scenes ({args.difficulty}, {args.image_size}x{args.image_size}, seed {args.seed}); "
          f"model mIoU {100 * scores['mIoU']:.2f} overall, {100 * scores['with_distractor']['mIoU']:.2f} on the "
          "samples with a same-class distractor")
    print(format_family_table(scores["by_family"]))
    if args.output:
        with open(args.output, "w") as file:
            json.dump({"args": vars(args), "mIoU": scores["mIoU"], "by_family": scores["by_family"]}, file, indent=2)


if __name__ == "__main__":
    main()
