"""Throughput of the synthetic data generator, in samples per second.

    python benchmarks/synthetic_throughput.py [--num-samples 600] [--image-size 256] [--num-proc 1 2]

Measures `generate_sample` alone at each difficulty, then `load_synthetic` end to end (generation,
JPEG/PNG encoding, Arrow writing) into a fresh cache folder, so nothing is served from a cache.
CPU milliseconds per sample are printed beside the wall-clock rate: the rate depends on what else runs
on the machine (the load average is printed), the CPU time much less.
"""

import argparse
import os
import resource
import tempfile
import time

import datasets

from crobim_u.data.synthetic import DIFFICULTIES, generate_sample, load_synthetic


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers of `num_proc`)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    datasets.disable_progress_bars()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}, image size: {args.image_size}")

    generate_sample(0, args.image_size)  # warm the per-process texture caches
    for difficulty in DIFFICULTIES:
        n = args.num_samples // 3
        wall, cpu = time.perf_counter(), cpu_seconds()
        for i in range(n):
            generate_sample(i, args.image_size, difficulty)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        print(f"generate_sample  {difficulty:<6} {n / wall:7.1f} samples/s  {1000 * cpu / n:5.2f} CPU ms/sample")

    for num_proc in args.num_proc:
        with tempfile.TemporaryDirectory() as cache_dir:
            wall, cpu = time.perf_counter(), cpu_seconds()
            load_synthetic(args.num_samples, 0, 0, args.image_size, cache_dir=cache_dir, num_proc=num_proc)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        print(
            f"load_synthetic   num_proc={num_proc} {args.num_samples / wall:7.1f} samples/s  "
            f"{1000 * cpu / args.num_samples:5.2f} CPU ms/sample (medium, encoding and writing included)"
        )


if __name__ == "__main__":
    main()
