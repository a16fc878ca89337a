"""Streaming metric counts vs the per-sample NumPy loop of published referring-segmentation code.

    python benchmarks/metric_speed.py [--masks 500] [--size 480] [--batch-size 16] [--repeats 5] [--no-argmax]

Both sides get the same model outputs: one-logit masks `(N, 1, size, size)` float32 and labels `(N, size, size)`
int64 (what `CrobimUImageProcessor` and LAVT's loader produce), and must return the same oIoU, mIoU and Pr@X.

- **ours**: `ReferringSegmentationMetric.update` per batch (`logits > 0`, boolean and/or, per-sample counts).
- **published loop**: LAVT's `evaluate`/`computeIoU` (also used by RMSIN and other RRSIS code), per sample:
  `output.cpu()`, a decision, `.data.numpy()`, `np.sum(np.logical_and(...))`, `np.sum(np.logical_or(...))`, Python
  accumulation of cum_I, cum_U, the IoU list and Pr@X. Two decisions are timed:
  - `logit > 0` on the one-logit output: the cheapest per-sample decision, not in any published code; the strongest
    baseline.
  - LAVT verbatim, `output.argmax(1)` on a two-class head. The two-class logits `[0, l]` give the same decision
    (`softmax([0, l])[1] = sigmoid(l)`; a tie at `l = 0` goes to class 0) and are built outside the timed region.

Timings are medians over interleaved repeats, wall clock and process CPU time (the CPU time includes both torch
threads; it is the steadier figure when other processes share the cores). Torch keeps its default thread count.
"""

import argparse
import time

import numpy as np
import torch

from crobim_u.metrics import PRECISION_THRESHOLDS, ReferringSegmentationMetric


def synthetic_outputs(num_masks: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangle targets and noisy logits whose agreement varies from sample to sample."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(num_masks, size, size, dtype=torch.int64)
    corners = torch.randint(0, size // 2, (num_masks, 2), generator=generator)
    extents = torch.randint(size // 16, size // 2, (num_masks, 2), generator=generator)
    for label, (top, left), (height, width) in zip(labels, corners.tolist(), extents.tolist()):
        label[top : top + height, left : left + width] = 1
    noise_scale = torch.empty(num_masks, 1, 1, 1).uniform_(0.5, 6.0, generator=generator)
    logits = torch.randn(num_masks, 1, size, size, generator=generator).mul_(noise_scale)
    logits.add_(labels[:, None] * 6.0 - 3.0)
    return logits, labels


def compute_iou(pred_seg: np.ndarray, gd_seg: np.ndarray) -> tuple[int, int]:
    """LAVT's `computeIoU`."""
    I = np.sum(np.logical_and(pred_seg, gd_seg))
    U = np.sum(np.logical_or(pred_seg, gd_seg))
    return I, U


def published_loop(outputs: torch.Tensor, targets: torch.Tensor, decide) -> dict[str, float]:
    """LAVT's `evaluate` body for a loader that yields one sample at a time."""
    cum_I, cum_U = 0, 0
    mean_IoU = []
    seg_correct = np.zeros(len(PRECISION_THRESHOLDS), dtype=np.int32)
    for output, target in zip(outputs.split(1), targets.split(1)):
        target = target.cpu().data.numpy()
        output = output.cpu()
        output_mask = decide(output).data.numpy()
        I, U = compute_iou(output_mask, target)
        this_iou = 0.0 if U == 0 else I * 1.0 / U
        mean_IoU.append(this_iou)
        cum_I += I
        cum_U += U
        for n_eval_iou, eval_seg_iou in enumerate(PRECISION_THRESHOLDS):
            seg_correct[n_eval_iou] += this_iou >= eval_seg_iou
    results = {f"Pr@{x}": correct / len(mean_IoU) for x, correct in zip(PRECISION_THRESHOLDS, seg_correct)}
    results.update(oIoU=cum_I / cum_U, mIoU=np.mean(np.array(mean_IoU)))
    return results


def streaming_counts(logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[str, float]:
    metric = ReferringSegmentationMetric(empty_policy="zero")  # LAVT's rule; these targets are never empty
    for start in range(0, len(labels), batch_size):
        metric.update(logits[start : start + batch_size], labels[start : start + batch_size])
    return metric.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=500)
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-argmax", action="store_true", help="skip the (slow) verbatim LAVT argmax loop")
    args = parser.parse_args()

    logits, labels = synthetic_outputs(args.masks, args.size)
    methods = {
        "ours: streaming counts, batched torch": lambda: streaming_counts(logits, labels, args.batch_size),
        "per-sample NumPy loop, logit > 0": lambda: published_loop(logits, labels, lambda x: (x > 0).squeeze(1)),
    }
    if not args.no_argmax:
        two_class = torch.cat([torch.zeros_like(logits), logits], dim=1)
        methods["per-sample NumPy loop, LAVT argmax"] = lambda: published_loop(two_class, labels, lambda x: x.argmax(1))

    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    results = {}
    for _ in range(args.repeats):
        for name, method in methods.items():  # interleaved, so background load hits every method alike
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            results[name] = method()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)

    ours = next(iter(methods))
    for name, result in results.items():
        assert result["oIoU"] == results[ours]["oIoU"], (name, result, results[ours])
        assert all(result[f"Pr@{x}"] == results[ours][f"Pr@{x}"] for x in PRECISION_THRESHOLDS), (name, result)
        # Same per-sample IoUs; only the order of the float64 additions of the mean differs.
        assert abs(result["mIoU"] - results[ours]["mIoU"]) <= 1e-12, (name, result, results[ours])

    print(
        f"{args.masks} masks of {args.size}x{args.size}, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats} interleaved repeats"
    )
    print(f"identical: oIoU {results[ours]['oIoU']:.6f}, mIoU {results[ours]['mIoU']:.6f}, "
          f"Pr@0.5 {results[ours]['Pr@0.5']:.3f}")
    print(f"{'method':40s} {'wall s':>8s} {'CPU s':>8s} {'wall ×':>8s} {'CPU ×':>8s}")
    for name in methods:
        wall_ratio = np.median(wall[name]) / np.median(wall[ours])
        cpu_ratio = np.median(cpu[name]) / np.median(cpu[ours])
        print(
            f"{name:40s} {np.median(wall[name]):8.3f} {np.median(cpu[name]):8.3f} "
            f"{wall_ratio:7.1f}× {cpu_ratio:7.1f}×"
        )


if __name__ == "__main__":
    main()
