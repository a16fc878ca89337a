"""GPU throughput of CroBIM-U: bf16 autocast + SDPA, inference and training, eager and `torch.compile`, and MFU.

    python benchmarks/gpu_benchmark.py [--preset swin-base] [--image-size 480] [--batch-size 16] [--steps 10]
                                       [--warmup 3] [--no-compile] [--budget-s 420] [--output PATH]
    python benchmarks/gpu_benchmark.py --smoke        # CPU: tiny preset, tiny sizes, writes nothing

One prepared run for one GPU, under 8 minutes on an H100: `--budget-s` (420) skips the cases that would start after
it, `--deadline-s` (450) interrupts a case still running then (a slow compilation), and the JSON is rewritten after
every case, so a run cut short keeps what it measured.

1. The bf16 matrix-product rate of this card, measured (8192^3 `torch.mm`, bf16).
2. Per mode (`eager`, then `compiled` = `torch.compile(model)`, default inductor backend):
   - inference: `torch.no_grad`, bf16 autocast, `--batch-size` images at `--image-size`^2 with one
     20-token expression each; images per second and peak memory;
   - training: forward with labels (loss inside), backward, fused AdamW step, bf16 autocast; images per second
     and peak memory.
   Each case takes `--warmup` untimed and `--steps` timed iterations (CUDA-synchronised wall clock).
3. FLOPs of one inference forward and one training step (`FlopCounterMode`, 2 per multiply-add), achieved
   TFLOP/s, and the model FLOP utilisation (MFU) against the card's dense bf16 peak from the table below (by device
   name) and against the measured matmul rate. A card missing from the table is compared with the measured rate.

The model is built from random initialisation (nothing is downloaded), with SDPA attention. Writes
`benchmarks/results/gpu.json` only when it ran on a GPU; `--smoke` runs the same code path on the CPU (tiny preset,
64x64, batch 2, one step, `torch.compile` with the `eager` backend) to check that the script works.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation  # noqa: E402


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; matched against
# `torch.cuda.get_device_name()` in this order (first match wins).
BF16_PEAK_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
]
TEXT_LENGTH = 20


def table_peak(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def make_batch(batch_size: int, image_size: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, TEXT_LENGTH + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, vocab_size, (batch_size, TEXT_LENGTH), generator=generator) * attention_mask
    labels = (torch.rand(batch_size, image_size // 32, image_size // 32, generator=generator) > 0.7).float()
    labels = labels.repeat_interleave(32, dim=1).repeat_interleave(32, dim=2)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
    return {key: value.to(device) for key, value in batch.items()}


def measured_matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """bf16 `torch.mm` FLOP/s, best of `repeats` after a warm-up."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / min(times)


def time_case(function, steps: int, warmup: int, device: torch.device) -> dict:
    """Warm-up (compiles, autotunes), then per-iteration synchronised wall times; peak memory over the timed ones."""
    started = time.perf_counter()
    for _ in range(warmup):
        function()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    reset_memory(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"warmup_s": round(warmup_s, 2), "step_s": benchlib.summarize(times, 5),
            "peak_memory_gib": peak_memory_gib(device)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base")
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per case (compilation included)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    parser.add_argument("--deadline-s", type=float, default=450.0, help="stop a running case after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny preset, tiny sizes, no file")
    parser.add_argument("--quick", action="store_true", help="same as --smoke")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/gpu.json, GPU runs only)")
    return parser


def interrupt(signum: int, frame: Any, deadline_s: float) -> None:
    """The SIGALRM handler: stops a case still running at the deadline."""
    raise TimeoutError(f"still running at the {deadline_s:.0f} s deadline")


def save(results: dict, on_gpu: bool, output: str | None) -> Path | None:
    """(Re)writes the JSON: always on a GPU, on the CPU only to an explicit `--output`."""
    if on_gpu or output:
        return benchlib.write_results("gpu", results, output, quick=False)
    return None


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_peaks(device: torch.device, device_name: str, on_gpu: bool) -> tuple[dict, float, float]:
    """The card's bf16 rate from the table and measured: their record, the measured rate and the MFU reference."""
    matmul_peak = measured_matmul_peak(device, 8192 if on_gpu else 256, 10 if on_gpu else 2)
    peak = table_peak(device_name) if on_gpu else None
    record = {
        "table_tflops": None if peak is None else peak / 1e12,
        "measured_matmul_tflops": round(matmul_peak / 1e12, 4),
        "mfu_reference": "table" if peak is not None else "measured matmul",
    }
    print(f"bf16 peak: table {record['table_tflops']} TFLOP/s, measured mm "
          f"{matmul_peak / 1e12:.1f} TFLOP/s", flush=True)
    return record, matmul_peak, peak or matmul_peak


def build_model(args: argparse.Namespace, device: torch.device) -> CrobimUForReferringSegmentation:
    """The `--preset` model from random initialisation, with SDPA attention (a small vocabulary for `--smoke`)."""
    overrides = {"text_config": {"vocab_size": 1000}} if args.smoke else {}
    torch.manual_seed(0)
    config = CrobimUConfig.from_preset(args.preset, **overrides)
    config._attn_implementation = "sdpa"
    return CrobimUForReferringSegmentation(config).to(device)


def step_flops(model: CrobimUForReferringSegmentation, batch: dict, device: torch.device) -> dict[str, int]:
    """FLOPs of one inference forward and of one training step, counted in eager mode."""
    inference_inputs = {key: value for key, value in batch.items() if key != "labels"}
    model.eval()
    with torch.inference_mode(), autocast(device):
        inference_flops, _ = benchlib.count_flops(lambda: model(**inference_inputs))
    model.train()

    def count_train():
        with autocast(device):
            loss = model(**batch).loss
        loss.backward()

    training_flops, _ = benchlib.count_flops(count_train)
    model.zero_grad(set_to_none=True)
    return {"inference_forward": inference_flops, "training_step": training_flops}


def step_functions(
    runner: Any, batch: dict, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """One inference forward and one training step of `runner` (the model or its compiled form), bf16 autocast."""
    inference_inputs = {key: value for key, value in batch.items() if key != "labels"}

    def infer():
        with torch.no_grad(), autocast(device):
            return runner(**inference_inputs).logits

    def train():
        with autocast(device):
            loss = runner(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer, train


def run_case(
    name: str,
    function: Callable[[], Any],
    flops: int,
    peaks: tuple[float, float],
    args: argparse.Namespace,
    started: float,
    device: torch.device,
) -> dict:
    """
    Times one case unless the budget is spent, interrupting it at the deadline; returns its record: the figures
    against `peaks` (the MFU reference and the measured matmul rate), or `skipped` or `error`.
    """
    if time.perf_counter() - started > args.budget_s:
        print(f"{name}: skipped (budget)", flush=True)
        return {"skipped": f"past the {args.budget_s:.0f} s budget"}
    remaining = args.deadline_s - (time.perf_counter() - started)
    signal.setitimer(signal.ITIMER_REAL, max(remaining, 1.0))
    try:
        case = time_case(function, args.steps, args.warmup, device)
    except Exception as error:  # a failed or interrupted compile must not lose the eager figures
        print(f"{name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return {"error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    reference_peak, matmul_peak = peaks
    seconds = case["step_s"]["median"]
    case["images_per_s"] = round(args.batch_size / seconds, 2)
    case["achieved_tflops"] = round(flops / seconds / 1e12, 4)
    case["mfu"] = round(flops / seconds / reference_peak, 4)
    case["fraction_of_measured_matmul"] = round(flops / seconds / matmul_peak, 4)
    print(f"{name}: {seconds * 1e3:.1f} ms/step, {case['images_per_s']:.1f} images/s, "
          f"{case['achieved_tflops']:.1f} TFLOP/s, MFU {case['mfu']:.1%}, peak {case['peak_memory_gib']} GiB "
          f"(warm-up {case['warmup_s']} s)", flush=True)
    return case


def compile_speedups(cases: dict) -> dict[str, float]:
    """Eager over compiled median step time, per task where both ran."""
    speedups = {}
    for task in ("inference", "training"):
        eager, compiled = cases.get(f"{task}/eager", {}), cases.get(f"{task}/compiled", {})
        if "step_s" in eager and "step_s" in compiled:
            speedups[task] = round(eager["step_s"]["median"] / compiled["step_s"]["median"], 3)
    return speedups


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.smoke = args.smoke or args.quick
    started = time.perf_counter()

    on_gpu = torch.cuda.is_available() and not args.smoke
    signal.signal(signal.SIGALRM, functools.partial(interrupt, deadline_s=args.deadline_s))
    if not on_gpu and not args.smoke:
        sys.exit("No CUDA device: run on a GPU, or pass --smoke to check the script on the CPU.")
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.smoke:
        args.preset, args.image_size, args.batch_size, args.steps, args.warmup = "tiny", 64, 2, 1, 1
        args.compile_backend = "eager"
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    environment = benchlib.environment()
    device_name = torch.cuda.get_device_name(device) if on_gpu else benchlib.cpu_model()
    results = {"environment": environment, "settings": vars(args), "device": device_name, "cases": {}}
    print(f"device: {device_name}, torch {torch.__version__}", flush=True)
    results["bf16_peak"], matmul_peak, reference_peak = bf16_peaks(device, device_name, on_gpu)

    model = build_model(args, device)
    batch = make_batch(args.batch_size, args.image_size, model.config.text_config.vocab_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=on_gpu)
    results["parameters"] = benchlib.parameter_count(model)
    results["flops"] = step_flops(model, batch, device)

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for mode in modes:
        runner = model if mode == "eager" else torch.compile(model, backend=args.compile_backend)
        infer, train = step_functions(runner, batch, optimizer, device)
        for task, function, train_mode in (("inference", infer, False), ("training", train, True)):
            name = f"{task}/{mode}"
            model.train(train_mode)
            flops = results["flops"]["inference_forward" if task == "inference" else "training_step"]
            results["cases"][name] = run_case(
                name, function, flops, (reference_peak, matmul_peak), args, started, device
            )
            if "skipped" not in results["cases"][name]:
                save(results, on_gpu, args.output)

    speedups = compile_speedups(results["cases"])
    if speedups:
        results["compile_speedup"] = speedups
    results["total_s"] = round(time.perf_counter() - started, 1)
    path = save(results, on_gpu, args.output)
    if path is not None:
        print(f"wrote {path}")
    else:
        print(json.dumps({key: results[key] for key in ("flops", "cases")}, indent=1))
    print(f"total {results['total_s']} s; median step times: "
          f"{ {name: case['step_s']['median'] for name, case in results['cases'].items() if 'step_s' in case} }")


if __name__ == "__main__":
    main()
