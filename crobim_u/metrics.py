"""Referring-segmentation metrics from per-sample counts, and uncertainty-quality metrics.

Field definitions (names collide across papers, so every number here is defined by its formula):

- per sample i: `I_i = |P_i ∧ G_i|`, `U_i = |P_i ∨ G_i|`, `IoU_i = I_i / U_i`;
- **oIoU** (a.k.a. cIoU, overall or cumulative IoU) `= ΣI / ΣU`;
- **mIoU** `= mean_i IoU_i` (per sample, not per class);
- **Pr@X** `=` share of samples with `IoU_i ≥ X` (or `> X` with `strict=True`), X ∈ {0.5, …, 0.9}.

Predictions are foreground where `logit > 0`, i.e. `sigmoid(logit) > 0.5`; the logit form is used because in
float32 `sigmoid(x)` rounds to exactly 0.5 for `0 < x < 9e-8`. Everything is streamed: masks are reduced to
two integer counts per sample (or to fixed histograms for the uncertainty metrics) as soon as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

# Defined beside the post-processing that reports it (that file travels with every checkpoint); re-exported here.
from .image_processing_crobim_u import mask_reliability, resize_logits


EmptyPolicy = Literal["one", "zero", "skip"]
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_ORDER = tuple(f"Pr@{x}" for x in PRECISION_THRESHOLDS) + ("oIoU", "mIoU")
# Shares of the answers set aside (least reliable first) on the selective-prediction curve, in percent.
SET_ASIDE_PERCENTS = tuple(range(0, 100, 10))


def _as_batch(tensor: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) -> (B, H, W)."""
    if tensor.ndim == 4:
        if tensor.shape[1] != 1:
            raise ValueError(f"Expected one channel, got shape {tuple(tensor.shape)}.")
        return tensor[:, 0]
    if tensor.ndim != 3:
        raise ValueError(f"Expected (B, 1, H, W) or (B, H, W), got shape {tuple(tensor.shape)}.")
    return tensor


def _count_per_sample(masks: torch.Tensor) -> torch.Tensor:
    """True pixels per sample of (B, H, W) masks, as int64."""
    # An int32 sum runs ~2x faster on CPU than count_nonzero or an int64 sum; exact below 2**31 pixels per mask.
    return masks.sum(dim=(-2, -1), dtype=torch.int32).long()


def resize_scores_or_masks(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a batch of scores or masks for scoring.

    Args:
        tensor (`torch.Tensor` of shape `(B, H, W)`):
            Floating scores (logits or probabilities) or boolean masks.
        size (`tuple[int, int]`):
            Target `(height, width)`.

    Returns:
        `torch.Tensor` of shape `(B, *size)` and the input dtype. Scores are resized bilinearly
        (`align_corners=False`, no antialiasing) so the threshold is applied at the target resolution; masks use
        `nearest-exact`, which samples pixel centres like PIL's `NEAREST` used by the image processor.
    """
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    if tensor.dtype == torch.bool:
        resized = F.interpolate(tensor[:, None].to(torch.uint8), size=size, mode="nearest-exact")
        return resized[:, 0].bool()
    # The B samples go through as channels of one image: the same arithmetic per plane as one image each.
    return resize_logits(tensor, size)


def intersection_and_union(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.0,
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union pixel counts.

    Args:
        predictions (`torch.Tensor` of shape `(B, 1, H, W)` or `(B, H, W)`):
            Logits or probabilities (floating; foreground where `> threshold`), or masks (bool, or integer with
            foreground `> 0`).
        labels (`torch.Tensor` of shape `(B, 1, H', W')` or `(B, H', W')`):
            Ground truth, foreground where `> 0` (so the Trainer's `-100` padding counts as background).
        threshold (`float`, *optional*, defaults to 0.0):
            Applied to floating predictions: 0.0 for logits, 0.5 for probabilities.
        size (`int`, *optional*):
            `None` scores at the labels' resolution (predictions are resized to it when they differ); an integer
            resizes predictions and labels to `size × size` first (480 in most published code). Scores are resized
            bilinearly, masks and labels by nearest neighbour (see [`resize_scores_or_masks`]).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: intersection and union, int64 of shape `(B,)`, on the predictions'
        device.
    """
    predictions, labels = _as_batch(predictions), _as_batch(labels) > 0
    if not (predictions.is_floating_point() or predictions.dtype == torch.bool):
        predictions = predictions > 0
    target_size = tuple(labels.shape[-2:]) if size is None else (size, size)
    predictions = resize_scores_or_masks(predictions, target_size)
    labels = resize_scores_or_masks(labels.to(predictions.device), target_size)
    if predictions.is_floating_point():
        predictions = predictions > threshold
    return _count_per_sample(predictions & labels), _count_per_sample(predictions | labels)


def _check_empty_policy(empty_policy: str) -> None:
    if empty_policy not in ("one", "zero", "skip"):
        raise ValueError(f"empty_policy must be 'one', 'zero' or 'skip', got {empty_policy!r}.")


def iou_from_counts(
    intersection: torch.Tensor, union: torch.Tensor, empty_policy: EmptyPolicy = "one"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample IoU with an explicit rule for samples whose prediction and ground truth are both empty.

    Args:
        intersection (`torch.Tensor` of shape `(B,)`): Intersection counts.
        union (`torch.Tensor` of shape `(B,)`): Union counts.
        empty_policy (`str`, *optional*, defaults to `"one"`):
            IoU of an empty-union sample: `"one"` (an empty prediction for an empty target is a perfect answer, as in
            generalized referring segmentation), `"zero"` (what LAVT-derived code does: `if U == 0: iou = 0`), or
            `"skip"` (left out of mIoU and Pr@X). Expressions in RefSegRS, RRSIS-D and RISBench each refer to an
            object, so the policy matters only where a target is empty (or vanishes in a fixed-size resize).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: IoU (float64, `(B,)`) and a boolean `(B,)` mask of scored samples.
    """
    _check_empty_policy(empty_policy)
    empty = union == 0
    # float64: I/U is then correctly rounded, so a tie such as 7/10 compares equal to the literal 0.7.
    iou = intersection.double() / union.clamp(min=1).double()
    iou = torch.where(empty, 1.0 if empty_policy == "one" else 0.0, iou)
    scored = ~empty if empty_policy == "skip" else torch.ones_like(empty)
    return iou, scored


class ReferringSegmentationMetric:
    """Streaming oIoU, mIoU and Pr@X: keeps running sums on the counts' device, never masks.

    Args:
        threshold (`float`, *optional*, defaults to 0.0):
            Foreground threshold for floating predictions (0.0 for logits, 0.5 for probabilities).
        size (`int`, *optional*):
            Scoring resolution: `None` for the labels' (original) resolution, or a fixed square size such as 480.
        strict (`bool`, *optional*, defaults to `False`):
            Count a sample in Pr@X when `IoU > X` instead of `IoU ≥ X`.
        empty_policy (`str`, *optional*, defaults to `"one"`):
            See [`iou_from_counts`]. If every union is empty, oIoU (0/0) follows the same policy (`"skip"`: NaN).
        thresholds (`Sequence[float]`, *optional*, defaults to `(0.5, 0.6, 0.7, 0.8, 0.9)`):
            The X of Pr@X.
    """

    def __init__(
        self,
        threshold: float = 0.0,
        size: int | None = None,
        strict: bool = False,
        empty_policy: EmptyPolicy = "one",
        thresholds: Sequence[float] = PRECISION_THRESHOLDS,
    ):
        _check_empty_policy(empty_policy)
        self.threshold = threshold
        self.size = size
        self.strict = strict
        self.empty_policy = empty_policy
        self.thresholds = tuple(thresholds)
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        # [ΣI, ΣU, number scored, hits at each threshold]; the IoU sum needs float64 of its own.
        self._counts = torch.zeros(3 + len(self.thresholds), dtype=torch.int64)
        self._iou_sum = torch.zeros((), dtype=torch.float64)

    def add_counts(self, intersection: torch.Tensor, union: torch.Tensor) -> None:
        """Add per-sample counts, e.g. from [`intersection_and_union`] or another process.

        Args:
            intersection (`torch.Tensor` of shape `(B,)`): Intersection counts.
            union (`torch.Tensor` of shape `(B,)`): Union counts.
        """
        iou, scored = iou_from_counts(intersection, union, self.empty_policy)
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64, device=iou.device)
        hit = iou[:, None] > thresholds if self.strict else iou[:, None] >= thresholds
        hits = (hit & scored[:, None]).sum(dim=0)
        batch = torch.cat([torch.stack([intersection.sum(), union.sum(), scored.sum()]), hits])
        # Sums stay on the counts' device (no host sync per batch on an accelerator) and are replaced, not updated in
        # place, so updates under `torch.inference_mode` and outside it can follow each other.
        self._counts = self._counts.to(iou.device) + batch
        self._iou_sum = self._iou_sum.to(iou.device) + iou[scored].sum()

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch; see [`intersection_and_union`] for the accepted inputs.

        Returns:
            `tuple(torch.Tensor, torch.Tensor)`: the batch's per-sample intersection and union counts.
        """
        intersection, union = intersection_and_union(predictions, labels, self.threshold, self.size)
        self.add_counts(intersection, union)
        return intersection, union

    def compute(self) -> dict[str, float]:
        """Metrics over every sample added since the last reset.

        Returns:
            `dict[str, float]`: `oIoU`, `mIoU` and `Pr@X` as fractions in [0, 1], plus `num_samples` (samples scored
            in mIoU and Pr@X). With no scored sample, mIoU and Pr@X are NaN.
        """
        counts = self._counts.cpu().tolist()
        total_intersection, total_union, num_scored, hits = counts[0], counts[1], counts[2], counts[3:]
        nan = float("nan")
        if total_union > 0:
            overall_iou = total_intersection / total_union
        else:  # every union empty: 0/0 follows the per-sample policy
            overall_iou = {"one": 1.0, "zero": 0.0, "skip": nan}[self.empty_policy]
        metrics = {f"Pr@{x}": hit / num_scored if num_scored else nan for x, hit in zip(self.thresholds, hits)}
        mean_iou = self._iou_sum.item() / num_scored if num_scored else nan
        metrics.update(oIoU=overall_iou, mIoU=mean_iou, num_samples=num_scored)
        return metrics


def build_compute_metrics(**metric_kwargs) -> Callable[..., dict[str, float]]:
    """A `compute_metrics` for `transformers.Trainer` with `batch_eval_metrics=True`.

    The Trainer calls it once per evaluation batch with `EvalPrediction(predictions=logits, label_ids=labels)` as
    tensors on the device, and `compute_result=True` on the last batch (accelerate's `end_of_dataloader`). Counts
    accumulate across calls; the last call returns the metrics and resets, ready for the next evaluation. Because
    `compute_result` defaults to `True`, the same callable also works with `batch_eval_metrics=False` (one call
    with every prediction, as NumPy arrays).

    Args:
        **metric_kwargs: Passed to [`ReferringSegmentationMetric`] (`threshold`, `size`, `strict`, ...).

    Returns:
        `Callable[[EvalPrediction, bool], dict[str, float]]`: empty dicts for intermediate batches, then the
        metrics of [`ReferringSegmentationMetric.compute`].
    """
    metric = ReferringSegmentationMetric(**metric_kwargs)

    def compute_metrics(eval_pred, compute_result: bool = True) -> dict[str, float]:
        logits = eval_pred.predictions
        # Models returning several tensors (logits, coarse_logits, uncertainty_logits) arrive as a tuple.
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        metric.update(torch.as_tensor(logits), torch.as_tensor(eval_pred.label_ids))
        if not compute_result:
            return {}
        metrics = metric.compute()
        metric.reset()
        return metrics

    return compute_metrics


def format_metric_table(metrics: Mapping[str, float] | Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """The table referring-segmentation papers print: Pr@0.5 … Pr@0.9, oIoU, mIoU in percent.

    Args:
        metrics (`dict[str, float]` or `Sequence[tuple[str, dict[str, float]]]`):
            Fractions as returned by [`ReferringSegmentationMetric.compute`], or `(label, metrics)` pairs for a table
            of several rows, each led by its label (e.g. a model beside a reference).

    Returns:
        `str`: a Markdown table, a header, a rule and one row per metrics dict, values with two decimals.
    """
    labelled = not isinstance(metrics, Mapping)
    rows = list(metrics) if labelled else [("", metrics)]
    width = len("100.00")
    label_width = max(len(label) for label, _ in rows)

    def line(label: str, cells: list[str]) -> str:
        return "| " + " | ".join(([label.ljust(label_width)] if labelled else []) + cells) + " |"

    rule = (["-" * (label_width + 2)] if labelled else []) + ["-" * (width + 1) + ":"] * len(METRIC_ORDER)
    return "\n".join([
        line("", [name.rjust(width) for name in METRIC_ORDER]),
        "|" + "|".join(rule) + "|",
        *(line(label, [f"{100 * values[name]:.2f}".rjust(width) for name in METRIC_ORDER]) for label, values in rows),
    ])


def auroc_from_histograms(correct: torch.Tensor, errors: torch.Tensor) -> float:
    """AUROC of a score for detecting errors, from per-bin counts (bins in increasing score order).

    Equals the Mann–Whitney probability that an error pixel scores above a correct one, with pairs that share a bin
    counted as ties (1/2). NaN when either class is absent.

    Args:
        correct (`torch.Tensor` of shape `(num_bins,)`): Correct pixels per bin.
        errors (`torch.Tensor` of shape `(num_bins,)`): Error pixels per bin.

    Returns:
        `float`: the AUROC in [0, 1].
    """
    correct, errors = correct.double(), errors.double()
    errors_above = errors.flip(0).cumsum(0).flip(0) - errors
    pairs = correct.sum() * errors.sum()
    return ((correct * (errors_above + 0.5 * errors)).sum() / pairs).item() if pairs > 0 else float("nan")


def risk_coverage_from_histograms(
    correct: torch.Tensor, errors: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, float]:
    """Risk–coverage curve and its area, keeping the least uncertain pixels first.

    Coverage c is the share of pixels kept and risk the error rate among them. AURC is the mean selective risk over
    the N coverage levels k/N (Geifman et al., 2019), `AURC = (1/N) Σ_k risk(k)`, with pixels that share a bin taken
    in random order: within a bin with `n` pixels and error rate `e`, after `K` kept pixels with `E` errors, the
    expected risks sum to `n·e + (E − e·K)·(ψ(K+n+1) − ψ(K+1))` (ψ the digamma function).

    Args:
        correct (`torch.Tensor` of shape `(num_bins,)`): Correct pixels per bin, bins in increasing uncertainty.
        errors (`torch.Tensor` of shape `(num_bins,)`): Error pixels per bin.

    Returns:
        `tuple(np.ndarray, np.ndarray, float)`: coverage (from 1 down to the first bin's share), risk at each
        coverage, and AURC (NaN without pixels).
    """
    correct, errors = correct.double().cpu(), errors.double().cpu()
    counts = correct + errors
    kept, kept_errors = counts.cumsum(0), errors.cumsum(0)
    total = kept[-1]
    if total == 0:
        return np.ones(0), np.ones(0), float("nan")
    before, errors_before = kept - counts, kept_errors - errors
    rate = errors / counts.clamp(min=1)
    digamma = torch.special.digamma
    harmonic = digamma(before + counts + 1) - digamma(before + 1)
    aurc = ((counts * rate + (errors_before - rate * before) * harmonic).sum() / total).item()
    nonempty = counts > 0
    coverage = (kept / total)[nonempty].flip(0).numpy()
    risk = (kept_errors / kept.clamp(min=1))[nonempty].flip(0).numpy()
    return coverage, risk, aurc


def ece_from_histograms(
    counts: torch.Tensor, probability_sums: torch.Tensor, foreground: torch.Tensor
) -> float:
    """Expected calibration error from per-bin sums: `Σ_b (n_b/N)·|mean p_b − foreground frequency_b|`.

    Args:
        counts (`torch.Tensor` of shape `(num_bins,)`): Pixels per probability bin.
        probability_sums (`torch.Tensor` of shape `(num_bins,)`): Sum of predicted foreground probabilities per bin.
        foreground (`torch.Tensor` of shape `(num_bins,)`): Ground-truth foreground pixels per bin.

    Returns:
        `float`: ECE in [0, 1] (NaN without pixels).
    """
    total = counts.sum().item()
    return ((probability_sums.double() - foreground.double()).abs().sum() / total).item() if total else float("nan")


class UncertaintyQualityMetric:
    """Streaming quality of an uncertainty map and calibration of mask probabilities, from fixed histograms.

    - **AUROC**: pixel-level, uncertainty as a score for the model's own errors (error = predicted mask ≠ ground
      truth, predicted mask = probability > `threshold`). 1 = errors rank above every correct pixel, 0.5 = chance.
    - **Risk–coverage / AURC**: drop the most uncertain pixels first; risk = error rate of the kept pixels
      (see [`risk_coverage_from_histograms`]). Lower is better.
    - **ECE**: binary calibration of the foreground probability p itself (not of the top-label confidence
      max(p, 1 − p)): equal-width bins over p, `ECE = Σ_b (n_b/N)·|mean p_b − share of foreground pixels in b|`.

    Uncertainty and probability are binned at `1/num_bins` and `1/num_calibration_bins`; AUROC and AURC are exact up
    to ties inside one bin. Values outside [0, 1] fall in the end bins.

    Args:
        num_bins (`int`, *optional*, defaults to 1000): Uncertainty histogram bins.
        num_calibration_bins (`int`, *optional*, defaults to 15): Probability bins of the ECE.
        threshold (`float`, *optional*, defaults to 0.5): Foreground threshold on the probabilities.
    """

    def __init__(self, num_bins: int = 1000, num_calibration_bins: int = 15, threshold: float = 0.5):
        self.num_bins = num_bins
        self.num_calibration_bins = num_calibration_bins
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self._uncertainty_histogram = torch.zeros(self.num_bins, 2, dtype=torch.int64)  # [correct, error]
        self._foreground_histogram = torch.zeros(self.num_calibration_bins, 2, dtype=torch.int64)  # [bg, fg]
        self._probability_sums = torch.zeros(self.num_calibration_bins, dtype=torch.float64)

    @staticmethod
    def _bin(values: torch.Tensor, num_bins: int) -> torch.Tensor:
        return (values * num_bins).long().clamp_(0, num_bins - 1)

    def update(self, probabilities: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of pixels.

        Args:
            probabilities (`torch.Tensor` of shape `(B, 1, H, W)` or `(B, H, W)`): Foreground probabilities.
            uncertainty (`torch.Tensor`, same shape): Uncertainty in [0, 1], already at the labels' size.
            labels (`torch.Tensor` of shape `(B, H, W)` or `(B, 1, H, W)`): Ground truth, foreground where `> 0`.
        """
        self.add_histograms(*self.histograms(probabilities, uncertainty, labels))

    def histograms(
        self, probabilities: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's histograms, not yet added (see [`update`] for the arguments).

        Returns:
            `tuple(torch.Tensor, torch.Tensor, torch.Tensor)`: the uncertainty histogram `(num_bins, 2)` (correct,
            error) and the foreground histogram `(num_calibration_bins, 2)` (background, foreground), int64, and the
            probability sums per calibration bin `(num_calibration_bins,)`, float64, on the batch's device.
        """
        probabilities = _as_batch(probabilities).flatten()
        device = probabilities.device
        uncertainty = _as_batch(uncertainty).flatten().to(device)
        labels = (_as_batch(labels) > 0).flatten().to(device)
        errors = (probabilities > self.threshold) != labels
        # One bincount per histogram: the class rides in the lowest bit of the bin index.
        uncertainty_bins = self._bin(uncertainty, self.num_bins)
        uncertainty_histogram = torch.bincount(2 * uncertainty_bins + errors, minlength=2 * self.num_bins)
        probability_bins = self._bin(probabilities, self.num_calibration_bins)
        foreground_histogram = torch.bincount(2 * probability_bins + labels, minlength=2 * self.num_calibration_bins)
        probability_sums = torch.bincount(
            probability_bins, weights=probabilities.double(), minlength=self.num_calibration_bins
        )
        return uncertainty_histogram.view(-1, 2), foreground_histogram.view(-1, 2), probability_sums

    def add_histograms(
        self, uncertainty_histogram: torch.Tensor, foreground_histogram: torch.Tensor, probability_sums: torch.Tensor
    ) -> None:
        """Add histograms from [`histograms`], e.g. those another process computed.

        The counts are integers, exact in any order; the float64 probability sums are exact only when added in the
        same order, so add them sample by sample in data set order to reproduce a one-process run bit for bit.
        """
        device = uncertainty_histogram.device
        # Replaced rather than updated in place, on the batch's device (see `ReferringSegmentationMetric.add_counts`).
        self._uncertainty_histogram = self._uncertainty_histogram.to(device) + uncertainty_histogram
        self._foreground_histogram = self._foreground_histogram.to(device) + foreground_histogram.to(device)
        self._probability_sums = self._probability_sums.to(device) + probability_sums.to(device)

    def compute(self) -> dict:
        """Metrics over every pixel added since the last reset.

        Returns:
            `dict`: `auroc`, `aurc`, `ece` (floats) and `risk_coverage`, a `(coverage, risk)` pair of NumPy arrays
            with coverage decreasing from 1.
        """
        correct, errors = self._uncertainty_histogram.cpu().unbind(dim=1)
        coverage, risk, aurc = risk_coverage_from_histograms(correct, errors)
        foreground_histogram = self._foreground_histogram.cpu()
        ece = ece_from_histograms(
            foreground_histogram.sum(dim=1), self._probability_sums.cpu(), foreground_histogram[:, 1]
        )
        return {
            "auroc": auroc_from_histograms(correct, errors),
            "aurc": aurc,
            "ece": ece,
            "risk_coverage": (coverage, risk),
        }


def average_ranks(values: "np.ndarray | Sequence[float]") -> np.ndarray:
    """Ranks 1..n of `values` (ascending), tied values sharing the mean of the ranks they span.

    Args:
        values (array-like of shape `(n,)`): Finite numbers.

    Returns:
        `np.ndarray` of shape `(n,)`, float64.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"Expected a 1-D array, got shape {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError("average_ranks needs finite values, got NaN or Inf.")
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def spearman_correlation(x: "np.ndarray | Sequence[float]", y: "np.ndarray | Sequence[float]") -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (ties averaged, as SciPy does).

    Returns:
        `float` in [-1, 1]; NaN with fewer than two samples or where either input is constant.
    """
    x_ranks, y_ranks = average_ranks(x), average_ranks(y)
    if len(x_ranks) != len(y_ranks):
        raise ValueError(f"x and y must have one value per sample, got {len(x_ranks)} and {len(y_ranks)}.")
    x_ranks, y_ranks = x_ranks - x_ranks.mean(), y_ranks - y_ranks.mean()
    denominator = np.sqrt((x_ranks**2).sum() * (y_ranks**2).sum())
    return float((x_ranks * y_ranks).sum() / denominator) if denominator > 0 else float("nan")


def kept_mean_iou(iou: np.ndarray, signal: np.ndarray, num_set_aside: int) -> float:
    """mIoU of the answers kept when the `num_set_aside` answers with the lowest `signal` are set aside.

    Answers tied on `signal` across the cut are taken in random order, in expectation: the kept share of a tied group
    contributes that group's mean IoU, so the result does not depend on how a sort breaks ties (e.g. the score 0.0 of
    every empty mask).
    """
    num_kept = len(iou) - num_set_aside
    if not 0 < num_kept <= len(iou):
        raise ValueError(f"Cannot set aside {num_set_aside} of {len(iou)} answers and keep at least one.")
    order = np.argsort(-signal, kind="stable")
    ordered_signal, ordered_iou = signal[order], iou[order]
    cut = ordered_signal[num_kept - 1]
    above, tied = ordered_signal > cut, ordered_signal == cut
    kept_tied = num_kept - int(above.sum())
    return float((ordered_iou[above].sum() + kept_tied * ordered_iou[tied].mean()) / num_kept)


def rank_answers(
    iou: "np.ndarray | Sequence[float]",
    reliability: "np.ndarray | Sequence[float]",
    score: "np.ndarray | Sequence[float]",
    set_aside_percents: Sequence[int] = SET_ASIDE_PERCENTS,
) -> dict:
    """How well two per-answer signals rank answers by quality: `reliability` (from the uncertainty map, see
    [`mask_reliability`]) against `score`, the baseline (mean probability inside the predicted mask).

    One answer is one (image, expression) pair. For each signal: Spearman's correlation with the answer's IoU, and
    the selective-prediction curve, the mIoU of the answers kept when the `x`% with the lowest signal are set aside
    (`floor(x * n / 100)` answers; ties across the cut in random order, in expectation, see [`kept_mean_iou`]). A
    signal that ranks answers well has a positive correlation and a rising curve.

    Args:
        iou (array-like of shape `(n,)`): Per-answer IoU, e.g. from [`iou_from_counts`].
        reliability (array-like of shape `(n,)`): Per-answer reliability, higher = more reliable.
        score (array-like of shape `(n,)`): Per-answer score, higher = more confident.
        set_aside_percents (`Sequence[int]`, *optional*, defaults to 0, 10, ..., 90):
            Integer percentages of answers set aside on the curves; must include 20.

    Returns:
        `dict`: `num_samples`; `mIoU_all`; `spearman_reliability` and `spearman_score`; `mIoU_kept_80` and
        `mIoU_kept_80_score` (20% set aside by reliability, by score); `set_aside` (fractions) and the curves
        `curve_reliability` and `curve_score` (mIoU kept at each).
    """
    iou = np.asarray(iou, dtype=np.float64)
    signals = {"reliability": np.asarray(reliability, dtype=np.float64), "score": np.asarray(score, dtype=np.float64)}
    if iou.ndim != 1 or len(iou) == 0:
        raise ValueError(f"iou must be a non-empty 1-D array, got shape {iou.shape}.")
    for name, values in signals.items():
        if values.shape != iou.shape:
            raise ValueError(f"{name} must have one value per answer: expected shape {iou.shape}, got {values.shape}.")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or Inf.")
    percents = [int(percent) for percent in set_aside_percents]
    if 20 not in percents or any(not 0 <= percent < 100 for percent in percents):
        raise ValueError(f"set_aside_percents must lie in [0, 100) and include 20, got {list(set_aside_percents)}.")
    curves = {
        name: [kept_mean_iou(iou, values, percent * len(iou) // 100) for percent in percents]
        for name, values in signals.items()
    }
    at_20 = percents.index(20)
    return {
        "num_samples": len(iou),
        "mIoU_all": float(iou.mean()),
        "spearman_reliability": spearman_correlation(signals["reliability"], iou),
        "spearman_score": spearman_correlation(signals["score"], iou),
        "mIoU_kept_80": curves["reliability"][at_20],
        "mIoU_kept_80_score": curves["score"][at_20],
        "set_aside": [percent / 100 for percent in percents],
        "curve_reliability": curves["reliability"],
        "curve_score": curves["score"],
    }
