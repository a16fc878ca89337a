"""Time and peak memory of CroBIM-U optimisation steps, with gradient checkpointing off and on.

    python benchmarks/training_step.py [--preset swin-base] [--image-size 480] [--batch-size 2] [--steps 2]

Builds the preset's architecture from random initialisation (nothing is downloaded), collates synthetic samples
through the processor, and takes `--steps` AdamW steps with the Trainer's parameter groups. Each variant runs in its
own process, so its peak resident memory (ru_maxrss) is its own; the memory already resident after the model and
the batch are built is printed beside it. CPU seconds are printed beside wall-clock seconds: the wall clock depends
on what else runs on the machine (the load average is printed), the CPU time much less. fp32, flush-to-zero off.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args: argparse.Namespace) -> None:
    import torch

    from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation, CrobimUImageProcessor, CrobimUProcessor
    from crobim_u.data.synthetic import load_synthetic
    from crobim_u.training import CrobimUDataCollator, parameter_groups
    from crobim_u.training.run import build_synthetic_tokenizer, freeze_unused_parameters

    torch.manual_seed(0)
    tokenizer = build_synthetic_tokenizer()
    processor = CrobimUProcessor(
        CrobimUImageProcessor(size={"height": args.image_size, "width": args.image_size}), tokenizer
    )
    records = load_synthetic(num_train=args.batch_size, num_validation=0, num_test=0, cache_dir=args.cache_dir)["train"]
    batch = CrobimUDataCollator(processor)([records[i] for i in range(args.batch_size)])

    model = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(args.preset))
    freeze_unused_parameters(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 3e-5, 0.01, 0.1, 0.1), lr=3e-5)
    resident = rss_gib()

    step_seconds, step_cpu = [], []
    for step in range(args.steps):
        wall, cpu = time.perf_counter(), cpu_seconds()
        loss = model(**batch, global_step=step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - wall)
        step_cpu.append(cpu_seconds() - cpu)
    print(json.dumps({
        "gradient_checkpointing": args.gradient_checkpointing,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu,
        "resident_before_gib": resident,
        "peak_gib": rss_gib(),
        "loss": loss.item(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base")
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cache-dir", help="datasets cache for the synthetic samples")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load average: "
          f"{os.getloadavg()[0]:.2f}, preset {args.preset}, {args.batch_size} x {args.image_size}x{args.image_size}")
    print("| gradient checkpointing | step 1 s (CPU s) | later steps s (CPU s) | resident before GiB | peak GiB |")
    print("|---|---:|---:|---:|---:|")
    for checkpointing in (False, True):
        command = [sys.executable, __file__, "--worker", "--preset", args.preset, "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        command += ["--gradient-checkpointing"] * checkpointing
        command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        first = f"{row['step_seconds'][0]:.2f} ({row['step_cpu_seconds'][0]:.2f})"
        later = row["step_seconds"][1:]
        later_text = "-" if not later else (
            f"{sum(later) / len(later):.2f} ({sum(row['step_cpu_seconds'][1:]) / len(later):.2f})"
        )
        print(f"| {'on' if checkpointing else 'off'} | {first} | {later_text} | {row['resident_before_gib']:.2f} | "
              f"{row['peak_gib']:.2f} |")
    print(f"parameters: {row['parameters_m']:.1f} M")


if __name__ == "__main__":
    main()
