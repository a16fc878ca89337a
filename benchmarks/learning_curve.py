"""Learning curve of the demo's recipe beyond the demo's budget: does reading relations and sizes keep improving with
training time, or has it stalled?

    python benchmarks/learning_curve.py [--max-steps 9000] [--eval-steps 1125 2250 4500 6750 9000] [--threads 1]

Trains the demo's model and recipe (`crobim_u.demo.DemoRecipe`: 160x160 scenes at difficulty easy, two expressions
per scene, batch 8, half the training expressions relational or size comparisons) for `--max-steps` steps (9,000 by
default, four times the 2,250 the demo trained for when the curve was measured: 4,048 s of training at one thread on
the 2-core CPU of BENCHMARKS.md, beside another one-thread run), on `--num-train` expressions (twice the demo's,
so that each is seen about as often as in a 4,500-step demo), and scores the model at each of `--eval-steps` on:
- the demo's test split, with `--num-test` scenes (1,000 by default, so that the relation and size families hold
  enough samples), overall, on its same-class-distractor subset and per expression family;
- a relational split (`--num-relational-test` scenes whose expressions are all relations or size comparisons and
  whose target has a same-class look-alike: the relations probe's test data).

The learning rate decays linearly over the whole run, so a point before the end is scored at a learning rate that
has not yet annealed; it may understate what a run ending there reaches. `--save-model DIR` keeps the final model
(for `benchmarks/linear_probes.py`).
Writes `--output` (default `benchmarks/results/learning_curve.json`) after every evaluation, with the class-only
reference's figures on the same splits.
"""

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
from transformers import TrainerCallback

from crobim_u.data.synthetic import load_synthetic
from crobim_u.demo import (
    RELATIONAL_FAMILIES,
    DemoRecipe,
    load_demo_splits,
    score_with_distractor_subset,
    train_on_synthetic,
)
from crobim_u.inference.evaluation import evaluate_reference_masks


METRIC_KEYS = ("mIoU", "oIoU", "Pr@0.5", "Pr@0.9")


def relational_test_split(recipe: DemoRecipe, num_test: int, seed: int) -> Any:
    """Relations and size comparisons only, each target with a same-class look-alike (the relations probe's test)."""
    test = load_synthetic(
        num_train=0, num_test=num_test, num_validation=0, image_size=recipe.image_size, difficulty=recipe.difficulty,
        seed=seed, families=RELATIONAL_FAMILIES,
    )["test"]
    return test.filter(lambda flag: flag, input_columns="has_distractor")


def compact(scores: dict[str, Any]) -> dict[str, float]:
    return {key: round(100 * scores[key], 2) for key in METRIC_KEYS}


class ScoreDuringTraining(TrainerCallback):
    """Scores the model at the given steps and writes the results file after each; the scoring time is not counted
    as training time."""

    def __init__(self, eval_steps: list[int], splits: dict[str, Any], report: dict[str, Any]):
        self.eval_steps = set(eval_steps)
        self.splits = splits
        self.report = report
        self.scoring_seconds = 0.0
        self.started = time.time()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step not in self.eval_steps:
            return control
        scoring_started = time.time()
        model.eval()
        with torch.no_grad():
            demo = score_with_distractor_subset(model, processing_class, self.splits["test"], progress=False)
            relational = score_with_distractor_subset(
                model, processing_class, self.splits["relational"], progress=False
            )
        model.train()
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        point = {
            "step": state.global_step,
            "train_seconds": round(scoring_started - self.started - self.scoring_seconds, 1),
            "last_logged_loss": losses[-1] if losses else None,
            "test": compact(demo),
            "test_with_distractor": compact(demo["with_distractor"]),
            "test_by_family": {
                family: {"count": block["count"], "model": compact(block["model"])}
                for family, block in demo["by_family"].items()
            },
            "relational": compact(relational),
        }
        self.scoring_seconds += time.time() - scoring_started
        # The class-only reference per family comes with the scores (`metrics_by_family`); it does not change.
        self.report["class_only"].setdefault(
            "test_by_family", {family: compact(block["class_only"]) for family, block in demo["by_family"].items()}
        )
        self.report["points"].append(point)
        self.report["write"]()
        print(json.dumps(point), flush=True)
        return control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=9000)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[1125, 2250, 4500, 6750, 9000])
    parser.add_argument("--num-train", type=int, default=2 * DemoRecipe.num_train)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--num-relational-test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/learning_curve.json")
    parser.add_argument(
        "--save-model", metavar="DIR", help="also save the final model and processor there (for the linear probes)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = DemoRecipe(max_steps=args.max_steps, num_train=args.num_train, num_test=args.num_test)
    train, test = load_demo_splits(recipe, seed=args.seed)
    relational = relational_test_split(recipe, args.num_relational_test, args.seed)
    test_distractor = test.filter(lambda flag: flag, input_columns="has_distractor")
    report: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(part) for part in sys.argv),
        "recipe": asdict(recipe),
        "threads": args.threads,
        "num_test": len(test),
        "num_relational_test": len(relational),
        "class_only": {
            "test": compact(evaluate_reference_masks(test, "class_mask")),
            "test_with_distractor": compact(evaluate_reference_masks(test_distractor, "class_mask")),
            "relational": compact(evaluate_reference_masks(relational, "class_mask")),
        },
        "points": [],
    }

    def write() -> None:
        with open(args.output, "w") as file:
            json.dump({key: value for key, value in report.items() if key != "write"}, file, indent=2)

    report["write"] = write
    callback = ScoreDuringTraining(args.eval_steps, {"test": test, "relational": relational}, report)
    started = time.time()
    with tempfile.TemporaryDirectory() as work_dir:
        model, processor, _ = train_on_synthetic(
            recipe, train, work_dir, seed=args.seed, progress=False, callbacks=[callback]
        )
    if args.save_model:
        model.save_pretrained(args.save_model)
        processor.save_pretrained(args.save_model)
    report["wall_seconds"] = round(time.time() - started, 1)
    write()


if __name__ == "__main__":
    main()
