"""Time of one training step of the demo's model, with the standard and the channels-last memory layout.

    python benchmarks/demo_step.py [--batch-size 8] [--image-size 160] [--repeats 6] [--threads N] [--quick]
                                   [--output PATH]

Builds the demo's model (`crobim_u.demo.build_model_and_tokenizer`, the frozen MiniLM where installed, else the
scratch text encoder; a frozen one's hidden states are computed once, as the demo does) and times AdamW steps on
random images, alternating the two layouts in interleaved rounds: the model is moved to the layout of the round
(`model.to(memory_format=...)`), one untimed step follows, then two timed ones. The demo trains in channels-last
and moves the weights back before saving. Also checks that both layouts give the same logits. Writes
`benchmarks/results/demo_step.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from crobim_u.demo import DemoRecipe, build_model_and_tokenizer, frozen_text_encoder  # noqa: E402


LAYOUTS = {"standard": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=DemoRecipe.batch_size)
    parser.add_argument("--image-size", type=int, default=DemoRecipe.image_size)
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds per layout")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="64x64, batch 2, 2 rounds (a smoke run)")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/demo_step.json)")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.image_size, args.repeats = 2, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer, init = build_model_and_tokenizer(DemoRecipe(image_size=args.image_size), "auto")
    model.train()
    text = tokenizer(
        ["the white car left of the largest red building"] * args.batch_size, padding="max_length",
        max_length=DemoRecipe.max_length, return_tensors="pt",
    )
    encoder = frozen_text_encoder(model)
    if encoder is not None:
        # As the demo trains: the frozen encoder's hidden states are computed once, not at every step.
        with torch.no_grad():
            hidden_states = encoder(**text).last_hidden_state
        text = {"text_hidden_states": hidden_states, "attention_mask": text["attention_mask"]}
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = (torch.rand(args.batch_size, args.image_size, args.image_size) > 0.98).float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(layout: torch.memory_format) -> None:
        outputs = model(pixel_values=images.contiguous(memory_format=layout), **text, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def timed_round(layout: torch.memory_format) -> float:
        model.to(memory_format=layout)
        step(layout)  # untimed: the first step after a layout change
        started = time.perf_counter()
        step(layout)
        step(layout)
        return (time.perf_counter() - started) / 2

    environment = benchlib.environment()
    seconds = {name: [] for name in LAYOUTS}
    for _ in range(args.repeats):
        for name, layout in LAYOUTS.items():
            seconds[name].append(timed_round(layout))

    model.eval()
    with torch.no_grad():
        logits = {}
        for name, layout in LAYOUTS.items():
            model.to(memory_format=layout)
            logits[name] = model(pixel_values=images.contiguous(memory_format=layout), **text).logits
    max_difference = (logits["standard"] - logits["channels_last"]).abs().max().item()

    results = {
        "environment": environment,
        "model": init,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "step_seconds": {name: benchlib.summarize(values) for name, values in seconds.items()},
        "channels_last_over_standard": benchlib.ratio(seconds["channels_last"], seconds["standard"]),
        "max_logit_difference": max_difference,
    }
    path = benchlib.write_results("demo_step", results, args.output, args.quick)
    print(f"{init}; batch {args.batch_size} x {args.image_size}^2, {torch.get_num_threads()} thread(s)")
    for name, values in seconds.items():
        print(f"{name}: {statistics.median(values):.3f} s per step (median of {len(values)} rounds)")
    print(
        f"channels-last / standard: {results['channels_last_over_standard']['of_medians']:.3f} (ratio of medians); "
        f"largest logit difference {max_difference:.2e}; wrote {path}"
    )


if __name__ == "__main__":
    main()
