"""Shared helpers of the speed and memory benchmarks: environment record, interleaved timing, FLOPs, tensor memory.

Every script records the machine, the library versions, the command and the load average next to its figures, and
times the cases it compares in interleaved rounds (A, B, C, A, B, C, ...): other processes on a shared machine then
slow every case alike, and the ratios measured within one run hold better than the absolute times.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# FlopCounterMode knows the CUDA attention kernels only: count the CPU one with the same formulas.
aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad_out, query, key, value
        )
    ),
}


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_revision() -> str | None:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return revision + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Machine, versions, threads and load: what a reader needs to compare a figure with their own."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "flush_denormal": False,
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "crobim_u": package_version("crobim-u"),
        "git": git_revision(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def summarize(samples: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, min and max of the timed repeats (warm-up excluded), and the repeats themselves."""
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "runs": len(samples),
        "samples": [round(sample, digits) for sample in samples],
    }


def time_interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, synchronize: Callable[[], None] | None = None
) -> dict[str, dict[str, list[float]]]:
    """
    Runs every case once per round, `warmup` rounds untimed and then `repeats` timed rounds.

    Returns, per case, `{"wall": [...], "cpu": [...], "load": [...]}` (seconds per repeat; process CPU seconds,
    which count every torch thread; the 1-minute load average after each repeat).
    """
    synchronize = synchronize or (lambda: None)
    for _ in range(warmup):
        for case in cases.values():
            case()
        synchronize()
    results = {name: {"wall": [], "cpu": [], "load": []} for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            synchronize()
            wall, cpu = time.perf_counter(), cpu_seconds()
            case()
            synchronize()
            results[name]["wall"].append(time.perf_counter() - wall)
            results[name]["cpu"].append(cpu_seconds() - cpu)
            results[name]["load"].append(os.getloadavg()[0])
    return results


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    """Per-round ratios `numerator[i] / denominator[i]` (the two ran back to back) and the ratio of the medians."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    summary = summarize(per_round)
    summary["of_medians"] = round(statistics.median(numerator) / statistics.median(denominator), 4)
    return summary


def matmul_case(size: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Callable, float]:
    """A `size`^3 matrix product and its FLOP count (2 per multiply-add), to time beside a model."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * size**3


def count_flops(function: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """
    FLOPs of one call (matrix products, convolutions and attention, 2 per multiply-add; elementwise work, norms and
    softmax are not counted), in total and per top-level submodule.
    """
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        function()
    # Per child of the top module; a container that is never called itself (a ModuleDict) has no entry, so its
    # children at the next level are summed instead.
    depth_and_flops: dict[str, tuple[int, int]] = {}
    for name, counts in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        depth, flops = depth_and_flops.get(parts[1], (len(parts), 0))
        if len(parts) < depth:
            depth, flops = len(parts), 0
        if len(parts) == depth:
            depth_and_flops[parts[1]] = (depth, flops + int(sum(counts.values())))
    return int(counter.get_total_flops()), {name: flops for name, (_, flops) in depth_and_flops.items()}


class TensorMemory(TorchDispatchMode):
    """
    Peak bytes of the tensors that the ops run under this mode create and keep alive at once (activations, outputs,
    gradients, optimizer states), above what was alive before it started (parameters, inputs).

    Each op's output storages are counted once, when created, and uncounted when freed. Scratch memory that an op
    allocates and frees inside itself, allocator caching and fragmentation are not seen: the process's resident
    memory grows by more.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        # Views and in-place results share an input's storage: nothing new was allocated (this also keeps the
        # weights, seen first through `weight.t()`, out of the count).
        inputs = {
            id(tensor.untyped_storage())
            for tensor in tree_leaves((args, kwargs))
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta
        }
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                storage = tensor.untyped_storage()
                if id(storage) not in inputs and storage not in self._counted:
                    nbytes = storage.nbytes()
                    self._counted.add(storage)
                    weakref.finalize(storage, self._free, nbytes)
                    self.live += nbytes
        self.peak = max(self.peak, self.live)
        return output


def peak_tensor_bytes(function: Callable[[], Any]) -> int:
    with TensorMemory() as tracker:
        function()
    return tracker.peak


def reset_peak_rss() -> bool:
    """Resets the process's resident-memory high-water mark (Linux `clear_refs`); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def write_results(name: str, data: dict[str, Any], output: str | os.PathLike | None, quick: bool) -> Path:
    """Writes `benchmarks/results/<name>.json` (`<name>-quick.json` for `--quick`) or `output`; returns the path."""
    path = Path(output) if output else RESULTS / f"{name}{'-quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data.setdefault("environment", {})["load_average_end"] = load_average()
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
