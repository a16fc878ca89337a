"""Scoring a model (or a reference answer such as the class-only masks) on a referring-segmentation split."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from tqdm.auto import tqdm

from ..image_processing_crobim_u import resize_logits
from ..metrics import (
    ReferringSegmentationMetric,
    UncertaintyQualityMetric,
    intersection_and_union,
    iou_from_counts,
    rank_answers,
)
from .parallel import gather_shares, own_share

# Samples per forward pass: the default of [`evaluate_referring_segmentation`] and `crobim-u evaluate --batch_size`.
DEFAULT_BATCH_SIZE = 8


def _mask_tensor(mask: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask) > 0)


def _uncertainty_quality(
    metric: UncertaintyQualityMetric, shares: list[list[torch.Tensor]], probability_sums: list[list[float]]
) -> dict[str, Any]:
    """AUROC, AURC and ECE from every process's integer histograms and the per-sample probability sums."""
    if shares:
        uncertainty_histogram = sum(share[0] for share in shares)
        foreground_histogram = sum(share[1] for share in shares)
        # Added sample by sample in data set order, as one process adds them: the float sums come out the same.
        total = torch.zeros(metric.num_calibration_bins, dtype=torch.float64)
        for sample_sums in probability_sums:
            total = total + torch.tensor(sample_sums, dtype=torch.float64)
        metric.add_histograms(uncertainty_histogram, foreground_histogram, total)
    return metric.compute()


def _reliability_block(
    iou: torch.Tensor, scored: torch.Tensor, reliabilities: torch.Tensor, scores: torch.Tensor
) -> dict[str, float]:
    """How well each answer's reliability and score rank the answers by IoU (samples without an IoU left out)."""
    scored = scored.numpy()
    return {
        "mean_reliability": float(np.mean(reliabilities.numpy())),
        "mean_score": float(np.mean(scores.numpy())),
        **rank_answers(iou.numpy()[scored], reliabilities.numpy()[scored], scores.numpy()[scored]),
    }


@torch.no_grad()
def evaluate_referring_segmentation(
    model: torch.nn.Module,
    processor: Any,
    dataset: Dataset,
    batch_size: int = DEFAULT_BATCH_SIZE,
    size: int | None = None,
    strict: bool = False,
    uncertainty_metrics: bool = False,
    progress: bool = True,
    return_counts: bool = False,
    return_risk_coverage: bool = False,
    reliability_metrics: bool = False,
    state: PartialState | None = None,
) -> dict[str, Any]:
    """
    Runs `model` over `dataset` and scores it with the field's metrics, streaming per-sample counts.

    Each prediction is upsampled to its ground truth's original size (or, with `size`, both are resized to
    `size × size`) before counting, so the numbers do not depend on the model's input resolution.

    With a `state` of several processes, each process runs a contiguous share of the batches, and the per-sample
    counts of every process are gathered and added in data set order: every process returns the metrics of a
    one-process run, bit for bit (the batches are those of one process, so each sample's forward pass is too).

    Args:
        model ([`CrobimUForReferringSegmentation`]): The model, in eval mode on its device.
        processor ([`CrobimUProcessor`]): Prepares images and expressions.
        dataset (`datasets.Dataset`): Canonical records (`image`, `mask`, `expression`).
        batch_size (`int`, *optional*, defaults to 8): Expressions per forward pass.
        size (`int`, *optional*): Score at a fixed square resolution instead of the original one.
        strict (`bool`, *optional*, defaults to `False`): Pr@X counts `IoU > X` instead of `IoU ≥ X`.
        uncertainty_metrics (`bool`, *optional*, defaults to `False`): Also compute AUROC, AURC and ECE of the
            uncertainty map (models with RUS only; at the original resolution).
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar (on the main process only).
        return_counts (`bool`, *optional*, defaults to `False`): Also return the per-sample `intersection` and
            `union` counts (int64 tensors in data set order), so subsets can be scored without running the model
            again (see [`~crobim_u.metrics.ReferringSegmentationMetric.add_counts`]).
        return_risk_coverage (`bool`, *optional*, defaults to `False`): With `uncertainty_metrics`, also return the
            risk–coverage curve as `risk_coverage`, a `(coverage, risk)` pair of NumPy arrays.
        reliability_metrics (`bool`, *optional*, defaults to `False`): Also rank the answers by their reliability
            and by their score, as post-processing reports them at the original resolution (models with RUS only):
            `reliability`, the block of [`~crobim_u.metrics.rank_answers`] against the per-sample IoU, plus
            `mean_reliability` and `mean_score`; with `return_counts` also the per-sample `sample_reliability` and
            `sample_score` (float64 tensors).
        state (`accelerate.PartialState`, *optional*): The processes to share the data set between (see
            [`~crobim_u.inference.parallel.process_state`]); every one of them must call this function. By default
            this process does everything.

    Returns:
        `dict`: `oIoU`, `mIoU`, `Pr@0.5` … `Pr@0.9` (fractions), `num_samples`, with `uncertainty_metrics` also
        `auroc`, `aurc`, `ece`, with `reliability_metrics` also `reliability`, and with `return_counts` also
        `intersection` and `union`.
    """
    if uncertainty_metrics and not model.config.use_rus:
        raise ValueError("uncertainty_metrics needs a model with RUS (config.use_rus=True).")
    if reliability_metrics and not model.config.use_rus:
        raise ValueError("reliability_metrics needs a model with RUS (config.use_rus=True).")
    device = next(model.parameters()).device
    uncertainty_metric = UncertaintyQualityMetric() if uncertainty_metrics else None
    # Whole batches are shared out, not samples: a sample's forward pass then sees the same batch (padding, shapes)
    # as in one process, and its counts are the same.
    starts = own_share(range(0, len(dataset), batch_size), state)
    is_main = state is None or state.is_main_process
    samples = []  # per sample: intersection, union and, for the uncertainty metrics, its probability sums
    reliability_and_score = []  # per sample, with reliability_metrics
    integer_histograms = None  # summed here: integer counts add up exactly in any order
    for start in tqdm(starts, desc="evaluate", disable=not progress or not is_main, unit="batch"):
        rows = dataset[start : start + batch_size]
        inputs = processor(images=rows["image"], text=rows["expression"])
        inputs.pop("original_sizes")
        outputs = model(**{key: value.to(device) for key, value in inputs.items()})
        for index, mask in enumerate(rows["mask"]):
            labels = _mask_tensor(mask).to(device)[None]
            logits = outputs.logits[index : index + 1]
            intersection, union = intersection_and_union(logits, labels, size=size)
            sample = [int(intersection.item()), int(union.item())]
            if uncertainty_metric is not None:
                full_size = tuple(labels.shape[-2:])
                probabilities = torch.sigmoid(resize_logits(logits[0], full_size)[None])
                uncertainty = torch.sigmoid(resize_logits(outputs.uncertainty_logits[index], full_size)[None])
                *histograms, probability_sums = uncertainty_metric.histograms(probabilities, uncertainty, labels)
                histograms = [histogram.cpu() for histogram in histograms]
                if integer_histograms is not None:
                    histograms = [total + histogram for total, histogram in zip(integer_histograms, histograms)]
                integer_histograms = histograms
                sample.append(probability_sums.cpu().tolist())
            if reliability_metrics:
                # The figures post-processing reports for this answer, at its original size.
                answer = processor.post_process_referring_segmentation(
                    SimpleNamespace(logits=logits, uncertainty_logits=outputs.uncertainty_logits[index : index + 1]),
                    target_sizes=[tuple(labels.shape[-2:])],
                )[0]
                reliability_and_score.append((answer["reliability"], answer["score"]))
            samples.append(sample)
    samples = gather_shares(samples, state)
    reliability_and_score = gather_shares(reliability_and_score, state)
    # Counts are added sample by sample in data set order, as one process adds them: float sums come out the same.
    metric = ReferringSegmentationMetric(size=size, strict=strict)
    intersections = torch.tensor([sample[0] for sample in samples], dtype=torch.int64)
    unions = torch.tensor([sample[1] for sample in samples], dtype=torch.int64)
    for index in range(len(samples)):
        metric.add_counts(intersections[index : index + 1], unions[index : index + 1])
    results = metric.compute()
    if uncertainty_metric is not None:
        shares = [share for share in gather_shares([integer_histograms], state) if share is not None]
        quality = _uncertainty_quality(uncertainty_metric, shares, [sample[2] for sample in samples])
        results.update(auroc=quality["auroc"], aurc=quality["aurc"], ece=quality["ece"])
        if return_risk_coverage:
            results["risk_coverage"] = quality["risk_coverage"]
    if reliability_metrics:
        iou, scored = iou_from_counts(intersections, unions, metric.empty_policy)
        reliabilities = torch.tensor([reliability for reliability, _ in reliability_and_score], dtype=torch.float64)
        scores = torch.tensor([score for _, score in reliability_and_score], dtype=torch.float64)
        results["reliability"] = _reliability_block(iou, scored, reliabilities, scores)
        if return_counts:
            results.update(sample_reliability=reliabilities, sample_score=scores)
    if return_counts:
        results.update(intersection=intersections, union=unions)
    return results


def evaluate_reference_masks(
    dataset: Dataset, column: str, size: int | None = None, strict: bool = False, return_counts: bool = False
) -> dict[str, Any]:
    """
    Scores fixed answers stored in the data set, e.g. the synthetic benchmark's `class_mask` (every object of the
    referred class), with the same metrics as [`evaluate_referring_segmentation`].

    Args:
        dataset (`datasets.Dataset`): Records with `mask` and `column`.
        column (`str`): The column holding the answer masks.
        size (`int`, *optional*): Score at a fixed square resolution.
        strict (`bool`, *optional*, defaults to `False`): Pr@X counts `IoU > X`.
        return_counts (`bool`, *optional*, defaults to `False`): Also return the per-sample `intersection` and
            `union` counts, as [`evaluate_referring_segmentation`] does.
    """
    if column not in dataset.column_names:
        raise ValueError(f"The data set has no column {column!r}; columns: {dataset.column_names}.")
    metric = ReferringSegmentationMetric(size=size, strict=strict)
    intersections, unions = [], []
    for row in dataset.select_columns(["mask", column]):
        intersection, union = metric.update(_mask_tensor(row[column])[None], _mask_tensor(row["mask"])[None])
        intersections.append(intersection)
        unions.append(union)
    results = metric.compute()
    if return_counts:
        results.update(intersection=torch.cat(intersections), union=torch.cat(unions))
    return results
