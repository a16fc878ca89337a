"""One image, many expressions: one call with `image_indices` against one call per expression.

    python benchmarks/many_expressions.py [--preset swin-base] [--expressions 8] [--image-size 480]
                                          [--repeats 3] [--threads N] [--quick] [--output PATH]

Three ways to segment `--expressions` expressions on one image, in interleaved rounds (one untimed warm-up round,
then `--repeats` timed rounds), fp32, `torch.inference_mode`, random initialisation:

- `shared`: one call, the image once in `pixel_values` and `image_indices = [0] * n`: the image encoder runs once;
- `separate`: n calls with one image and one expression each (what a loop over a pipeline does);
- `repeated`: one call with the image repeated n times (a batch, but no sharing).

Also counts each case's FLOPs (the speed-up that sharing allows at equal efficiency) and checks that the three give
the same logits. Writes `benchmarks/results/many_expressions.json` (`--quick`: the
`tiny` preset at 64x64, into `many_expressions-quick.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from inference_speed import text_inputs  # noqa: E402

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base")
    parser.add_argument("--expressions", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--overrides", default="{}", help="config fields over the preset, as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64x64, two rounds: a smoke test")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/many_expressions[-quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.image_size, args.repeats = "tiny", 64, 2
        # One thread: on a shared 2-core machine, two threads wait on each other for every small op.
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(False)

    results = {"environment": benchlib.environment(), "settings": vars(args)}
    overrides = {"text_config": {"vocab_size": 1000}} if args.quick else {}
    overrides.update(json.loads(args.overrides))
    torch.manual_seed(0)
    model = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(args.preset, **overrides)).eval()
    n = args.expressions
    image = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    text = text_inputs(n, model.config.text_config.vocab_size)
    indices = torch.zeros(n, dtype=torch.long)

    def shared():
        return model(pixel_values=image, image_indices=indices, **text).logits

    def separate():
        return torch.cat([
            model(pixel_values=image, input_ids=text["input_ids"][i : i + 1],
                  attention_mask=text["attention_mask"][i : i + 1]).logits
            for i in range(n)
        ])

    def repeated():
        return model(pixel_values=image.expand(n, -1, -1, -1), **text).logits

    cases = {"shared": shared, "separate": separate, "repeated": repeated}
    with torch.inference_mode():
        reference = separate()
        results["max_abs_logit_difference"] = {
            name: float((cases[name]() - reference).abs().max()) for name in ("shared", "repeated")
        }
        # FLOPs per case: the speed-up that sharing allows at equal efficiency (what is left to run per expression).
        results["flops"] = {name: benchlib.count_flops(case)[0] for name, case in cases.items()}
        print(f"{results['environment']['cpu']}, {torch.get_num_threads()} threads, load {benchlib.load_average()}; "
              f"{args.preset}, {n} expressions at {args.image_size}x{args.image_size}")
        timings = benchlib.time_interleaved(cases, args.repeats, args.warmup)

    results["cases"] = {}
    for name, timing in timings.items():
        results["cases"][name] = {
            "latency_s": benchlib.summarize(timing["wall"]),
            "cpu_s": benchlib.summarize(timing["cpu"]),
            "load_average": [round(value, 2) for value in timing["load"]],
            "expressions_per_s": round(n / statistics.median(timing["wall"]), 3),
        }
        print(f"  {name:9s} {statistics.median(timing['wall']):8.3f} s  (min {min(timing['wall']):.3f}, "
              f"max {max(timing['wall']):.3f})")
    results["speedup"] = {
        "shared_over_separate": benchlib.ratio(timings["separate"]["wall"], timings["shared"]["wall"]),
        "shared_over_repeated": benchlib.ratio(timings["repeated"]["wall"], timings["shared"]["wall"]),
        "flops_separate_over_shared": round(results["flops"]["separate"] / results["flops"]["shared"], 3),
    }
    print(f"shared is {results['speedup']['shared_over_separate']['median']:.2f}x faster than separate calls, "
          f"{results['speedup']['shared_over_repeated']['median']:.2f}x faster than a repeated batch; it does "
          f"{results['speedup']['flops_separate_over_shared']:.2f}x fewer FLOPs than separate calls")
    path = benchlib.write_results("many_expressions", results, args.output, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
