"""How well can a mask head at stride s draw the demo's targets, even when it is perfect?

    python benchmarks/mask_stride_ceiling.py [--num-test 300] [--image-size 160] [--difficulty medium] [--seed 0]

For every sample of the synthetic test split (the demo's size; `--difficulty easy` for the demo's data), the true
mask is reduced to a stride-s map holding each cell's share of target pixels (a perfect coarse prediction),
upsampled bilinearly to the input size as the model upsamples its logits, and thresholded at one half. The scores
of these masks are the ceiling of a head at that stride that decides by `probability > 0.5` from a bilinear
upsampling; the table also gives the target-size percentiles and the class-only reference for comparison.
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from crobim_u.data.synthetic import load_synthetic
from crobim_u.inference.evaluation import evaluate_reference_masks
from crobim_u.metrics import METRIC_ORDER, ReferringSegmentationMetric


STRIDES = (8, 4, 2, 1)


def ceiling_masks(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """`(H, W)` binary mask -> what a perfect stride-`stride` map gives after bilinear upsampling and `> 0.5`."""
    if stride == 1:
        return mask.bool()
    share = F.avg_pool2d(mask[None, None].float(), stride)
    upsampled = F.interpolate(share, size=mask.shape, mode="bilinear", align_corners=False)
    return upsampled[0, 0] > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--difficulty", default="medium")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the figures to this JSON file")
    args = parser.parse_args()

    test = load_synthetic(
        num_train=0, num_validation=0, num_test=args.num_test, image_size=args.image_size,
        difficulty=args.difficulty, seed=args.seed,
    )["test"]
    masks = [torch.from_numpy(np.array(image) > 0) for image in test["mask"]]
    areas = np.array([int(mask.sum()) for mask in masks])
    results = {"target_area_percentiles": dict(zip(("p10", "p25", "p50", "p75", "p90"),
                                                   np.percentile(areas, [10, 25, 50, 75, 90]).tolist()))}
    for stride in STRIDES:
        metric = ReferringSegmentationMetric()
        for mask in masks:
            prediction = ceiling_masks(mask, stride)
            metric.add_counts((prediction & mask).sum()[None], (prediction | mask).sum()[None])
        results[f"stride {stride}"] = metric.compute()
    results["class-only"] = evaluate_reference_masks(test, "class_mask")

    print(f"synthetic test split: {len(test)} samples, {args.image_size}x{args.image_size}, {args.difficulty}; "
          f"target area percentiles (pixels) {results['target_area_percentiles']}")
    print("| perfect head at | " + " | ".join(METRIC_ORDER) + " |")
    print("|---|" + "---:|" * len(METRIC_ORDER))
    for name in (*(f"stride {stride}" for stride in STRIDES), "class-only"):
        print(f"| {name} | " + " | ".join(f"{100 * results[name][key]:.2f}" for key in METRIC_ORDER) + " |")
    if args.output:
        with open(args.output, "w") as file:
            json.dump({"args": vars(args), **results}, file, indent=2)


if __name__ == "__main__":
    main()
