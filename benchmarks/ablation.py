"""Does uncertainty help? Trains the CroBIM base and the CroBIM-U variants with the demo's model, data and budget and
the same seeds, and scores segmentation, the uncertainty map and the per-answer reliability, with paired intervals
against the base that can decide.

    python benchmarks/ablation.py                                    # the study: 5 variants x 3 seeds
    python benchmarks/ablation.py --variants base base+RUS full      # the three that decide first (same work folder)
    python benchmarks/ablation.py --quick                            # smoke run: 2 variants x 1 seed (< 1 min),
                                                                     # to outputs/ablation_quick/

Variants (the switches of `CrobimUConfig`, applied over the demo's model, `crobim_u.demo.DEMO_MODEL_OVERRIDES`):

| variant       | use_rus | use_ugf | use_udlr |
|---------------|---------|---------|----------|
| base          | -       | -       | -        |
| base+RUS      | x       | -       | -        |
| base+RUS+UGF  | x       | x       | -        |
| base+RUS+UDLR | x       | -       | x        |
| full          | x       | x       | x        |

and, with `--variants`, the full model with one alternative of the config each (`ALTERNATIVES`): `full/detach`,
`full/hard-target`, `full/max-pooling`, `full/gate-bias-0`, `full/adaptive-udlr-mask` (`udlr_mask_mode="adaptive"`),
`full/coarse-target` (`uncertainty_target_source="coarse"`), `full/separable-head` (a depthwise-separable MID pixel
head) and `full/lighter-stride-4` (that head and the stride-4 path's depthwise-only LGFA smoothing), the last two
lighter stride-4 paths against the papers'; each is compared with the full model as well as the base. Alternatives
train after the study's runs.

Recipe: the demo's (`crobim_u.demo.DemoRecipe` defaults): 160x160 scenes at difficulty easy, 16,000 training
expressions, two per scene, half of them relations or size comparisons (`relational_share`), batch 8, 3,375 steps,
the frozen pretrained MiniLM text encoder where installed; the test split has `--num-test` scenes (1,000), one
expression each. Seed `s` sets the initialisation and the batch order, so variant differences at one seed come from
the modules alone. Runs go to `--jobs` worker processes of `--threads` torch threads each (2 x 1 by default).

Resuming. Runs of one data/training setting share a work folder (`--work-dir`/<hash of the settings>): the data,
every run's model, and `runs.jsonl`, a journal with one line per finished run (its metrics and per-sample
counts). A restart with the same settings trains only what the journal lacks, so an interrupted study loses at most
the runs in progress, and `--variants` can add variants later; a final call with every variant gathers them into
one results file without training again. A run journaled under an earlier definition of the per-answer reliability
is scored again from its saved model.

Statistics (`paired_comparison`), for each variant against the base (and each `full/...` alternative also against
`full`), on the seeds both have run, for mIoU, oIoU, Pr@0.9 and the mIoU of the same-class-distractor subset:
- the per-seed differences, their mean and sample std, and whether every seed agrees in sign;
- a paired bootstrap over test samples (`--bootstrap` resamples): seeds are pooled per sample first (each sample's
  IoU, hit at 0.9, and intersection and union counts averaged over the seeds), then the same resampled indices serve
  both variants; oIoU is recomputed as a ratio in each resample; the distractor subset is resampled within itself.
  Its 2.5 and 97.5 percentiles are `bootstrap_95`;
- `combined_95`, one interval for seed and sample variance: mean per-seed difference ± t(0.975, S-1) x SE with
  SE = sqrt(sd_seeds^2 / S + SE_bootstrap^2) (slightly conservative: the seed x sample term counts twice);
- a verdict with the smallest effect of interest `--smallest-effect` (0.5 points): "helps" (interval above 0 and
  every seed above 0), "hurts" (the mirror), "no effect" (interval inside ±effect), else "inconclusive".

Writes `--output` (default `benchmarks/results/ablation.json`): per variant every seed's metrics, their mean and std,
`against_base` (and `against_full`), pixel AUROC/AURC/ECE where RUS is on, and for every variant with RUS a
`reliability` block (`spearman_reliability`, `spearman_score`, `mIoU_all`, `mIoU_kept_80`, the selective-prediction
curves; `crobim_u.metrics.rank_answers`, mean over seeds). Beside it: `<name>_samples.json` (per-sample counts,
reliability and score of every run), `_risk_coverage.png`, `_selective.png` and `_examples.png`. Unless
`--no-tables`, the tables between the `ablation` markers of BENCHMARKS.md and model_card.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"use_rus": False, "use_ugf": False, "use_udlr": False},
    "base+RUS": {"use_rus": True, "use_ugf": False, "use_udlr": False},
    "base+RUS+UGF": {"use_rus": True, "use_ugf": True, "use_udlr": False},
    "base+RUS+UDLR": {"use_rus": True, "use_ugf": False, "use_udlr": True},
    "full": {"use_rus": True, "use_ugf": True, "use_udlr": True},
}
STUDY = tuple(VARIANTS)
# The three that decide first: does RUS alone, or the whole of CroBIM-U, beat the base?
FIRST = ("base", "base+RUS", "full")
# The full model with one of the config's alternatives: what to try where it is not ahead of the base.
ALTERNATIVES: dict[str, dict[str, Any]] = {
    "full/detach": {"detach_uncertainty": True},
    "full/hard-target": {"uncertainty_target": "hard"},
    "full/max-pooling": {"uncertainty_pooling": "max"},
    "full/gate-bias-0": {"ugf_gate_bias_init": 0.0},
    "full/adaptive-udlr-mask": {"udlr_mask_mode": "adaptive"},
    "full/coarse-target": {"uncertainty_target_source": "coarse"},
    # Not uncertainty settings: the two lighter stride-4 paths that one seed at 2,250 steps could not decide
    # (BENCHMARKS.md, "A lighter stride-4 path"), against the papers' path on the study's seeds.
    "full/separable-head": {"mask_head_conv": "separable"},
    "full/lighter-stride-4": {"lgfa_fine_smoothing": "depthwise", "mask_head_conv": "separable"},
}
VARIANTS.update({name: {**VARIANTS["full"], **changes} for name, changes in ALTERNATIVES.items()})
SEGMENTATION_KEYS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU")
UNCERTAINTY_KEYS = ("auroc", "aurc", "ece")
TABLE_KEYS = (*SEGMENTATION_KEYS, "auroc", "aurc")
# Paired against the base: (key in the results, heading in the table).
PAIRED_KEYS = (("mIoU", "mIoU"), ("oIoU", "oIoU"), ("Pr@0.9", "Pr@0.9"), ("distractor_mIoU", "distractor mIoU"))
RELIABILITY_KEYS = (
    "spearman_reliability", "spearman_score", "mIoU_all", "mIoU_kept_80", "mIoU_kept_80_score", "mIoU_kept_80_oracle"
)
# The arguments that change what a run computes: a work folder holds the runs of one combination of them.
RUN_SETTINGS = (
    "data_seed", "difficulty", "image_size", "num_train", "num_test", "max_steps", "batch_size", "learning_rate",
    "expressions_per_image", "relational_share", "model_overrides", "text_encoder",
)
# Bumped when a journal line's content changes (2: per-sample counts, reliability and score), so that older runs
# are not mixed in.
JOURNAL_FORMAT = 2
# What a journal line's per-sample `reliability` means (`mask_reliability`). A line written under an earlier
# definition is scored again from its saved model, so that every seed's ranking reads the figure the package ships.
RELIABILITY_DEFINITION = "expected-iou"
MARKERS = ("<!-- ablation:start -->", "<!-- ablation:end -->")
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "ablation.json"
# A smoke run must not overwrite the study's results.
QUICK_OUTPUT = "outputs/ablation_quick/ablation.json"
CURVE_POINTS = 101
# t(0.975, df) for df = 1..30; above 30 the Cornish-Fisher expansion in `t_quantile_975` is exact to 1e-4.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def model_overrides_of(variant: str, common_overrides: str | dict[str, Any] = "{}") -> dict[str, Any]:
    """The config fields of a variant: the demo's model, then the variant's switches, then `--model-overrides`
    (whose keys replace the demo's, `backbone_config` as a whole)."""
    from crobim_u.demo import DEMO_MODEL_OVERRIDES

    overrides = copy.deepcopy(DEMO_MODEL_OVERRIDES)
    overrides.update(VARIANTS[variant])
    overrides.update(json.loads(common_overrides) if isinstance(common_overrides, str) else common_overrides)
    return overrides


def build_recipe(args: argparse.Namespace, variant: str):
    from crobim_u.demo import DemoRecipe

    return DemoRecipe(
        image_size=args.image_size, difficulty=args.difficulty, num_train=args.num_train, num_test=args.num_test,
        max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        expressions_per_image=args.expressions_per_image, relational_share=args.relational_share,
        # The demo's warm-ups (60 and 100 steps), shortened for short runs such as --quick.
        warmup_steps=min(DemoRecipe.warmup_steps, max(1, args.max_steps // 10)),
        uncertainty_warmup_steps=min(DemoRecipe.uncertainty_warmup_steps, max(1, args.max_steps // 15)),
        model_overrides=model_overrides_of(variant, args.model_overrides),
    )


def resolved_text_encoder(choice: str) -> str:
    """What `auto` means on this machine: the frozen pretrained MiniLM where installed, else a scratch BERT."""
    from crobim_u.demo import minilm_path

    return choice if choice != "auto" else ("minilm (frozen)" if minilm_path() else "scratch")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Trains and scores one (variant, seed) in this worker process."""
    import torch
    from datasets import load_from_disk

    from crobim_u.demo import score_with_distractor_subset, train_on_synthetic

    torch.set_num_threads(job["threads"])
    args = argparse.Namespace(**job["args"])
    recipe = build_recipe(args, job["variant"])
    data = load_from_disk(job["data_dir"])
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        model, processor, trainer = train_on_synthetic(
            recipe, data["train"], scratch, seed=job["seed"], text_encoder=args.text_encoder, progress=False
        )
    train_seconds = time.time() - started
    use_rus = model.config.use_rus
    scores = score_with_distractor_subset(
        model, processor, data["test"], batch_size=recipe.eval_batch_size, uncertainty_metrics=use_rus,
        reliability_metrics=use_rus, return_counts=True, progress=False,
    )
    result = {
        "variant": job["variant"],
        "seed": job["seed"],
        "train_seconds": round(train_seconds, 1),
        "score_seconds": round(time.time() - started - train_seconds, 1),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
        **{key: scores[key] for key in SEGMENTATION_KEYS},
        "with_distractor": {key: scores["with_distractor"][key] for key in SEGMENTATION_KEYS},
        "by_family": {family: block["model"] for family, block in scores["by_family"].items()},
        # Per test sample, in split order: what the paired statistics and the reliability ranking read.
        "samples": {"intersection": scores["intersection"].tolist(), "union": scores["union"].tolist()},
    }
    if use_rus:
        result.update({key: scores[key] for key in UNCERTAINTY_KEYS})
        coverage, risk = scores["risk_coverage"]
        # Resampled at fixed coverages so that seeds average point by point.
        grid = np.linspace(1.0, 0.0, CURVE_POINTS)
        order = np.argsort(coverage)
        result["risk_coverage"] = {
            "coverage": grid.tolist(), "risk": np.interp(grid, coverage[order], risk[order]).tolist()
        }
        result["samples"].update(_rounded_reliability_and_score(scores))
        result["reliability_definition"] = RELIABILITY_DEFINITION
    # Every model is kept (about 100 MB each): the figures and the per-answer figures can be read again without
    # training.
    folder = model_folder(job["models_dir"], job["variant"], job["seed"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return result


def model_folder(models_dir: "str | Path", variant: str, seed: int) -> Path:
    """Where a run's model is kept in the work folder."""
    return Path(models_dir) / f"{variant}-seed{seed}"


def _rounded_reliability_and_score(scores: dict[str, Any]) -> dict[str, list[float]]:
    return {
        "reliability": [round(value, 6) for value in scores["sample_reliability"].tolist()],
        "score": [round(value, 6) for value in scores["sample_score"].tolist()],
    }


def rescore_reliability(job: dict[str, Any]) -> dict[str, Any]:
    """Reads one saved model's per-sample reliability and score again, in this worker process."""
    import torch
    from datasets import load_from_disk

    from crobim_u import CrobimUForReferringSegmentation, CrobimUProcessor
    from crobim_u.inference.evaluation import evaluate_referring_segmentation

    torch.set_num_threads(job["threads"])
    model = CrobimUForReferringSegmentation.from_pretrained(job["model_dir"]).eval()
    processor = CrobimUProcessor.from_pretrained(job["model_dir"])
    scores = evaluate_referring_segmentation(
        model, processor, load_from_disk(job["data_dir"])["test"], job["batch_size"], progress=False,
        return_counts=True, reliability_metrics=True,
    )
    return {
        "variant": job["variant"], "seed": job["seed"], "intersection": scores["intersection"].tolist(),
        "union": scores["union"].tolist(), **_rounded_reliability_and_score(scores),
    }


def refresh_stale_reliability(
    args: argparse.Namespace, finished: dict[tuple[str, int], dict[str, Any]], data_dir: Path, models_dir: Path,
    journal: Path,
) -> None:
    """Brings every journaled run's reliability to `RELIABILITY_DEFINITION`: scored again from its saved model, or
    left out of the ranking (with a message) where the model was not kept. Rewrites the journal when anything
    changed."""
    stale = [
        run for run in finished.values()
        if "reliability" in run["samples"] and run.get("reliability_definition") != RELIABILITY_DEFINITION
    ]
    if not stale:
        return
    jobs = []
    for run in stale:
        model_dir = model_folder(models_dir, run["variant"], run["seed"])
        if (model_dir / "config.json").is_file():
            jobs.append({
                "variant": run["variant"], "seed": run["seed"], "model_dir": str(model_dir),
                "data_dir": str(data_dir), "threads": args.threads,
                "batch_size": build_recipe(args, run["variant"]).eval_batch_size,
            })
        else:
            print(f"{run['variant']} seed {run['seed']}: reliability from an earlier definition and no saved model; "
                  "left out of the reliability ranking", flush=True)
            for key in ("reliability", "score"):
                run["samples"].pop(key)
            run["reliability_definition"] = None
    if jobs:
        print(f"scoring the reliability of {len(jobs)} saved model(s) again ({RELIABILITY_DEFINITION})", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs))), mp_context=get_context("spawn")) as pool:
        for rescored in pool.map(rescore_reliability, jobs):
            run = finished[(rescored["variant"], rescored["seed"])]
            changed = sum(
                (a, b) != (c, d) for a, b, c, d in zip(
                    run["samples"]["intersection"], run["samples"]["union"], rescored["intersection"], rescored["union"]
                )
            )
            if changed:
                print(f"{run['variant']} seed {run['seed']}: the saved model's masks differ from the journal's on "
                      f"{changed} sample(s); the journal's segmentation figures are kept", flush=True)
            run["samples"].update(reliability=rescored["reliability"], score=rescored["score"])
            run["reliability_definition"] = RELIABILITY_DEFINITION
    rewritten = journal.with_suffix(".rewrite")
    rewritten.write_text("".join(json.dumps(run) + "\n" for run in finished.values()))
    rewritten.replace(journal)


# --- statistics -------------------------------------------------------------------------------------------------


def _mean_and_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of every scalar metric (std 0 for one seed), also for the distractor subset."""
    keys = [key for key in (*SEGMENTATION_KEYS, *UNCERTAINTY_KEYS) if all(key in run for run in runs)]
    summary: dict[str, Any] = {key: _mean_and_std([run[key] for run in runs]) for key in keys}
    summary["with_distractor"] = {
        key: _mean_and_std([run["with_distractor"][key] for run in runs]) for key in SEGMENTATION_KEYS
    }
    return summary


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The 97.5% quantile of Student's t with `degrees_of_freedom` (>= 1)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom must be >= 1, got {degrees_of_freedom}.")
    if degrees_of_freedom <= len(_T_975):
        return _T_975[degrees_of_freedom - 1]
    z, n = 1.959963984540054, degrees_of_freedom
    return z + (z**3 + z) / (4 * n) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)


def per_sample_arrays(runs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """`(S, N)` arrays of the runs' per-sample counts and IoU (an empty union counts as IoU 1, as in the metrics)."""
    intersection = np.array([run["samples"]["intersection"] for run in runs], dtype=np.float64)
    union = np.array([run["samples"]["union"] for run in runs], dtype=np.float64)
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    return {"intersection": intersection, "union": union, "iou": iou}


def _seed_metrics(arrays: dict[str, np.ndarray], has_distractor: np.ndarray) -> dict[str, np.ndarray]:
    """The paired metrics of each seed, `(S,)` each."""
    iou = arrays["iou"]
    return {
        "mIoU": iou.mean(axis=1),
        "oIoU": arrays["intersection"].sum(axis=1) / arrays["union"].sum(axis=1),
        "Pr@0.9": (iou >= 0.9).mean(axis=1),
        "distractor_mIoU": iou[:, has_distractor].mean(axis=1) if has_distractor.any() else np.full(len(iou), np.nan),
    }


def paired_comparison(
    runs: list[dict[str, Any]],
    reference_runs: list[dict[str, Any]],
    has_distractor: "np.ndarray | list[bool]",
    num_resamples: int = 2000,
    smallest_effect: float = 0.005,
    seed: int = 0,
) -> dict[str, Any] | None:
    """
    A variant minus a reference (e.g. the base), paired by seed and by test sample; see the module docstring.

    Args:
        runs, reference_runs (`list[dict]`): Finished runs with per-sample `samples` counts over one test split.
        has_distractor (array-like of bool, `(N,)`): The samples of the same-class-distractor subset.
        num_resamples (`int`): Bootstrap resamples.
        smallest_effect (`float`): The smallest difference of interest, as a fraction (0.005 = 0.5 points).
        seed (`int`): Seed of the resampling, so that the intervals are reproducible.

    Returns:
        `dict` with `seeds` and, per metric (`mIoU`, `oIoU`, `Pr@0.9`, `distractor_mIoU`; `None` for an empty
        subset): `per_seed`, `mean`, `std`, `seeds_agree`, `pooled`, `bootstrap_95`, `bootstrap_se`, `combined_95`
        (`None` for one seed) and `verdict`. `None` where the two share no seed.
    """
    by_seed = {run["seed"]: run for run in runs}
    reference_by_seed = {run["seed"]: run for run in reference_runs}
    seeds = sorted(set(by_seed) & set(reference_by_seed))
    if not seeds:
        return None
    ours = per_sample_arrays([by_seed[s] for s in seeds])
    theirs = per_sample_arrays([reference_by_seed[s] for s in seeds])
    has_distractor = np.asarray(has_distractor, dtype=bool)
    num_samples = ours["iou"].shape[1]
    if theirs["iou"].shape[1] != num_samples or len(has_distractor) != num_samples:
        raise ValueError(
            f"Runs must cover one test split: {num_samples} and {theirs['iou'].shape[1]} samples, "
            f"{len(has_distractor)} distractor flags."
        )
    our_seed_metrics, their_seed_metrics = _seed_metrics(ours, has_distractor), _seed_metrics(theirs, has_distractor)
    per_seed = {key: our_seed_metrics[key] - their_seed_metrics[key] for key in our_seed_metrics}

    def pooled(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per sample, averaged over the seeds: IoU, hit at 0.9, and the counts (their ratio is the pooled oIoU)."""
        return {
            "iou": arrays["iou"].mean(axis=0), "hit": (arrays["iou"] >= 0.9).mean(axis=0),
            "intersection": arrays["intersection"].mean(axis=0), "union": arrays["union"].mean(axis=0),
        }

    a, b = pooled(ours), pooled(theirs)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, num_samples, size=(num_resamples, num_samples))
    subset = np.flatnonzero(has_distractor)
    subset_indices = subset[rng.integers(0, len(subset), size=(num_resamples, len(subset)))] if len(subset) else None

    def ratio(pool: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        return pool["intersection"][rows].sum(axis=-1) / np.maximum(pool["union"][rows].sum(axis=-1), 1e-12)

    everything = np.arange(num_samples)
    statistic = {
        "mIoU": lambda rows: a["iou"][rows].mean(axis=-1) - b["iou"][rows].mean(axis=-1),
        "oIoU": lambda rows: ratio(a, rows) - ratio(b, rows),
        "Pr@0.9": lambda rows: a["hit"][rows].mean(axis=-1) - b["hit"][rows].mean(axis=-1),
        "distractor_mIoU": lambda rows: a["iou"][rows].mean(axis=-1) - b["iou"][rows].mean(axis=-1),
    }
    comparison: dict[str, Any] = {"seeds": seeds}
    for key, difference in statistic.items():
        if key == "distractor_mIoU":
            if subset_indices is None:
                comparison[key] = None
                continue
            point, resampled = float(difference(subset)), difference(subset_indices)
        else:
            point, resampled = float(difference(everything)), difference(indices)
        deltas = per_seed[key].tolist()
        mean = statistics.fmean(deltas)
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        standard_error = float(resampled.std(ddof=1))
        combined = None
        if len(deltas) > 1:
            half_width = t_quantile_975(len(deltas) - 1) * math.sqrt(std**2 / len(deltas) + standard_error**2)
            combined = [mean - half_width, mean + half_width]
        entry = {
            "per_seed": deltas,
            "mean": mean,
            "std": std,
            "seeds_agree": all(delta > 0 for delta in deltas) or all(delta < 0 for delta in deltas),
            "pooled": point,
            "bootstrap_95": np.percentile(resampled, [2.5, 97.5]).tolist(),
            "bootstrap_se": standard_error,
            "combined_95": combined,
        }
        entry["verdict"] = verdict(entry, smallest_effect)
        comparison[key] = entry
    return comparison


def verdict(entry: dict[str, Any], smallest_effect: float) -> str:
    """The decision rule fixed before the study: on `combined_95` (the bootstrap interval for one seed)."""
    low, high = entry["combined_95"] or entry["bootstrap_95"]
    if low > 0 and all(delta > 0 for delta in entry["per_seed"]):
        return "helps"
    if high < 0 and all(delta < 0 for delta in entry["per_seed"]):
        return "hurts"
    if -smallest_effect < low and high < smallest_effect:
        return "no effect"
    return "inconclusive"


def reliability_block(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How the reliability figure and the score rank the answers of each seed's model; means over seeds."""
    from crobim_u.metrics import kept_mean_iou, rank_answers

    ranked = {}
    for run in runs:
        samples = run["samples"]
        if "reliability" not in samples:
            continue
        iou = per_sample_arrays([run])["iou"][0]
        ranked[run["seed"]] = rank_answers(iou, samples["reliability"], samples["score"])
        # The ceiling of any signal: the 20% with the lowest IoU set aside.
        ranked[run["seed"]]["mIoU_kept_80_oracle"] = kept_mean_iou(iou, iou, 20 * len(iou) // 100)
    if not ranked:
        return None
    first = next(iter(ranked.values()))
    block: dict[str, Any] = {key: statistics.fmean(r[key] for r in ranked.values()) for key in RELIABILITY_KEYS}
    block["std"] = {
        key: statistics.stdev(r[key] for r in ranked.values()) if len(ranked) > 1 else 0.0 for key in RELIABILITY_KEYS
    }
    block["seeds"] = sorted(ranked)
    block["set_aside"] = first["set_aside"]
    for curve in ("curve_reliability", "curve_score"):
        block[curve] = np.mean([r[curve] for r in ranked.values()], axis=0).tolist()
    block["per_seed"] = {
        str(seed): {key: r[key] for key in RELIABILITY_KEYS} for seed, r in ranked.items()
    }
    return block


# --- tables and figures -------------------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    """Markdown: mean ± std over seeds, in percent (AURC in percent of pixels; AUROC as a fraction)."""
    header = "| variant | " + " | ".join(TABLE_KEYS) + " |"
    lines = [header, "|---|" + "---:|" * len(TABLE_KEYS)]
    for variant, entry in results["variants"].items():
        cells = []
        for key in TABLE_KEYS:
            if key not in entry["summary"]:
                cells.append("–")
                continue
            mean, std = entry["summary"][key]["mean"], entry["summary"][key]["std"]
            cells.append(f"{mean:.3f} ± {std:.3f}" if key == "auroc" else f"{100 * mean:.2f} ± {100 * std:.2f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _points(value: float) -> str:
    return f"{100 * value:+.2f}".replace("-", "−")


def format_paired_table(results: dict[str, Any], against: str = "base") -> str:
    """Markdown: each variant minus `against`, in points: mIoU per seed, then every metric's mean difference with
    its combined 95% interval (the bootstrap's for one seed), and the verdict on mIoU. Empty without comparisons."""
    key = f"against_{against}"
    rows = [(variant, entry[key]) for variant, entry in results["variants"].items() if entry.get(key)]
    if not rows:
        return ""
    headings = " | ".join(f"Δ{heading} [95%]" for _, heading in PAIRED_KEYS)
    lines = [f"| variant | ΔmIoU by seed | {headings} | verdict (mIoU) |", "|---|---:|" + "---:|" * len(PAIRED_KEYS) + "---|"]
    for variant, comparison in rows:
        cells = [" / ".join(_points(delta) for delta in comparison["mIoU"]["per_seed"])]
        for metric, _ in PAIRED_KEYS:
            entry = comparison[metric]
            if entry is None:
                cells.append("–")
                continue
            low, high = entry["combined_95"] or entry["bootstrap_95"]
            cells.append(f"{_points(entry['mean'])} [{_points(low)}, {_points(high)}]")
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {comparison['mIoU']['verdict']} |")
    return "\n".join(lines)


def format_reliability_table(results: dict[str, Any]) -> str:
    """Markdown: per variant with RUS, Spearman with IoU of reliability and score, and mIoU of the 80% kept by each."""
    rows = [(variant, entry["reliability"]) for variant, entry in results["variants"].items() if entry.get("reliability")]
    if not rows:
        return ""
    lines = [
        "| variant | Spearman: reliability | Spearman: score | mIoU, all | mIoU, 80% most reliable | mIoU, 80% by score "
        "| mIoU, 80% best (ceiling) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, block in rows:
        # A constant signal or IoU (e.g. a model that finds nothing) has no rank correlation: NaN, shown as a dash.
        correlations = [
            "–" if math.isnan(block[key]) else f"{block[key]:+.3f}".replace("-", "−")
            for key in ("spearman_reliability", "spearman_score")
        ]
        lines.append(
            f"| {variant} | {correlations[0]} | {correlations[1]} | {100 * block['mIoU_all']:.2f} | "
            f"{100 * block['mIoU_kept_80']:.2f} | {100 * block['mIoU_kept_80_score']:.2f} | "
            f"{100 * block['mIoU_kept_80_oracle']:.2f} |"
        )
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> bool:
    """Replaces the text between the ablation markers of `path`; returns False where the file has no markers."""
    if not path.is_file():
        return False
    content = path.read_text(encoding="utf-8")
    start, end = (content.find(marker) for marker in MARKERS)
    if start < 0 or end < start:
        return False
    path.write_text(content[: start + len(MARKERS[0])] + "\n" + text + "\n" + content[end:], encoding="utf-8")
    return True


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_risk_coverage(results: dict[str, Any], path: str) -> bool:
    """Mean risk–coverage curve per variant with RUS (matplotlib, if installed)."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for variant, entry in results["variants"].items():
        curves = [run["risk_coverage"] for run in entry["runs"] if "risk_coverage" in run]
        if not curves:
            continue
        risk = np.mean([curve["risk"] for curve in curves], axis=0)
        aurc = entry["summary"]["aurc"]["mean"]
        axis.plot(curves[0]["coverage"], 100 * risk, label=f"{variant} (AURC {100 * aurc:.2f}%)")
    axis.set_xlabel("coverage (share of pixels kept, most uncertain dropped first)")
    axis.set_ylabel("risk: error rate of kept pixels (%)")
    axis.set_title("Risk–coverage on the synthetic test split (mean over seeds)", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_selective(results: dict[str, Any], path: str) -> bool:
    """mIoU of the answers kept against the share set aside, by reliability (solid) and by score (dashed)."""
    plt = _pyplot()
    blocks = [(variant, entry["reliability"]) for variant, entry in results["variants"].items() if entry.get("reliability")]
    if plt is None or not blocks:
        return False
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for index, (variant, block) in enumerate(blocks):
        color = f"C{index}"
        set_aside = 100 * np.asarray(block["set_aside"])
        axis.plot(set_aside, 100 * np.asarray(block["curve_reliability"]), color=color, label=f"{variant}: reliability")
        axis.plot(set_aside, 100 * np.asarray(block["curve_score"]), color=color, linestyle="--", label=f"{variant}: score")
    axis.set_xlabel("answers set aside, least reliable first (%)")
    axis.set_ylabel("mIoU of the answers kept (%)")
    axis.set_title("Selective prediction on the synthetic test split (mean over seeds)", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _scaled(values):
    return values / max(float(values.max()), 1e-6)


def draw_examples(model_dirs: dict[str, str], data_dir: str, path: str, num_examples: int = 4) -> None:
    """Per test case: image, ground truth, then prediction and uncertainty of each saved model, side by side."""
    import torch
    from datasets import load_from_disk
    from PIL import Image, ImageDraw

    from crobim_u import CrobimUForReferringSegmentation, CrobimUProcessor
    from crobim_u.inference.visualize import draw_mask, heatmap

    test = load_from_disk(data_dir)["test"]
    # Cases with a same-class distractor: where reading the expression matters (the first ones if too few).
    indices = [index for index, flag in enumerate(test["has_distractor"]) if flag][:num_examples]
    indices += [index for index in range(len(test)) if index not in indices][: num_examples - len(indices)]
    rows = test.select(indices)
    columns: list[tuple[str, list[Image.Image]]] = [
        ("image", [row["image"].convert("RGB") for row in rows]),
        ("ground truth", [draw_mask(row["image"].convert("RGB"), np.asarray(row["mask"]) > 0, (0, 200, 0)) for row in rows]),
    ]
    for name, folder in model_dirs.items():
        model = CrobimUForReferringSegmentation.from_pretrained(folder).eval()
        processor = CrobimUProcessor.from_pretrained(folder)
        inputs = processor(images=list(rows["image"]), text=list(rows["expression"]))
        sizes = inputs.pop("original_sizes")
        with torch.no_grad():
            outputs = model(**inputs)
        results = processor.post_process_referring_segmentation(outputs, target_sizes=sizes)
        columns.append(
            (f"{name}: prediction", [draw_mask(row["image"].convert("RGB"), r["mask"].numpy(), (220, 0, 0)) for row, r in zip(rows, results)])
        )
        if results[0]["uncertainty"] is not None:
            # Scaled to each map's maximum: the uncertainty of a trained model is small almost everywhere.
            columns.append(
                (f"{name}: uncertainty / max", [heatmap(_scaled(r["uncertainty"].numpy())) for r in results])
            )
    side, caption = max(rows[0]["image"].width, 192), 14  # small scenes are enlarged so the captions fit
    sheet = Image.new("RGB", (side * len(columns), (side + 2 * caption) * len(rows) + caption), "white")
    paint = ImageDraw.Draw(sheet)
    for column_index, (title, pictures) in enumerate(columns):
        paint.text((column_index * side + 2, 1), title, fill="black")
        for row_index, picture in enumerate(pictures):
            top = caption + row_index * (side + 2 * caption)
            if column_index == 0:
                paint.text((2, top + 1), rows[row_index]["expression"], fill="black")
            sheet.paste(picture.resize((side, side), Image.NEAREST), (column_index * side, top + caption))
    sheet.save(path)


# --- the study ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from crobim_u.demo import DemoRecipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(STUDY),
        help=f"default: the study ({', '.join(STUDY)}); decide first with {' '.join(FIRST)}; alternatives of the "
        f"full model: {', '.join(ALTERNATIVES)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated data, the demo's by default")
    parser.add_argument("--difficulty", default=DemoRecipe.difficulty)
    parser.add_argument("--image-size", type=int, default=DemoRecipe.image_size)
    parser.add_argument("--num-train", type=int, default=DemoRecipe.num_train, help="training expressions")
    parser.add_argument("--num-test", type=int, default=1000, help="test scenes, one expression each")
    parser.add_argument("--max-steps", type=int, default=DemoRecipe.max_steps)
    parser.add_argument("--batch-size", type=int, default=DemoRecipe.batch_size, help="expressions per step")
    parser.add_argument("--expressions-per-image", type=int, default=DemoRecipe.expressions_per_image)
    parser.add_argument("--relational-share", type=float, default=DemoRecipe.relational_share)
    parser.add_argument("--learning-rate", type=float, default=DemoRecipe.learning_rate)
    parser.add_argument(
        "--model-overrides", default="{}",
        help="JSON of config fields applied to every variant over the demo's model (DEMO_MODEL_OVERRIDES)",
    )
    parser.add_argument("--text-encoder", choices=("auto", "minilm", "scratch"), default="auto")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    parser.add_argument(
        "--smallest-effect", type=float, default=0.005,
        help="smallest difference of interest of the verdicts, as a fraction (0.005 = 0.5 points)",
    )
    parser.add_argument(
        "--work-dir", default="outputs/ablation",
        help="data, figure models and the journal of finished runs (a restart skips them); '' for a temporary folder",
    )
    parser.add_argument(
        "--output", help=f"results file (default: {DEFAULT_OUTPUT.relative_to(REPO)}; with --quick: {QUICK_OUTPUT})"
    )
    parser.add_argument("--no-tables", dest="tables", action="store_false", help="leave BENCHMARKS.md and model_card.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: base and full, one seed, 64 px, 6 steps")
    parser.add_argument(
        "--tables-from", metavar="JSON", help="write the tables of an earlier run's results file, train nothing"
    )
    return parser


def read_journal(journal: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The finished runs of a work folder; a line cut by a kill is not valid JSON, and that run is trained again."""
    finished = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            if line.strip():
                try:
                    run = json.loads(line)
                except json.JSONDecodeError:
                    continue
                finished[(run["variant"], run["seed"])] = run
    return finished


def prepare_work_folder(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Path]:
    """The work folder of these settings under `root` (created, with the generated data): its data folder, models
    folder and journal. It keeps the data, every run's model and the journal of finished runs, so that an interrupted
    study restarted with the same settings trains only what is missing."""
    from datasets import DatasetDict

    from crobim_u.demo import load_demo_splits

    settings = {key: value for key, value in vars(args).items() if key in RUN_SETTINGS}
    settings["journal_format"] = JOURNAL_FORMAT
    fingerprint = json.dumps(settings, sort_keys=True)
    work_dir = root / hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    data_dir, models_dir, journal = work_dir / "data", work_dir / "models", work_dir / "runs.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "settings.json").write_text(fingerprint)
    if not (data_dir / "dataset_dict.json").is_file():
        train, test = load_demo_splits(build_recipe(args, "full"), seed=args.data_seed)
        DatasetDict(train=train, test=test).save_to_disk(str(data_dir))
    return data_dir, models_dir, journal


def train_missing_runs(
    args: argparse.Namespace, finished: dict[tuple[str, int], dict[str, Any]], data_dir: Path, models_dir: Path,
    journal: Path,
) -> None:
    """Trains the (variant, seed) runs the journal lacks, `--jobs` at a time, journaling each as it finishes (so
    that a kill loses only the runs in progress)."""
    jobs = [
        {
            "variant": variant, "seed": seed, "args": vars(args), "data_dir": str(data_dir),
            "models_dir": str(models_dir), "threads": args.threads,
        }
        for seed in args.seeds
        for variant in args.variants
        if (variant, seed) not in finished
    ]
    # The study's runs first, seed by seed, then the alternatives': a study cut short still has whole seeds.
    jobs.sort(key=lambda job: job["variant"] not in STUDY)
    print(f"{len(args.variants)} variants x {len(args.seeds)} seeds: {len(jobs)} runs to train, {args.jobs} at a time "
          f"({args.threads} thread(s) each), {len(finished)} already in {journal}", flush=True)
    if not jobs:
        return
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_one, job) for job in jobs]):
            run = future.result()
            print(f"{run['variant']:>24} seed {run['seed']}: mIoU {run['mIoU']:.4f} oIoU {run['oIoU']:.4f} "
                  f"Pr@0.9 {run['Pr@0.9']:.4f}" + (f" AUROC {run['auroc']:.4f}" if "auroc" in run else "")
                  + f" ({run['train_seconds']:.0f} s training, {run['score_seconds']:.0f} s scoring)", flush=True)
            with open(journal, "a", encoding="utf-8") as file:
                file.write(json.dumps(run) + "\n")
            finished[(run["variant"], run["seed"])] = run


def draw_figures(
    results: dict[str, Any], args: argparse.Namespace, stem: Path, data_dir: Path, models_dir: Path
) -> dict[str, str]:
    """The risk-coverage, selective-prediction and example figures beside the results; their file names by kind."""
    figures = {
        "risk_coverage": f"{stem}_risk_coverage.png", "selective": f"{stem}_selective.png",
        "examples": f"{stem}_examples.png",
    }
    if not plot_risk_coverage(results, figures["risk_coverage"]):
        figures.pop("risk_coverage")
    if not plot_selective(results, figures["selective"]):
        figures.pop("selective")
    first_seed_models = {variant: model_folder(models_dir, variant, args.seeds[0]) for variant in ("base", "full")}
    drawn = {
        variant: str(folder) for variant, folder in first_seed_models.items()
        if variant in args.variants and (folder / "config.json").is_file()
    }
    if drawn:
        draw_examples(drawn, str(data_dir), figures["examples"])
    else:
        figures.pop("examples")
    return {name: os.path.basename(path) for name, path in figures.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.tables_from:
        results = json.loads(Path(args.tables_from).read_text())
        write_tables(results)
        print(format_tables(results))
        return results
    if args.quick:
        args.variants, args.seeds = ["base", "full"], args.seeds[:1]
        args.image_size, args.num_train, args.num_test, args.max_steps, args.batch_size = 64, 24, 12, 6, 4
        args.bootstrap, args.tables = 200, False
    args.output = args.output or (QUICK_OUTPUT if args.quick else str(DEFAULT_OUTPUT))
    if args.batch_size % args.expressions_per_image or args.num_train % args.expressions_per_image:
        raise SystemExit(
            f"error: --batch-size ({args.batch_size}) and --num-train ({args.num_train}) must be multiples of "
            f"--expressions-per-image ({args.expressions_per_image})."
        )
    from datasets import load_from_disk

    from crobim_u.demo import DEMO_MODEL_OVERRIDES

    started = time.time()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = None if args.work_dir else tempfile.TemporaryDirectory(prefix="crobim-u-ablation-")
    data_dir, models_dir, journal = prepare_work_folder(args, Path(args.work_dir or scratch.name))
    finished = read_journal(journal)
    train_missing_runs(args, finished, data_dir, models_dir, journal)
    refresh_stale_reliability(args, finished, data_dir, models_dir, journal)

    has_distractor = np.asarray(load_from_disk(str(data_dir))["test"]["has_distractor"], dtype=bool)
    results = collect_results(args, finished, has_distractor, argv)
    results["demo_model_overrides"] = DEMO_MODEL_OVERRIDES
    stem = output.with_suffix("")
    results["figures"] = draw_figures(results, args, stem, data_dir, models_dir)
    # Per-sample data in a file of its own (one line, large), the results file stays readable.
    samples_path = Path(f"{stem}_samples.json")
    samples = {
        "has_distractor": has_distractor.tolist(),
        "runs": {
            variant: {str(seed): finished[(variant, seed)]["samples"] for seed in args.seeds}
            for variant in args.variants
        },
    }
    samples_path.write_text(json.dumps(samples))
    results["samples_file"] = samples_path.name
    results["wall_seconds"] = round(time.time() - started, 1)
    # A study resumed over several calls: what its runs cost in all, whichever call trained them.
    runs = [run for variant in results["variants"].values() for run in variant["runs"]]
    results["run_seconds"] = round(sum(run["train_seconds"] + run["score_seconds"] for run in runs), 1)
    if scratch is not None:
        scratch.cleanup()

    output.write_text(json.dumps(results, indent=2))
    print(format_tables(results))
    print(f"wrote {output}, {samples_path.name} and {', '.join(results['figures'].values())}; "
          f"{results['wall_seconds']:.0f} s in all")
    if args.tables:
        write_tables(results)
    return results


def collect_results(
    args: argparse.Namespace,
    finished: dict[tuple[str, int], dict[str, Any]],
    has_distractor: np.ndarray,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """The results file's content from the finished runs: per variant its runs (without per-sample data), summary,
    paired comparisons and reliability block."""
    results: dict[str, Any] = {
        # What reproduces the numbers (whether the tables were written does not change them).
        "command": "python benchmarks/ablation.py "
        + " ".join(arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--no-tables"),
        "recipe": {key: value for key, value in asdict(build_recipe(args, "full")).items() if key != "model_overrides"},
        "common_overrides": json.loads(args.model_overrides),
        "text_encoder": resolved_text_encoder(args.text_encoder),
        "data_seed": args.data_seed,
        "seeds": args.seeds,
        "num_test": len(has_distractor),
        "num_test_with_distractor": int(has_distractor.sum()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jobs": args.jobs, "threads": args.threads},
        "statistics": {
            "bootstrap_resamples": args.bootstrap,
            "smallest_effect": args.smallest_effect,
            "pooling": "seeds pooled per test sample (IoU, hit at 0.9 and counts averaged over the shared seeds), "
            "then one paired resample of the test samples for both variants; oIoU recomputed as a ratio per resample; "
            "the distractor subset resampled within itself",
            "combined_95": "mean per-seed difference ± t(0.975, S-1) * sqrt(sd_seeds^2 / S + SE_bootstrap^2)",
            "verdict": "helps: interval above 0 and every seed above 0; hurts: the mirror; no effect: interval within "
            "±smallest_effect; else inconclusive (combined interval; the bootstrap's with one seed)",
        },
        "variants": {},
    }
    runs_of = {
        variant: [finished[(variant, seed)] for seed in args.seeds if (variant, seed) in finished]
        for variant in {*args.variants, "base", "full"}
    }
    for variant in args.variants:
        variant_runs = runs_of[variant]
        entry: dict[str, Any] = {
            "switches": VARIANTS[variant],
            "runs": [{key: value for key, value in run.items() if key != "samples"} for run in variant_runs],
            "summary": summarise(variant_runs),
        }
        # The keys the issue asks for at the top level of each variant: the seeds' mean.
        for key in ("mIoU", "oIoU", "Pr@0.9", "auroc"):
            if key in entry["summary"]:
                entry[key] = entry["summary"][key]["mean"]
        references = ["base"] + (["full"] if variant.startswith("full/") else [])
        for reference in references:
            if variant != reference and runs_of[reference]:
                entry[f"against_{reference}"] = paired_comparison(
                    variant_runs, runs_of[reference], has_distractor, args.bootstrap, args.smallest_effect
                )
        block = reliability_block(variant_runs) if VARIANTS[variant]["use_rus"] else None
        if block is not None:
            entry["reliability"] = block
        results["variants"][variant] = entry
    return results


def format_tables(results: dict[str, Any]) -> str:
    """The segmentation table, then (where present) the paired table against the base and against the full model,
    and the reliability table."""
    parts = [format_table(results)]
    paired = format_paired_table(results, "base")
    if paired:
        parts.append(
            "Against the base, paired by seed and test sample (points; 95% interval for seed and sample variance "
            "combined; verdict on mIoU with a smallest effect of "
            f"{100 * results['statistics']['smallest_effect']:.1f} points):\n\n" + paired
        )
    alternatives = format_paired_table(results, "full")
    if alternatives:
        parts.append("Alternatives against the full model, paired the same way:\n\n" + alternatives)
    reliability = format_reliability_table(results)
    if reliability:
        parts.append(
            "Ranking answers: Spearman correlation with IoU, and mIoU of the answers kept when the 20% least "
            "reliable (or lowest-scoring) are set aside (mean over seeds):\n\n" + reliability
        )
    return "\n\n".join(parts)


def provenance_note(results: dict[str, Any]) -> str:
    """The line above the tables: data, recipe, seeds, the command and what the runs cost."""
    recipe, machine = results["recipe"], results["machine"]
    return (
        f"Synthetic test split ({recipe['num_test']} samples, {recipe['difficulty']}, "
        f"{recipe['image_size']}x{recipe['image_size']}); "
        f"{'the demo' + chr(39) + 's model and recipe; ' if 'demo_model_overrides' in results else ''}text encoder "
        f"{results['text_encoder']}; mean ± std over seeds {results['seeds']}; {recipe['max_steps']} steps of batch "
        f"{recipe['batch_size']} per run; percent except AUROC. Command: `{results['command'].strip()}` "
        f"({results['run_seconds'] / 3600:.1f} h of training and scoring in all, {machine['jobs']} runs at a time of "
        f"{machine['threads']} thread(s) on {machine['cpus']} CPU cores)."
    )


def write_tables(results: dict[str, Any]) -> None:
    """Writes the tables with their provenance between the ablation markers of BENCHMARKS.md and model_card.md."""
    for name in ("BENCHMARKS.md", "model_card.md", "crobim_u/templates/model_card.md"):
        if not write_between_markers(REPO / name, provenance_note(results) + "\n\n" + format_tables(results)):
            print(f"{name}: no ablation markers, table not written")


if __name__ == "__main__":
    main()
