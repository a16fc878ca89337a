"""Relations probe: can the model learn relational and size-comparison expressions?

    python benchmarks/relations_probe.py [--variants model position_blind] [--max-steps 4500] [--jobs 2]

Every training and test expression is relational ("the car left of the tennis court", "the tank closest to the
pond") or a size comparison ("the larger tank"), and every test target has a same-class look-alike, so the class name
alone never answers it. Each variant trains with the demo's recipe (`crobim_u.demo.DemoRecipe`: 160x160 scenes at
difficulty easy, two expressions per scene, batch 8) for 4,500 steps, twice the demo's (23 minutes of training at one
thread on the 2-core CPU of BENCHMARKS.md), on `--num-train` such expressions, changed only as its entry in
`VARIANTS` says, and is scored beside:
- the class-only reference (every object of the referred class: what reading the class name alone gives);
- the position-blind control (the same model without position encodings or pointers: what the image alone gives).

Writes `benchmarks/results/relations_probe.json` with `model`, `class_only`, `position_blind` (and any other
variant), each with the metric keys, plus `by_family`, `train_seconds`, `command`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from crobim_u.data.synthetic import load_synthetic
from crobim_u.demo import (
    DEMO_MODEL_OVERRIDES,
    RELATIONAL_FAMILIES,
    DemoRecipe,
    score_with_distractor_subset,
    train_on_synthetic,
)
from crobim_u.inference.evaluation import evaluate_reference_masks


METRIC_KEYS = ("mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")
# The probe's budget, fixed so that its published results stay reproducible: twice the 2,250 steps the demo trained
# for when the probe was built (about 23 minutes of training at one thread on the CPU of BENCHMARKS.md).
PROBE_STEPS = 4500
# Name -> config fields over the demo's model (`DEMO_MODEL_OVERRIDES`, the shipped recipe).
VARIANTS: dict[str, dict[str, Any]] = {
    "model": {},
    "position_blind": {"position_encoding": "none", "num_pointers": 0},
    "no_pointers": {"num_pointers": 0},
    "one_pointer": {"num_pointers": 1},
}


def load_probe_splits(args: argparse.Namespace) -> tuple[Any, Any]:
    """Relational and size-comparison expressions only; test samples with a same-class distractor only."""
    common = dict(
        num_validation=0, image_size=DemoRecipe.image_size, difficulty=args.difficulty, seed=args.seed,
        families=RELATIONAL_FAMILIES,
    )
    train = load_synthetic(
        num_train=args.num_train, num_test=0, expressions_per_image=DemoRecipe.expressions_per_image, **common
    )["train"]
    test = load_synthetic(num_train=0, num_test=args.num_test, **common)["test"]
    return train, test.filter(lambda flag: flag, input_columns="has_distractor")


@torch.no_grad()
def pointer_hits(model: Any, processor: Any, test: Any, batch_size: int = 32) -> dict[str, float]:
    """
    Where the spatial pointers point on the test split: the share of samples whose last pointer's most likely cell
    lies on the target, and (relational samples) whose first pointer's lies on the named reference object.
    """
    if not model.config.num_pointers:
        return {}
    target_hits, reference_hits, relational = 0, 0, 0
    for start in range(0, len(test), batch_size):
        rows = test[start : start + batch_size]
        inputs = processor(images=rows["image"], text=rows["expression"])
        inputs.pop("original_sizes")
        logits = model(**inputs).pointer_logits  # (B, K, h, w)
        cells = logits.flatten(2).argmax(-1)
        for index, (mask, reference) in enumerate(zip(rows["mask"], rows["reference_mask"])):
            for pointer, answer in ((-1, mask), (0, reference)):
                pooled = torch.nn.functional.adaptive_max_pool2d(
                    torch.from_numpy(np.array(answer, dtype=np.float32))[None, None], logits.shape[-2:]
                ).flatten()
                if pooled.sum() == 0:
                    continue
                hit = bool(pooled[cells[index, pointer]] > 0)
                if pointer == -1:
                    target_hits += hit
                else:
                    relational += 1
                    reference_hits += hit
    hits = {"target_pointer_hit_rate": target_hits / len(test)}
    if model.config.num_pointers > 1 and relational:
        hits["reference_pointer_hit_rate"] = reference_hits / relational
    return hits


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    train, test = load_probe_splits(args)
    recipe = DemoRecipe(
        difficulty=args.difficulty, max_steps=args.max_steps,
        model_overrides={**DEMO_MODEL_OVERRIDES, **VARIANTS[name]},
    )
    started = time.time()
    with tempfile.TemporaryDirectory() as work_dir:
        model, processor, trainer = train_on_synthetic(recipe, train, work_dir, seed=args.seed, progress=False)
    train_seconds = time.time() - started
    scores = score_with_distractor_subset(model, processor, test, recipe.eval_batch_size, progress=False)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **{key: scores[key] for key in METRIC_KEYS},
        **pointer_hits(model, processor, test),
        "by_family": {family: block["model"] for family, block in scores["by_family"].items()},
        "train_seconds": train_seconds,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["model", "position_blind"])
    parser.add_argument("--max-steps", type=int, default=PROBE_STEPS)
    parser.add_argument("--num-train", type=int, default=DemoRecipe.num_train)
    parser.add_argument("--num-test", type=int, default=500, help="test scenes generated (those with a distractor stay)")
    parser.add_argument("--difficulty", default=DemoRecipe.difficulty)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at a time, each in its own process")
    parser.add_argument("--output", default="benchmarks/results/relations_probe.json")
    parser.add_argument("--variant-output", help=argparse.SUPPRESS)  # a child process's single variant
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)

    if args.variant_output:
        (name,) = args.variants
        with open(args.variant_output, "w") as file:
            json.dump(run_variant(name, args), file)
        return

    load_probe_splits(args)  # generate the data once, before the children read it from the cache
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        pending = list(args.variants)
        while pending:
            batch, pending = pending[: args.jobs], pending[args.jobs :]
            children = []
            for name in batch:
                path = os.path.join(folder, f"{name}.json")
                child_argv = [a for a in sys.argv[1:] if a not in args.variants and a != "--variants"]
                children.append((name, path, subprocess.Popen(
                    [sys.executable, __file__, *child_argv, "--variants", name, "--variant-output", path]
                )))
            for name, path, child in children:
                if child.wait() != 0:
                    raise SystemExit(f"variant {name!r} failed (exit status {child.returncode})")
                with open(path) as file:
                    results[name] = json.load(file)

    _, test = load_probe_splits(args)
    class_only = evaluate_reference_masks(test, "class_mask")
    report = {
        **results,
        "class_only": {key: class_only[key] for key in METRIC_KEYS},
        "num_test": len(test),
        "train_seconds": {name: result["train_seconds"] for name, result in results.items()},
        "command": command,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"{len(test)} test expressions (relation or size, each target with a same-class distractor)")
    print("| | mIoU | oIoU | Pr@0.5 | Pr@0.9 | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, block in [*results.items(), ("class_only", report["class_only"])]:
        seconds = f"{block['train_seconds']:.0f}" if "train_seconds" in block else ""
        print(f"| {name} | " + " | ".join(f"{100 * block[key]:.2f}" for key in ("mIoU", "oIoU", "Pr@0.5", "Pr@0.9"))
              + f" | {seconds} |")


if __name__ == "__main__":
    main()
