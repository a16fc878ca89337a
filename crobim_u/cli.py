"""The `crobim-u` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on a data set split (Pr@0.5-0.9, oIoU, mIoU; with RUS also how reliability ranks answers)",
        description="Scores a saved model on a referring-segmentation split and prints the table papers print.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="refsegrs, rrsisd, risbench, folder or synthetic")
    parser.add_argument("--data_dir", help="data set folder (all but synthetic)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="score only the first N samples")
    parser.add_argument("--size", type=int, help="score at a fixed square resolution (e.g. 480) instead of the original")
    parser.add_argument("--strict", action="store_true", help="Pr@X counts IoU > X instead of IoU >= X")
    parser.add_argument("--uncertainty-metrics", "--uncertainty_metrics", dest="uncertainty_metrics",
                        action="store_true", help="also AUROC/AURC/ECE of the uncertainty map")
    parser.add_argument("--output", help="JSON file for the results (default: <model>/eval_<dataset>_<split>.json)")
    parser.add_argument("--device",
                        help="torch device (default: the process's accelerate device: cuda:<local rank> where CUDA is "
                             "available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="precision of the forward passes (torch.autocast; metrics are computed in float32): "
                             "float32 (default), bfloat16 (CPU or GPU) or float16 (GPU only)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
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
    output = args.output or os.path.join(args.model, f"eval_{args.dataset}_{args.split}.json")
    record = {"model": args.model, "dataset": args.dataset, "split": args.split, "resolution": resolution,
              "strict": args.strict, "dtype": args.dtype, **results}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as file:
        json.dump(record, file, indent=2)
    print(f"wrote {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crobim-u", description="CroBIM-U referring segmentation for remote-sensing images."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_evaluate_parser(subparsers)
    from .training.run import add_train_parser
    add_train_parser(subparsers)
    from .data.check import add_check_data_parser
    add_check_data_parser(subparsers)
    from .demo import add_demo_parser
    add_demo_parser(subparsers)
    from .inference.predict import add_predict_parser
    add_predict_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
