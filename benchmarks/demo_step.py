"""Time of one training step of the demo's model: standard and channels-last memory layout, and scenes that share.

    python benchmarks/demo_step.py [--batch-size 8] [--expressions-per-image 2] [--image-size 160] [--repeats 6]
                                   [--threads N] [--quick] [--output PATH]

Builds the demo's model (`crobim_u.demo.build_model_and_tokenizer`, the frozen MiniLM where installed, else the
scratch text encoder; a frozen one's hidden states are computed once, as the demo does) and times AdamW steps on
`--batch-size` expressions over random images, in interleaved rounds of three cases: one image per expression in
the standard layout, the same in channels-last, and channels-last with `--expressions-per-image` expressions per
image (the demo's batches: each image encoded once, `image_indices` pairing it with its expressions). Each round
moves the model to its layout (`model.to(memory_format=...)`), takes one untimed step, then two timed ones. The demo
trains in channels-last and moves the weights back before saving. Also checks that both layouts give the same
logits, and that a shared image gives the logits of its copies. Writes `benchmarks/results/demo_step.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from crobim_u.demo import DemoRecipe, build_model_and_tokenizer, frozen_text_encoder  # noqa: E402


LAYOUTS = {"standard": torch.contiguous_format, "channels_last": torch.channels_last}
SHARED = "channels_last, shared images"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=DemoRecipe.batch_size)
    parser.add_argument(
        "--expressions-per-image", type=int, default=DemoRecipe.expressions_per_image,
        help="expressions per image in the shared case (must divide the batch size)",
    )
    parser.add_argument("--image-size", type=int, default=DemoRecipe.image_size)
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds per layout")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="64x64, batch 2, 2 rounds (a smoke run)")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/demo_step.json)")
    return parser


def demo_text(model: Any, tokenizer: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """The model's text inputs for `batch_size` copies of one expression; hidden states for a frozen encoder."""
    text = tokenizer(
        ["the white car left of the largest red building"] * batch_size, padding="max_length",
        max_length=DemoRecipe.max_length, return_tensors="pt",
    )
    encoder = frozen_text_encoder(model)
    if encoder is not None:
        # As the demo trains: the frozen encoder's hidden states are computed once, not at every step.
        with torch.no_grad():
            hidden_states = encoder(**text).last_hidden_state
        text = {"text_hidden_states": hidden_states, "attention_mask": text["attention_mask"]}
    return text


def train_step(
    model: Any, optimizer: torch.optim.Optimizer, inputs: dict, case: tuple[torch.memory_format, torch.Tensor, Any]
) -> None:
    """One AdamW step on `inputs` (text and labels) with the case's images in its layout and its `image_indices`."""
    layout, pixel_values, indices = case
    pixel_values = pixel_values.contiguous(memory_format=layout)
    outputs = model(pixel_values=pixel_values, image_indices=indices, **inputs)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def timed_round(model: Any, optimizer: torch.optim.Optimizer, inputs: dict, case: tuple) -> float:
    """Moves the model to the case's layout, takes one untimed step, then returns the mean time of two more."""
    model.to(memory_format=case[0])
    train_step(model, optimizer, inputs, case)  # untimed: the first step after a layout change
    started = time.perf_counter()
    train_step(model, optimizer, inputs, case)
    train_step(model, optimizer, inputs, case)
    return (time.perf_counter() - started) / 2


def logit_differences(
    model: Any, images: torch.Tensor, shared_images: torch.Tensor, image_indices: torch.Tensor, text: dict
) -> tuple[float, float]:
    """The largest logit difference between the two layouts, and between shared images and their copies."""
    model.eval()
    with torch.no_grad():
        logits = {}
        for name, layout in LAYOUTS.items():
            model.to(memory_format=layout)
            logits[name] = model(pixel_values=images.contiguous(memory_format=layout), **text).logits
        model.to(memory_format=torch.channels_last)
        shared = model(pixel_values=shared_images.contiguous(memory_format=torch.channels_last),
                       image_indices=image_indices, **text).logits
        copies = model(pixel_values=shared_images[image_indices].contiguous(memory_format=torch.channels_last),
                       **text).logits
    max_difference = (logits["standard"] - logits["channels_last"]).abs().max().item()
    shared_difference = (shared - copies).abs().max().item()
    return max_difference, shared_difference


def print_report(results: dict, seconds: dict[str, list[float]], path: Path) -> None:
    print(f"{results['model']}; batch {results['batch_size']} x {results['image_size']}^2, "
          f"{torch.get_num_threads()} thread(s); shared: {results['expressions_per_image']} expressions per image")
    for name, values in seconds.items():
        print(f"{name}: {statistics.median(values):.3f} s per step (median of {len(values)} rounds)")
    print(
        f"channels-last / standard: {results['channels_last_over_standard']['of_medians']:.3f} (ratio of medians); "
        f"largest logit difference {results['max_logit_difference']:.2e}"
    )
    print(
        f"shared images / channels-last: {results['shared_over_channels_last']['of_medians']:.3f} (ratio of medians); "
        f"largest logit difference {results['max_shared_logit_difference']:.2e}; wrote {path}"
    )


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.image_size, args.repeats = 2, 64, 2
    if args.batch_size % args.expressions_per_image:
        parser.error(f"--expressions-per-image {args.expressions_per_image} must divide --batch-size {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer, init = build_model_and_tokenizer(DemoRecipe(image_size=args.image_size), "auto")
    model.train()
    text = demo_text(model, tokenizer, args.batch_size)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    per_image = args.expressions_per_image
    shared_images = images[::per_image]
    image_indices = torch.arange(len(shared_images)).repeat_interleave(per_image)
    labels = (torch.rand(args.batch_size, args.image_size, args.image_size) > 0.98).float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cases = {name: (layout, images, None) for name, layout in LAYOUTS.items()}
    cases[SHARED] = (torch.channels_last, shared_images, image_indices)

    inputs = {**text, "labels": labels}

    environment = benchlib.environment()
    seconds = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            seconds[name].append(timed_round(model, optimizer, inputs, case))
    max_difference, shared_difference = logit_differences(model, images, shared_images, image_indices, text)

    results = {
        "environment": environment,
        "model": init,
        "batch_size": args.batch_size,
        "expressions_per_image": per_image,
        "image_size": args.image_size,
        "step_seconds": {name: benchlib.summarize(values) for name, values in seconds.items()},
        "channels_last_over_standard": benchlib.ratio(seconds["channels_last"], seconds["standard"]),
        "shared_over_channels_last": benchlib.ratio(seconds[SHARED], seconds["channels_last"]),
        "max_logit_difference": max_difference,
        "max_shared_logit_difference": shared_difference,
    }
    path = benchlib.write_results("demo_step", results, args.output, args.quick)
    print_report(results, seconds, path)


if __name__ == "__main__":
    main()
