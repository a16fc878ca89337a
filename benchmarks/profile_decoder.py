"""Where the time of CroBIM-U's own modules goes: torch.profiler over one forward with the encoders' outputs cached.

    python benchmarks/profile_decoder.py [--preset swin-base] [--batch-size 1] [--image-size 480] [--threads N]
                                         [--repeats 3] [--top 25] [--overrides JSON] [--quick]

Runs the image backbone and the text encoder once, then replaces them by their cached outputs, so that the profiled
forward passes hold only what this package adds: the visual projections, CAPM, LGFA, RUS, UGF, MID and UDLR.
Prints the time per module (forward hooks; CAPM's and LGFA's image-only parts, which run once per image before
the expressions pick their image, count to their module), then the top aten operators by CPU time, grouped by input
shapes. `--overrides` sets config fields over the preset (e.g. `'{"lgfa_fine_attention": "upsampled"}'`). fp32,
`torch.inference_mode`, random initialisation.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from inference_speed import text_inputs  # noqa: E402

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation  # noqa: E402


def top_level_ops(profile) -> dict[tuple[str, str], list[float]]:
    """CPU milliseconds and calls of each aten op called from Python (not from inside another aten op)."""
    totals = collections.defaultdict(lambda: [0.0, 0])

    def walk(event):
        if event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::")):
            key = (event.name, str(event.input_shapes)[:90])
            totals[key][0] += event.cpu_time_total / 1e3
            totals[key][1] += 1
            return
        for child in event.cpu_children:
            walk(child)

    for event in profile.events():
        if event.cpu_parent is None:
            walk(event)
    return totals


def timed(function, name: str, seconds: dict[str, float]):
    """`function`, adding its wall time to `seconds[name]`."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[name] += time.perf_counter() - started
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--overrides", default="{}", help="config fields over the preset, as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64x64, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.image_size, args.repeats, args.threads = "tiny", 64, 1, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = CrobimUConfig.from_preset(args.preset, **json.loads(args.overrides))
    model = CrobimUForReferringSegmentation(config).eval()
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    text = text_inputs(args.batch_size, model.config.text_config.vocab_size)
    with torch.inference_mode():
        features, words = model.backbone(pixel_values), model.text_encoder(**text)
    model.backbone.forward = lambda *args, **kwargs: features
    model.text_encoder.forward = lambda *args, **kwargs: words

    module_seconds = collections.defaultdict(float)
    for name, module in model.named_children():
        if name in ("backbone", "text_encoder"):
            continue
        calls = list(module.values()) if isinstance(module, torch.nn.ModuleDict) else [module]
        for part in calls:
            part.register_forward_pre_hook(lambda module, inputs: setattr(module, "_started", time.perf_counter()))
            part.register_forward_hook(
                lambda module, inputs, output, name=name: module_seconds.__setitem__(
                    name, module_seconds[name] + time.perf_counter() - module._started
                )
            )

    for name, method in (("capm", "image_context"), ("lgfa", "pixel_sides")):
        module = getattr(model, name)
        setattr(module, method, timed(getattr(module, method), name, module_seconds))

    with torch.inference_mode():
        model(pixel_values=pixel_values, **text)  # warm-up
        module_seconds.clear()
        started = time.perf_counter()
        for _ in range(args.repeats):
            model(pixel_values=pixel_values, **text)
        total = (time.perf_counter() - started) / args.repeats
        per_module = dict(module_seconds)
        with torch.profiler.profile(record_shapes=True) as profile:
            model(pixel_values=pixel_values, **text)

    print(f"{benchlib.cpu_model()}, {torch.get_num_threads()} thread(s), load {benchlib.load_average()}; "
          f"{args.preset} {args.overrides}, batch {args.batch_size} x {args.image_size}^2: fusion + decoder + uncertainty "
          f"{total * 1e3:.0f} ms per forward (mean of {args.repeats})")
    print("\n| module | ms | share |\n|---|---:|---:|")
    for name, seconds in sorted(per_module.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds / args.repeats * 1e3:.1f} | {seconds / args.repeats / total:.0%} |")
    totals = top_level_ops(profile)
    profiled = sum(milliseconds for milliseconds, _ in totals.values())
    print(f"\nTop operators (one profiled forward, {profiled:.0f} ms with the profiler's overhead):\n")
    print("| ms | share | calls | operator | input shapes |\n|---:|---:|---:|---|---|")
    for (name, shapes), (milliseconds, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[: args.top]:
        print(f"| {milliseconds:.1f} | {milliseconds / profiled:.1%} | {calls} | {name} | `{shapes}` |")


if __name__ == "__main__":
    main()
