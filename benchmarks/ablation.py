"""Does uncertainty help? Trains the CroBIM base and the CroBIM-U variants with one budget, one data set and the same
seeds on the synthetic benchmark, and scores segmentation and the quality of the uncertainty map.

    python benchmarks/ablation.py                   # the study: 5 variants x 3 seeds (71 min on 2 cores)
    python benchmarks/ablation.py --quick           # smoke run: 2 variants x 1 seed, a few steps (< 1 min)
    python benchmarks/ablation.py --variants base full --seeds 0 --max-steps 200 --output /tmp/a.json

Variants (the switches of `CrobimUConfig`):

| variant       | use_rus | use_ugf | use_udlr |
|---------------|---------|---------|----------|
| base          | -       | -       | -        |
| base+RUS      | x       | -       | -        |
| base+RUS+UGF  | x       | x       | -        |
| base+RUS+UDLR | x       | -       | x        |
| full          | x       | x       | x        |

and, with `--variants`, the full model with one alternative of the config each: `full/detach`
(`detach_uncertainty`), `full/hard-target` (`uncertainty_target="hard"`), `full/max-pooling`
(`uncertainty_pooling="max"`), `full/gate-bias-0` (`ugf_gate_bias_init=0`, UGF gates half open from the start).
Runs of one data/training setting share a work folder, so the alternatives can be trained later and a final call
with every variant gathers them into one results file without training again.

Every run trains the `tiny` preset with the demo's trainer (`crobim_u.demo.train_on_synthetic`) on the same
generated training split; seed `s` sets the initialisation and the batch order, so variant differences at one seed
come from the modules alone. Runs go to `--jobs` worker processes (one torch thread each, so two jobs fill two
cores). Each model is scored on the test split (oIoU, mIoU, Pr@0.5-0.9; with RUS also pixel AUROC of the
uncertainty for the model's own errors, AURC of the risk-coverage curve, and ECE of the mask probabilities) and on
its same-class-distractor subset.

Writes `--output` (default `benchmarks/results/ablation.json`: per variant every seed's metrics, their mean and
std), `ablation_risk_coverage.png` and `ablation_examples.png` beside it, and, unless `--no-tables`, the table
between the `ablation` markers of BENCHMARKS.md and model_card.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, bool]] = {
    "base": {"use_rus": False, "use_ugf": False, "use_udlr": False},
    "base+RUS": {"use_rus": True, "use_ugf": False, "use_udlr": False},
    "base+RUS+UGF": {"use_rus": True, "use_ugf": True, "use_udlr": False},
    "base+RUS+UDLR": {"use_rus": True, "use_ugf": False, "use_udlr": True},
    "full": {"use_rus": True, "use_ugf": True, "use_udlr": True},
}
STUDY = tuple(VARIANTS)
# The full model with one of the config's alternatives: what to try where it is not ahead of the base.
ALTERNATIVES: dict[str, dict[str, Any]] = {
    "full/detach": {"detach_uncertainty": True},
    "full/hard-target": {"uncertainty_target": "hard"},
    "full/max-pooling": {"uncertainty_pooling": "max"},
    "full/gate-bias-0": {"ugf_gate_bias_init": 0.0},
}
VARIANTS.update({name: {**VARIANTS["full"], **changes} for name, changes in ALTERNATIVES.items()})
SEGMENTATION_KEYS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU")
UNCERTAINTY_KEYS = ("auroc", "aurc", "ece")
TABLE_KEYS = (*SEGMENTATION_KEYS, "auroc", "aurc")
# The arguments that change what a run computes: a work folder holds the runs of one combination of them.
RUN_SETTINGS = (
    "data_seed", "difficulty", "image_size", "num_train", "num_test", "max_steps", "batch_size", "learning_rate",
    "model_overrides", "text_encoder",
)
MARKERS = ("<!-- ablation:start -->", "<!-- ablation:end -->")
CURVE_POINTS = 101


def build_recipe(args: argparse.Namespace, variant: str):
    from crobim_u.demo import DemoRecipe

    overrides = dict(VARIANTS[variant])
    overrides.update(json.loads(args.model_overrides))
    return DemoRecipe(
        image_size=args.image_size, difficulty=args.difficulty, num_train=args.num_train, num_test=args.num_test,
        max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        expressions_per_image=1,  # the study's scenes carry one expression each
        warmup_steps=min(30, max(1, args.max_steps // 10)), uncertainty_warmup_steps=max(1, args.max_steps // 15),
        model_overrides=overrides,
    )


def resolved_text_encoder(choice: str) -> str:
    """What `auto` means on this machine: the frozen pretrained MiniLM where installed, else a scratch BERT."""
    from crobim_u.demo import minilm_path

    return choice if choice != "auto" else ("minilm (frozen)" if minilm_path() else "scratch")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Trains and scores one (variant, seed) in this worker process."""
    import numpy as np
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
    scores = score_with_distractor_subset(
        model, processor, data["test"], uncertainty_metrics=model.config.use_rus, progress=False
    )
    result = {
        "variant": job["variant"],
        "seed": job["seed"],
        "train_seconds": round(train_seconds, 1),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
        **{key: scores[key] for key in SEGMENTATION_KEYS},
        "with_distractor": {key: scores["with_distractor"][key] for key in SEGMENTATION_KEYS},
    }
    if model.config.use_rus:
        result.update({key: scores[key] for key in UNCERTAINTY_KEYS})
        coverage, risk = scores["risk_coverage"]
        # Resampled at fixed coverages so that seeds average point by point.
        grid = np.linspace(1.0, 0.0, CURVE_POINTS)
        order = np.argsort(coverage)
        result["risk_coverage"] = {
            "coverage": grid.tolist(), "risk": np.interp(grid, coverage[order], risk[order]).tolist()
        }
    if job["save_model"]:
        folder = os.path.join(job["models_dir"], f"{job['variant']}-seed{job['seed']}")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return result


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


def plot_risk_coverage(results: dict[str, Any], path: str) -> bool:
    """Mean risk–coverage curve per variant with RUS (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

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


def _scaled(values):
    return values / max(float(values.max()), 1e-6)


def draw_examples(model_dirs: dict[str, str], data_dir: str, path: str, num_examples: int = 4) -> None:
    """Per test case: image, ground truth, then prediction and uncertainty of each saved model, side by side."""
    import numpy as np
    import torch
    from datasets import load_from_disk
    from PIL import Image, ImageDraw

    from crobim_u import CrobimUForReferringSegmentation, CrobimUProcessor
    from crobim_u.inference.visualize import draw_mask, heatmap

    test = load_from_disk(data_dir)["test"]
    # Cases with a same-class distractor: where reading the expression matters.
    indices = [index for index, flag in enumerate(test["has_distractor"]) if flag][:num_examples]
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(STUDY),
        help=f"default: the study ({', '.join(STUDY)}); alternatives of the full model: {', '.join(ALTERNATIVES)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=1000, help="seed of the generated data (same for every run)")
    parser.add_argument("--difficulty", default="easy", help="at medium the base stays near 0.06 mIoU at this budget")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--model-overrides", default="{}", help="JSON of config fields applied to every variant")
    parser.add_argument("--text-encoder", choices=("auto", "minilm", "scratch"), default="auto")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--work-dir", default="outputs/ablation",
        help="data, figure models and the journal of finished runs (a restart skips them); '' for a temporary folder",
    )
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "ablation.json"))
    parser.add_argument("--no-tables", dest="tables", action="store_false", help="leave BENCHMARKS.md and model_card.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: base and full, one seed, 64 px, 6 steps")
    parser.add_argument(
        "--tables-from", metavar="JSON", help="write the tables of an earlier run's results file, train nothing"
    )
    args = parser.parse_args(argv)
    if args.tables_from:
        results = json.loads(Path(args.tables_from).read_text())
        write_tables(results)
        print(format_table(results))
        return results
    if args.quick:
        args.variants, args.seeds = ["base", "full"], args.seeds[:1]
        args.image_size, args.num_train, args.num_test, args.max_steps, args.batch_size = 64, 24, 8, 6, 4
        args.tables = False

    from datasets import DatasetDict

    from crobim_u.data.synthetic import load_synthetic

    started = time.time()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The work folder keeps the data, the models drawn in the figure and a journal of finished runs, so that an
    # interrupted study restarted with the same settings trains only what is missing.
    scratch = None if args.work_dir else tempfile.TemporaryDirectory(prefix="crobim-u-ablation-")
    work_dir = Path(args.work_dir or scratch.name)
    settings = {key: value for key, value in vars(args).items() if key in RUN_SETTINGS}
    fingerprint = json.dumps(settings, sort_keys=True)
    work_dir = work_dir / hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    data_dir, models_dir, journal = work_dir / "data", work_dir / "models", work_dir / "runs.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "settings.json").write_text(fingerprint)
    if not (data_dir / "dataset_dict.json").is_file():
        data = load_synthetic(
            num_train=args.num_train, num_validation=0, num_test=args.num_test, image_size=args.image_size,
            difficulty=args.difficulty, seed=args.data_seed,
        )
        DatasetDict(train=data["train"], test=data["test"]).save_to_disk(str(data_dir))
    finished = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            if line.strip():  # a line cut by a kill is not valid JSON and is retrained
                try:
                    run = json.loads(line)
                except json.JSONDecodeError:
                    continue
                finished[(run["variant"], run["seed"])] = run
    figure_variants = [variant for variant in ("base", "full") if variant in args.variants]
    jobs = [
        {
            "variant": variant, "seed": seed, "args": vars(args), "data_dir": str(data_dir),
            "models_dir": str(models_dir), "threads": max(1, (os.cpu_count() or 1) // args.jobs),
            "save_model": seed == args.seeds[0] and variant in figure_variants,
        }
        for seed in args.seeds
        for variant in args.variants
        if (variant, seed) not in finished
    ]
    print(f"{len(args.variants)} variants x {len(args.seeds)} seeds: {len(jobs)} runs to train on {args.jobs} "
          f"workers, {len(finished)} already in {journal}", flush=True)
    if jobs:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for run in pool.map(run_one, jobs):
                print(f"{run['variant']:>14} seed {run['seed']}: mIoU {run['mIoU']:.4f} oIoU {run['oIoU']:.4f} "
                      f"Pr@0.9 {run['Pr@0.9']:.4f}" + (f" AUROC {run['auroc']:.4f}" if "auroc" in run else "")
                      + f" ({run['train_seconds']:.0f} s)", flush=True)
                with open(journal, "a", encoding="utf-8") as file:
                    file.write(json.dumps(run) + "\n")
                finished[(run["variant"], run["seed"])] = run
    runs = [finished[(variant, seed)] for seed in args.seeds for variant in args.variants]

    results: dict[str, Any] = {
        # What reproduces the numbers (whether the tables were written does not change them).
        "command": "python benchmarks/ablation.py "
        + " ".join(arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--no-tables"),
        "recipe": {key: value for key, value in asdict(build_recipe(args, "full")).items() if key != "model_overrides"},
        "common_overrides": json.loads(args.model_overrides),
        "text_encoder": resolved_text_encoder(args.text_encoder),
        "data_seed": args.data_seed,
        "seeds": args.seeds,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jobs": args.jobs},
        "variants": {},
    }
    for variant in args.variants:
        variant_runs = [run for run in runs if run["variant"] == variant]
        results["variants"][variant] = {
            "switches": VARIANTS[variant], "runs": variant_runs, "summary": summarise(variant_runs)
        }
        # The keys the issue asks for at the top level of each variant: the seeds' mean.
        for key in ("mIoU", "oIoU", "Pr@0.9", "auroc"):
            if key in results["variants"][variant]["summary"]:
                results["variants"][variant][key] = results["variants"][variant]["summary"][key]["mean"]
    stem = output.with_suffix("")
    figures = {"risk_coverage": f"{stem}_risk_coverage.png", "examples": f"{stem}_examples.png"}
    if not plot_risk_coverage(results, figures["risk_coverage"]):
        figures.pop("risk_coverage")
    saved = {variant: str(models_dir / f"{variant}-seed{args.seeds[0]}") for variant in figure_variants}
    draw_examples(saved, str(data_dir), figures["examples"])
    results["figures"] = {name: os.path.basename(path) for name, path in figures.items()}
    results["wall_seconds"] = round(time.time() - started, 1)
    if scratch is not None:
        scratch.cleanup()

    output.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {output} and {', '.join(figures.values())}; {results['wall_seconds']:.0f} s in all")
    if args.tables:
        write_tables(results)
    return results


def write_tables(results: dict[str, Any]) -> None:
    """Writes the table with its provenance between the ablation markers of BENCHMARKS.md and model_card.md."""
    recipe, machine = results["recipe"], results["machine"]
    note = (
        f"Synthetic test split ({recipe['num_test']} samples, {recipe['difficulty']}, "
        f"{recipe['image_size']}x{recipe['image_size']}); text encoder {results['text_encoder']}; mean ± std over "
        f"seeds {results['seeds']}; {recipe['max_steps']} steps of batch {recipe['batch_size']} per run; percent "
        f"except AUROC. Command: `{results['command'].strip()}` ({results['wall_seconds'] / 60:.0f} min on "
        f"{machine['cpus']} CPU cores, {machine['jobs']} runs at a time)."
    )
    for name in ("BENCHMARKS.md", "model_card.md"):
        if not write_between_markers(REPO / name, note + "\n\n" + format_table(results)):
            print(f"{name}: no ablation markers, table not written")


if __name__ == "__main__":
    main()
