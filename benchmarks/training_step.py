"""Time and peak memory of CroBIM-U optimisation steps, with gradient checkpointing off and on, and tiny steps/s.

    python benchmarks/training_step.py [--preset swin-base] [--image-size 480] [--batch-size 2] [--steps 3]
                                       [--tiny-steps 20] [--threads N] [--quick] [--output PATH]

Builds the preset's architecture from random initialisation (nothing is downloaded), collates synthetic samples
through the processor, and takes `--steps` AdamW steps with the Trainer's parameter groups (the first one, which
also creates the optimizer state, is the warm-up; the others are timed). Each variant runs in its own process, so
its peak resident memory (`ru_maxrss`) is its own. Four memory figures per variant:

- `peak_rss_gib`: the process's peak resident memory over the whole run (weights, gradients, AdamW state,
  activations, allocator caching, the Python and library code);
- `resident_before_gib`: resident memory once the model and the batch are built, before the first step;
- `step_tensor_peak_gib`: peak bytes of the tensors one optimisation step creates and holds at once (activations
  saved for backward, recomputed ones, gradients, optimizer temporaries; `benchlib.TensorMemory`), measured on one
  extra, untimed step;
- `peak_allocated_gib`: that plus the weights and the AdamW state: the tensor memory the step needs at its peak,
  the figure a GPU reports as `max_memory_allocated`.

Then the `tiny` preset (the demo's recipe: 160x160, batch 16; `--tiny-image-size`, `--tiny-batch-size`) in steps
per second. CPU seconds are printed beside wall-clock seconds; the load average is recorded. fp32, flush-to-zero
off.

Gradient checkpointing acts on the activations only: weights, gradients, the AdamW state and the runtime stay,
so the process's peak falls by a smaller share than the step's tensors.

Writes `benchmarks/results/training_step.json` (`--quick`: the `tiny` preset at 64x64 for the checkpointing
comparison, into `training_step-quick.json`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args: argparse.Namespace) -> dict:
    import torch

    from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation, CrobimUImageProcessor, CrobimUProcessor
    from crobim_u.data.synthetic import load_synthetic
    from crobim_u.training import CrobimUDataCollator, parameter_groups
    from crobim_u.training.run import build_synthetic_tokenizer, freeze_unused_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = build_synthetic_tokenizer()
    processor = CrobimUProcessor(
        CrobimUImageProcessor(size={"height": args.image_size, "width": args.image_size}), tokenizer
    )
    records = load_synthetic(
        num_train=args.batch_size, num_validation=0, num_test=0, image_size=min(args.image_size, 256),
        cache_dir=args.cache_dir,
    )["train"]
    batch = CrobimUDataCollator(processor)([records[i] for i in range(args.batch_size)])

    overrides = {"backbone_config": {"image_size": args.image_size}} if args.preset == "tiny" else {}
    model = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(args.preset, **overrides))
    freeze_unused_parameters(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 3e-5, 0.01, 0.1, 0.1), lr=3e-5)
    resident = rss_gib()

    def step(global_step: int) -> float:
        loss = model(**batch, global_step=global_step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step_seconds, step_cpu = [], []
    for index in range(args.steps):
        wall, cpu = time.perf_counter(), benchlib.cpu_seconds()
        loss = step(index)
        step_seconds.append(time.perf_counter() - wall)
        step_cpu.append(benchlib.cpu_seconds() - cpu)
    peak = rss_gib()
    # One more step under the tensor tracker (after the timed ones: the tracker costs time, not memory).
    tensor_peak = benchlib.peak_tensor_bytes(lambda: step(args.steps)) if args.track_tensors else None
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    optimizer_state = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    )
    checkpointed = sorted({type(module).__name__ for module in model.modules() if getattr(module, "gradient_checkpointing", False)})
    return {
        "gradient_checkpointing": args.gradient_checkpointing,
        "checkpointed_modules": checkpointed,
        "parameters": benchlib.parameter_count(model),
        "step_s": step_seconds,
        "step_cpu_s": step_cpu,
        "resident_before_gib": round(resident, 3),
        "peak_rss_gib": round(peak, 3),
        "step_tensor_peak_gib": None if tensor_peak is None else round(tensor_peak / 2**30, 3),
        "weights_gib": round(weights / 2**30, 3),
        "optimizer_state_gib": round(optimizer_state / 2**30, 3),
        "peak_allocated_gib": None if tensor_peak is None else round((weights + optimizer_state + tensor_peak) / 2**30, 3),
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


def run_worker(args: argparse.Namespace, **changes) -> dict:
    """Runs `worker` in a fresh process (its own peak memory) and returns its JSON line."""
    settings = {**vars(args), **changes}
    command = [sys.executable, __file__, "--worker"]
    for key in ("preset", "image_size", "batch_size", "steps", "cache_dir", "threads"):
        if settings[key] is not None:
            command += [f"--{key.replace('_', '-')}", str(settings[key])]
    command += ["--gradient-checkpointing"] * settings["gradient_checkpointing"]
    command += ["--track-tensors"] * settings["track_tensors"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed(row: dict) -> dict:
    """The steps after the first (which creates the optimizer state) summarised; the first alone if only one."""
    later = row["step_s"][1:] or row["step_s"]
    later_cpu = row["step_cpu_s"][1:] or row["step_cpu_s"]
    return {"wall": benchlib.summarize(later, 3), "cpu": benchlib.summarize(later_cpu, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base")
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant; the first is the warm-up")
    parser.add_argument("--tiny-steps", type=int, default=20, help="timed steps of the tiny preset (0: skip)")
    parser.add_argument("--tiny-image-size", type=int, default=160)
    parser.add_argument("--tiny-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache-dir", help="datasets cache for the synthetic samples")
    parser.add_argument("--quick", action="store_true", help="tiny preset at 64x64, 2 steps: a smoke test")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/training_step[-quick].json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--track-tensors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.preset, args.image_size, args.steps = "tiny", 64, 2
        args.tiny_steps, args.tiny_image_size, args.tiny_batch_size = 1, 64, args.batch_size
        # One thread: on a shared 2-core machine, two threads wait on each other for every small op.
        args.threads = args.threads or 1

    results = {"environment": benchlib.environment(), "settings": vars(args), "variants": {}}
    print(f"{results['environment']['cpu']}, {results['environment']['cores']} cores, load {benchlib.load_average()}, "
          f"preset {args.preset}, {args.batch_size} x {args.image_size}x{args.image_size}")
    print("| gradient checkpointing | step s (CPU s) | resident before GiB | peak RSS GiB | step tensor peak GiB | "
          "peak allocated GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for checkpointing in (False, True):
        row = run_worker(args, gradient_checkpointing=checkpointing, track_tensors=True)
        row["timed_steps"] = timed(row)
        row["load_average_end"] = benchlib.load_average()
        results["variants"]["on" if checkpointing else "off"] = row
        print(f"| {'on' if checkpointing else 'off'} | {row['timed_steps']['wall']['median']:.2f} "
              f"({row['timed_steps']['cpu']['median']:.2f}) | {row['resident_before_gib']:.2f} | "
              f"{row['peak_rss_gib']:.2f} | {row['step_tensor_peak_gib']:.2f} | {row['peak_allocated_gib']:.2f} |")
    off, on = results["variants"]["off"], results["variants"]["on"]
    results["environment"]["torch_threads"] = off["threads"]  # the workers' count, not this process's
    results["checkpointing_effect"] = {
        "peak_rss_change": round(on["peak_rss_gib"] / off["peak_rss_gib"] - 1, 4),
        "step_tensor_peak_change": round(on["step_tensor_peak_gib"] / off["step_tensor_peak_gib"] - 1, 4),
        "peak_allocated_change": round(on["peak_allocated_gib"] / off["peak_allocated_gib"] - 1, 4),
        "step_time_change": round(on["timed_steps"]["wall"]["median"] / off["timed_steps"]["wall"]["median"] - 1, 4),
    }
    print(f"checkpointing: peak RSS {results['checkpointing_effect']['peak_rss_change']:+.1%}, peak allocated "
          f"{results['checkpointing_effect']['peak_allocated_change']:+.1%}, step tensor peak "
          f"{results['checkpointing_effect']['step_tensor_peak_change']:+.1%}, step time "
          f"{results['checkpointing_effect']['step_time_change']:+.1%}")

    if args.tiny_steps:
        same = (args.preset, args.image_size, args.batch_size) == ("tiny", args.tiny_image_size, args.tiny_batch_size)
        tiny = dict(off) if same and args.steps > args.tiny_steps else run_worker(
            args, preset="tiny", image_size=args.tiny_image_size, batch_size=args.tiny_batch_size,
            steps=args.tiny_steps + 1, gradient_checkpointing=False, track_tensors=False,
        )
        tiny["timed_steps"] = timed(tiny)
        tiny["steps_per_s"] = round(1 / tiny["timed_steps"]["wall"]["median"], 2)
        tiny["samples_per_s"] = round(args.tiny_batch_size * tiny["steps_per_s"], 1)
        results["tiny"] = tiny
        print(f"tiny preset, {args.tiny_batch_size} x {args.tiny_image_size}x{args.tiny_image_size}: "
              f"{tiny['steps_per_s']:.2f} steps/s "
              f"({statistics.median(tiny['step_cpu_s'][1:]):.3f} CPU s per step)")

    path = benchlib.write_results("training_step", results, args.output, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
