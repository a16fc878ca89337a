"""Inference speed, FLOPs and memory of CroBIM-U at full size, its overheads, and a peer (CLIPSeg), in one run.

    python benchmarks/inference_speed.py [--presets swin-base convnext-base] [--batch-sizes 1 8]
                                         [--image-size 480] [--repeats 5] [--batched-repeats 3] [--threads N]
                                         [--no-clipseg] [--overrides JSON] [--quick] [--output PATH]

For each batch size, every case below runs once per round, in interleaved rounds (one untimed warm-up round, then
`--repeats` timed rounds; `--batched-repeats` for batches above 1), so that other processes on the machine slow
every case alike:

- `matmul`: three fp32 2048x2048 `torch.mm` calls: the achievable matrix-product rate of this machine, now.
- `<preset>/crobim-u`: the full model (RUS, UGF, UDLR on), random initialisation, `--image-size`^2 inputs and
  20-token expressions (the field's recipe).
- `<preset>/encoders`: the image backbone and the text encoder alone, on the same inputs.
- `<preset>/crobim`: the CroBIM base (`use_rus=use_ugf=use_udlr=False`), sharing the encoders' modules.
- `clipseg`: transformers' `CLIPSegForImageSegmentation` (default `CLIPSegConfig`, random initialisation) at its
  native 352x352.

Per case: latency (median, min-max of the timed rounds), images per second, FLOPs (`FlopCounterMode`: products,
convolutions and attention, 2 per multiply-add), achieved GFLOP/s, its share of the matmul rate of the same round,
peak tensor memory above the weights (see `benchlib.TensorMemory`) and parameters. Ratios are computed per round
(both cases ran back to back) and summarised by their median. fp32, `torch.inference_mode`, flush-to-zero off.

Writes `benchmarks/results/inference_speed.json` (`--quick`: the `tiny` preset at 64x64, a small CLIPSeg, two rounds,
into `inference_speed-quick.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation  # noqa: E402


TEXT_LENGTH = 20
CLIPSEG_SIZE = 352
MATMUL_CALLS = 3


def text_inputs(batch_size: int, vocab_size: int, length: int = TEXT_LENGTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and a mask with expressions of 8 to `length` tokens, padded to `length`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, length), generator=generator)
    lengths = torch.randint(min(8, length), length + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def build_crobim(
    preset: str, quick: bool, changes: dict | None = None
) -> tuple[CrobimUForReferringSegmentation, CrobimUForReferringSegmentation]:
    """The full model and its CroBIM base; the base shares the encoder modules (same weights, less memory)."""
    overrides = {"text_config": {"vocab_size": 1000}} if quick else {}
    overrides.update(changes or {})
    torch.manual_seed(0)
    full = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(preset, **overrides)).eval()
    torch.manual_seed(0)
    base_config = CrobimUConfig.from_preset(preset, use_rus=False, use_ugf=False, use_udlr=False, **overrides)
    base = CrobimUForReferringSegmentation(base_config).eval()
    base.backbone, base.text_encoder = full.backbone, full.text_encoder
    return full, base


def build_clipseg(quick: bool):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    if quick:
        small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2}
        config = CLIPSegConfig(
            text_config={**small, "vocab_size": 1000}, vision_config={**small, "patch_size": 16},
            projection_dim=32, reduce_dim=16, extract_layers=[1, 2, 3],
        )
    else:
        config = CLIPSegConfig()
    torch.manual_seed(0)
    return CLIPSegForImageSegmentation(config).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["swin-base", "convnext-base"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds at batch size 1")
    parser.add_argument("--batched-repeats", type=int, default=3, help="timed rounds at larger batch sizes")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-clipseg", action="store_true", help="leave out the CLIPSeg peer")
    parser.add_argument("--overrides", default="{}", help="config fields over every preset, as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64x64, two rounds: a smoke test")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/inference_speed[-quick].json)")
    return parser


def build_models(args: argparse.Namespace, results: dict) -> tuple[dict, Any]:
    """The full model and its base per preset, and CLIPSeg (`None` with `--no-clipseg`); records their parameters."""
    models = {}
    for preset in args.presets:
        full, base = build_crobim(preset, args.quick, json.loads(args.overrides))
        encoders = benchlib.parameter_count(full.backbone) + benchlib.parameter_count(full.text_encoder)
        models[preset] = (full, base)
        results["models"][preset] = {
            "parameters": {
                "crobim-u": benchlib.parameter_count(full),
                "crobim": benchlib.parameter_count(base),
                "encoders": encoders,
                "ours (fusion, decoder, uncertainty)": benchlib.parameter_count(full) - encoders,
            },
            "parameter_overhead_over_crobim": round(benchlib.parameter_count(full) / benchlib.parameter_count(base) - 1, 4),
        }
    clipseg = None if args.no_clipseg else build_clipseg(args.quick)
    if clipseg is not None:
        results["models"]["clipseg"] = {"parameters": {"clipseg": benchlib.parameter_count(clipseg)},
                                        "config": "CLIPSegConfig()" if not args.quick else "small"}
    return models, clipseg


def batch_cases(
    batch_size: int, image_size: int, models: dict, clipseg: Any, matmul: Callable[[], Any]
) -> dict[str, Callable[[], Any]]:
    """The cases timed together at one batch size: the matmul reference, each preset's three, and CLIPSeg."""
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    cases = {"matmul": lambda: [matmul() for _ in range(MATMUL_CALLS)]}
    for preset, (full, base) in models.items():
        text = text_inputs(batch_size, full.config.text_config.vocab_size)
        cases[f"{preset}/crobim-u"] = lambda full=full, text=text: full(pixel_values=pixel_values, **text)
        cases[f"{preset}/encoders"] = lambda full=full, text=text: (
            full.backbone(pixel_values), full.text_encoder(**text)
        )
        cases[f"{preset}/crobim"] = lambda base=base, text=text: base(pixel_values=pixel_values, **text)
    if clipseg is not None:
        clip_pixels = torch.randn(batch_size, 3, CLIPSEG_SIZE, CLIPSEG_SIZE, generator=torch.Generator().manual_seed(0))
        clip_text = text_inputs(batch_size, clipseg.config.text_config.vocab_size)
        cases["clipseg"] = lambda: clipseg(pixel_values=clip_pixels, **clip_text)
    return cases


def case_figures(
    entry: dict, timings: dict, flops_of: dict[str, float], memory: dict[str, int], batch_size: int
) -> None:
    """Adds each case's latency, rates and memory to `entry["cases"]`, and the matmul rate to `entry`; prints them."""
    matmul_rates = [flops_of["matmul"] / seconds for seconds in timings["matmul"]["wall"]]
    entry["matmul_gflops"] = benchlib.summarize([rate / 1e9 for rate in matmul_rates], 1)
    for name, timing in timings.items():
        wall = timing["wall"]
        case = entry["cases"][name]
        case["latency_s"] = benchlib.summarize(wall)
        case["cpu_s"] = benchlib.summarize(timing["cpu"])
        case["load_average"] = [round(value, 2) for value in timing["load"]]
        case["flops"] = int(flops_of[name])
        case["gflops_per_s"] = benchlib.summarize([flops_of[name] / seconds / 1e9 for seconds in wall], 1)
        if name != "matmul":
            case["images_per_s"] = round(batch_size / statistics.median(wall), 3)
            case["latency_per_image_s"] = round(statistics.median(wall) / batch_size, 4)
            case["fraction_of_matmul_peak"] = benchlib.summarize(
                [flops_of[name] / seconds / rate for seconds, rate in zip(wall, matmul_rates)], 3
            )
            case["peak_tensor_memory_mib"] = round(memory[name] / 2**20, 1)
        print(f"  {name:28s} {statistics.median(wall):8.3f} s  {case['gflops_per_s']['median']:7.1f} GFLOP/s")


def overhead_ratios(entry: dict, timings: dict, preset: str, with_clipseg: bool) -> dict:
    """Per round: the full model over its encoders and over CroBIM, as overheads (ratio - 1), and over CLIPSeg."""
    full, encoders, base = (timings[f"{preset}/{case}"]["wall"] for case in ("crobim-u", "encoders", "crobim"))
    ratios = {
        "fusion_decoder_uncertainty_over_encoders": benchlib.ratio(full, encoders),
        "crobim_u_over_crobim": benchlib.ratio(full, base),
    }
    for summary in ratios.values():  # ratios as overheads: full / reference - 1
        for key in ("median", "min", "max", "of_medians"):
            summary[key] = round(summary[key] - 1, 4)
        summary["samples"] = [round(sample - 1, 4) for sample in summary["samples"]]
    if with_clipseg:
        ours = [entry["cases"][f"{preset}/crobim-u"]["flops"] / seconds for seconds in full]
        theirs = [entry["cases"]["clipseg"]["flops"] / seconds for seconds in timings["clipseg"]["wall"]]
        ratios["gflops_per_s_over_clipseg"] = benchlib.ratio(ours, theirs)
    print(f"  {preset}: overhead over encoders "
          f"{ratios['fusion_decoder_uncertainty_over_encoders']['median']:+.1%}, over CroBIM "
          f"{ratios['crobim_u_over_crobim']['median']:+.1%}")
    return ratios


def measure_batch(
    batch_size: int, args: argparse.Namespace, models: dict, clipseg: Any, matmul: Callable[[], Any],
    matmul_flops: float,
) -> dict:
    """Every case at one batch size: FLOPs and tensor memory (one untimed pass each), interleaved timings, ratios."""
    cases = batch_cases(batch_size, args.image_size, models, clipseg, matmul)
    flops_of = {"matmul": MATMUL_CALLS * matmul_flops}
    entry = {"cases": {}}
    with torch.inference_mode():
        # One untimed pass per case counts its FLOPs, a second one its tensor memory (both also warm up).
        memory = {}
        for name, case in cases.items():
            if name != "matmul":
                flops_of[name], per_module = benchlib.count_flops(case)
                memory[name] = benchlib.peak_tensor_bytes(case)
                entry["cases"][name] = {"flops_per_module": per_module}
            else:
                entry["cases"][name] = {}
        repeats = args.repeats if batch_size == 1 else args.batched_repeats
        print(f"batch {batch_size}: {len(cases)} cases, {args.warmup} warm-up + {repeats} timed rounds")
        timings = benchlib.time_interleaved(cases, repeats, args.warmup)
    case_figures(entry, timings, flops_of, memory, batch_size)
    entry["ratios"] = {preset: overhead_ratios(entry, timings, preset, clipseg is not None) for preset in models}
    return entry


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.presets, args.batch_sizes, args.image_size = ["tiny"], [1, 2], 64
        args.repeats = args.batched_repeats = 2
        # One thread: on a shared 2-core machine, two threads wait on each other for every small op.
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(False)

    results = {"environment": benchlib.environment(), "settings": vars(args), "models": {}, "batches": {}}
    print(f"{results['environment']['cpu']}, {results['environment']['cores']} cores, "
          f"{torch.get_num_threads()} threads, load {benchlib.load_average()}")
    models, clipseg = build_models(args, results)
    matmul, matmul_flops = benchlib.matmul_case(256 if args.quick else 2048)
    for batch_size in args.batch_sizes:
        results["batches"][str(batch_size)] = measure_batch(batch_size, args, models, clipseg, matmul, matmul_flops)

    path = benchlib.write_results("inference_speed", results, args.output, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
