"""What each lighter stride-4 setting saves: FLOPs and time of CroBIM-U's own modules per expression, at full size.

    python benchmarks/lighter_path.py [--preset swin-base] [--image-size 480] [--repeats 5] [--threads 1] [--quick]

For the papers' stride-4 path and each setting of the lighter one (`lgfa_fine_attention="upsampled"`,
`lgfa_fine_smoothing="depthwise"`, `mask_head_conv="separable"`, half the preset's `udlr_hidden_dim`), alone and all
together, runs one expression on one image with the image and text encoders' outputs cached, so that the FLOPs and
the time are those of the modules this package adds (visual projections, CAPM, LGFA, RUS, UGF, MID, UDLR). Cases run
in interleaved rounds (one untimed, then `--repeats` timed); each setting's time is compared with the papers' path
of the same round. What each setting does to the model's accuracy is measured on the demo by
`benchmarks/demo_variants.py` (the "demo, ..." variants; BENCHMARKS.md has both tables).

Writes `benchmarks/results/lighter_path.json` (`--quick`: the `tiny` preset at 64x64, into
`lighter_path-quick.json`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from inference_speed import text_inputs  # noqa: E402

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation  # noqa: E402


class Cached(torch.nn.Module):
    """Stands in for an encoder: returns its output, computed once."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def settings(preset: str) -> dict[str, dict]:
    """Setting name -> config fields over the preset."""
    half_udlr = {"udlr_hidden_dim": CrobimUConfig.from_preset(preset).udlr_hidden_dim // 2}
    lighter = {"lgfa_fine_attention": "upsampled", "lgfa_fine_smoothing": "depthwise", "mask_head_conv": "separable"}
    return {
        "papers' path": {},
        "stride-4 word context from stride 8": {"lgfa_fine_attention": "upsampled"},
        "depthwise stride-4 smoothing": {"lgfa_fine_smoothing": "depthwise"},
        "separable pixel head": {"mask_head_conv": "separable"},
        "half-width UDLR": half_udlr,
        "all four": {**lighter, **half_udlr},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base")
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64x64, two rounds: a smoke test")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/lighter_path[-quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.image_size, args.repeats = "tiny", 64, 2
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(False)

    pixel_values = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    cases, models = {}, {}
    for name, fields in settings(args.preset).items():
        torch.manual_seed(0)
        model = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(args.preset, **fields)).eval()
        text = text_inputs(1, model.config.text_config.vocab_size)
        with torch.inference_mode():
            features, words = model.backbone(pixel_values), model.text_encoder(**text)
        # The encoders' outputs, cached (and their weights freed): what is left is this package's modules.
        model.backbone, model.text_encoder = Cached(features), Cached(words)
        models[name] = model
        cases[name] = lambda model=model, text=text: model(pixel_values=pixel_values, **text).logits

    results = {"environment": benchlib.environment(), "settings": vars(args), "cases": {}}
    with torch.inference_mode():
        flops = {name: benchlib.count_flops(case)[0] for name, case in cases.items()}
        timings = benchlib.time_interleaved(cases, args.repeats)
    reference = "papers' path"
    print(f"{benchlib.cpu_model()}, {torch.get_num_threads()} thread(s), load {benchlib.load_average()}; "
          f"{args.preset}, one expression at {args.image_size}x{args.image_size}, encoders cached\n")
    print("| setting | GFLOP | GFLOP saved | ms | time over the papers' path |")
    print("|---|---:|---:|---:|---:|")
    for name, timing in timings.items():
        time_ratio = benchlib.ratio(timing["wall"], timings[reference]["wall"])
        results["cases"][name] = {
            "fields": settings(args.preset)[name],
            "gflop": round(flops[name] / 1e9, 3),
            "gflop_saved": round((flops[reference] - flops[name]) / 1e9, 3),
            "latency_s": benchlib.summarize(timing["wall"]),
            "time_over_papers_path": time_ratio,
        }
        print(f"| {name} | {flops[name] / 1e9:.2f} | {(flops[reference] - flops[name]) / 1e9:.2f} | "
              f"{statistics.median(timing['wall']) * 1e3:.0f} | {time_ratio['median']:.3f} |")
    path = benchlib.write_results("lighter_path", results, args.output, args.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
