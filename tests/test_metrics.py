import itertools
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from crobim_u.metrics import (
    ReferringSegmentationMetric,
    UncertaintyQualityMetric,
    build_compute_metrics,
    format_metric_table,
    intersection_and_union,
    iou_from_counts,
    risk_coverage_from_histograms,
)


MODULE_DIR = Path(__file__).resolve().parents[1] / "metrics" / "referring_segmentation"
KEYS = {"oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "num_samples"}


def masks(*rows: str) -> torch.Tensor:
    """One (H, W) boolean mask from strings such as "1100"."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def metrics_of(predictions, labels, **kwargs) -> dict:
    metric = ReferringSegmentationMetric(**kwargs)
    metric.update(predictions, labels)
    return metric.compute()


def random_batch(batch_size=6, size=24, seed=0):
    """Logits (B, 1, H, W) that agree with box-shaped labels (B, H, W) to a varying degree."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch_size, size, size, dtype=torch.int64)
    for i in range(batch_size):
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        labels[i, top : top + size // 2, left : left + size // 3] = 1
    noise = torch.randn(batch_size, 1, size, size, generator=generator)
    return (2 * labels[:, None].float() - 1) + 1.5 * noise, labels


# --- counts -------------------------------------------------------------------------------------------------------


def test_counts_of_hand_made_masks():
    prediction = masks("1100", "1100", "0000")
    label = masks("0110", "0110", "0110")
    intersection, union = intersection_and_union(prediction[None], label[None])
    assert intersection.tolist() == [2] and union.tolist() == [8]
    assert intersection.dtype == union.dtype == torch.int64


@pytest.mark.parametrize(
    "predictions, kwargs",
    [
        (torch.tensor([[[3.0, 0.1], [0.0, -2.0]]]), {}),  # logits: foreground where > 0 (0.0 is background)
        (torch.tensor([[[[3.0, 0.1], [0.0, -2.0]]]]), {}),  # (B, 1, H, W)
        (torch.tensor([[[0.9, 0.6], [0.5, 0.1]]]), {"threshold": 0.5}),  # probabilities
        (torch.tensor([[[1, 1], [0, 0]]]), {}),  # integer 0/1 masks
        (torch.tensor([[[True, True], [False, False]]]), {}),
    ],
)
def test_input_forms_agree(predictions, kwargs):
    labels = torch.tensor([[[1, 0], [1, 0]]])
    intersection, union = intersection_and_union(predictions, labels, **kwargs)
    assert intersection.tolist() == [1] and union.tolist() == [3]


def test_padding_label_counts_as_background():
    # The Trainer pads labels with -100 across processes; padded logits are -100 too.
    predictions = torch.tensor([[[5.0, -100.0]]])
    labels = torch.tensor([[[1, -100]]])
    assert [t.tolist() for t in intersection_and_union(predictions, labels)] == [[1], [1]]


def test_batched_equals_per_sample():
    logits, labels = random_batch()
    batched = ReferringSegmentationMetric()
    batched.update(logits, labels)
    per_sample = ReferringSegmentationMetric()
    for i in range(len(labels)):
        per_sample.update(logits[i : i + 1], labels[i : i + 1])
    assert batched.compute() == pytest.approx(per_sample.compute(), rel=1e-12)  # mIoU: float sums in another order
    assert 0 < batched.compute()["mIoU"] < 1


def test_state_made_in_inference_mode_accepts_later_updates():
    logits, labels = random_batch()
    probabilities, uncertainty = torch.sigmoid(logits), torch.rand(labels.shape)
    with torch.inference_mode():
        metric, quality_metric = ReferringSegmentationMetric(), UncertaintyQualityMetric()
        metric.update(logits[:3], labels[:3])
        quality_metric.update(probabilities[:3], uncertainty[:3], labels[:3])
    metric.update(logits[3:], labels[3:])
    quality_metric.update(probabilities[3:], uncertainty[3:], labels[3:])
    assert metric.compute() == pytest.approx(metrics_of(logits, labels), rel=1e-12)
    expected_ece = quality(probabilities, uncertainty, labels)["ece"]
    assert quality_metric.compute()["ece"] == pytest.approx(expected_ece, rel=1e-12)


# --- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_of_hand_computed_counts():
    metric = ReferringSegmentationMetric()
    # IoUs 1/2, 3/5, 9/10, 0/4: oIoU = 13/21, mIoU = 2/4.
    metric.add_counts(torch.tensor([1, 3, 9, 0]), torch.tensor([2, 5, 10, 4]))
    result = metric.compute()
    assert set(result) == KEYS
    assert result["oIoU"] == 13 / 21
    assert result["mIoU"] == pytest.approx(0.5, abs=1e-15)
    assert [result[f"Pr@{x}"] for x in (0.5, 0.6, 0.7, 0.8, 0.9)] == [0.75, 0.5, 0.25, 0.25, 0.25]
    assert result["num_samples"] == 4


def test_compute_accumulates_until_reset():
    metric = ReferringSegmentationMetric()
    metric.add_counts(torch.tensor([1]), torch.tensor([2]))
    metric.add_counts(torch.tensor([3]), torch.tensor([3]))
    assert metric.compute()["oIoU"] == 4 / 5
    metric.reset()
    metric.add_counts(torch.tensor([0]), torch.tensor([3]))
    assert metric.compute()["oIoU"] == 0.0 and metric.compute()["num_samples"] == 1


@pytest.mark.parametrize("strict, expected", [(False, 1.0), (True, 0.0)])
def test_tie_at_threshold(strict, expected):
    # IoU exactly 0.5 (1/2) and exactly 0.7 (7/10): ≥ counts them, strict > does not.
    result = metrics_of(masks("11")[None], masks("10")[None], strict=strict)
    assert result["Pr@0.5"] == expected
    metric = ReferringSegmentationMetric(strict=strict)
    metric.add_counts(torch.tensor([7]), torch.tensor([10]))
    assert metric.compute()["Pr@0.7"] == expected


EMPTY = masks("00", "00")
FULL = masks("11", "10")


@pytest.mark.parametrize(
    "policy, expected_iou, expected_scored", [("one", 1.0, True), ("zero", 0.0, True), ("skip", 0.0, False)]
)
def test_empty_union_policies(policy, expected_iou, expected_scored):
    predictions = torch.stack([EMPTY, EMPTY, FULL])
    labels = torch.stack([EMPTY, FULL, EMPTY])  # both empty, prediction empty, ground truth empty
    iou, scored = iou_from_counts(*intersection_and_union(predictions, labels), empty_policy=policy)
    assert iou.tolist() == [expected_iou, 0.0, 0.0]
    assert scored.tolist() == [expected_scored, True, True]


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("one", {"mIoU": 1 / 3, "Pr@0.9": 1 / 3, "num_samples": 3}),
        ("zero", {"mIoU": 0.0, "Pr@0.9": 0.0, "num_samples": 3}),
        ("skip", {"mIoU": 0.0, "Pr@0.9": 0.0, "num_samples": 2}),
    ],
)
def test_empty_union_policies_in_metrics(policy, expected):
    predictions = torch.stack([EMPTY, EMPTY, FULL])
    labels = torch.stack([EMPTY, FULL, EMPTY])
    result = metrics_of(predictions, labels, empty_policy=policy)
    assert {key: result[key] for key in expected} == expected
    assert result["oIoU"] == 0.0  # empty unions add nothing to ΣI and ΣU


@pytest.mark.parametrize("policy, expected", [("one", 1.0), ("zero", 0.0), ("skip", None)])
def test_all_empty(policy, expected):
    result = metrics_of(torch.stack([EMPTY, EMPTY]), torch.stack([EMPTY, EMPTY]), empty_policy=policy)
    if expected is None:
        assert math.isnan(result["oIoU"]) and math.isnan(result["mIoU"]) and result["num_samples"] == 0
    else:
        assert result["oIoU"] == result["mIoU"] == result["Pr@0.9"] == expected


def test_unknown_empty_policy_is_refused():
    with pytest.raises(ValueError, match="empty_policy"):
        metrics_of(EMPTY[None], EMPTY[None], empty_policy="nan")


# --- resolution ---------------------------------------------------------------------------------------------------


def test_fixed_size_agrees_when_masks_scale_exactly():
    # 2×2-block masks at 8×8 halve exactly to 4×4: every count quarters, the metrics stay the same.
    prediction = masks("1100", "1100", "0011", "0000").repeat_interleave(2, 0).repeat_interleave(2, 1)
    label = masks("1000", "1100", "0010", "0010").repeat_interleave(2, 0).repeat_interleave(2, 1)
    logits = torch.where(prediction, 4.0, -4.0)[None, None]
    original = intersection_and_union(logits, label[None])
    resized = intersection_and_union(logits, label[None], size=4)
    assert original[0].tolist() == [16] and original[1].tolist() == [28]
    assert resized[0].tolist() == [4] and resized[1].tolist() == [7]
    assert metrics_of(logits, label[None]) == metrics_of(logits, label[None], size=4)


def test_fixed_size_differs_on_thin_structures():
    # A one-pixel line on an even row vanishes when 8×8 is sampled at 4×4 (pixel centres fall on odd rows).
    label = torch.zeros(8, 8, dtype=torch.bool)
    label[2, :] = True
    prediction = label.clone()
    prediction[3, :] = True
    original = metrics_of(prediction[None], label[None])
    resized = metrics_of(prediction[None], label[None], size=4)
    assert original["oIoU"] == 0.5
    assert resized["oIoU"] == 0.0


def test_predictions_are_resized_to_label_size():
    # Logits at 2×2 scored against 4×4 labels: bilinear upsampling, then the threshold.
    logits = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]])
    labels = torch.tensor([[[1, 1, 0, 0]] * 4])
    intersection, union = intersection_and_union(logits, labels)
    assert intersection.tolist() == [8] and union.tolist() == [8]


# --- Trainer ------------------------------------------------------------------------------------------------------


class EvalPrediction:
    def __init__(self, predictions, label_ids):
        self.predictions, self.label_ids = predictions, label_ids


def test_compute_metrics_batch_convention():
    logits, labels = random_batch(batch_size=7)
    compute_metrics = build_compute_metrics()
    expected = metrics_of(logits, labels)
    for start in range(0, 7, 3):  # batches of 3, 3, 1; the tuple carries extra outputs after the logits
        stop = min(start + 3, 7)
        outputs = (logits[start:stop], torch.zeros(stop - start, 1, 2, 2))
        result = compute_metrics(EvalPrediction(outputs, labels[start:stop]), compute_result=stop == 7)
        assert result == ({} if stop < 7 else pytest.approx(expected, rel=1e-12))
    # State was reset: a second evaluation starts from zero. NumPy inputs (batch_eval_metrics=False) work too.
    assert compute_metrics(EvalPrediction(logits[:2].numpy(), labels[:2].numpy())) == metrics_of(logits[:2], labels[:2])


class TinySegmenter(nn.Module):
    """Returns its input image as logits, like a segmentation model with loss, logits and uncertainty outputs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pixel_values, labels=None):
        logits = self.scale * pixel_values
        loss = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        return {"loss": loss, "logits": logits, "uncertainty_logits": logits[:, :, ::4, ::4]}


def test_trainer_batch_eval_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    logits, labels = random_batch(batch_size=7)
    dataset = [{"pixel_values": x, "labels": y} for x, y in zip(logits, labels)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, batch_eval_metrics=True, report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(model=TinySegmenter(), args=args, eval_dataset=dataset, compute_metrics=build_compute_metrics())
    expected = metrics_of(logits, labels)
    for _ in range(2):  # the second evaluation must not see the first one's samples
        result = trainer.evaluate()
        assert {key: result[f"eval_{key}"] for key in KEYS} == pytest.approx(expected)
    assert expected["num_samples"] == 7


def test_format_metric_table():
    metrics = {"Pr@0.5": 1.0, "Pr@0.6": 0.5, "Pr@0.7": 1 / 3, "Pr@0.8": 0.12345, "Pr@0.9": 0.0}
    table = format_metric_table({**metrics, "oIoU": 0.7381, "mIoU": 0.600849, "num_samples": 3})
    assert table.splitlines() == [
        "| Pr@0.5 | Pr@0.6 | Pr@0.7 | Pr@0.8 | Pr@0.9 |   oIoU |   mIoU |",
        "|-------:|-------:|-------:|-------:|-------:|-------:|-------:|",
        "| 100.00 |  50.00 |  33.33 |  12.35 |   0.00 |  73.81 |  60.08 |",
    ]


def test_format_metric_table_leads_labelled_rows_with_their_label():
    model = {"Pr@0.5": 1.0, "Pr@0.6": 0.5, "Pr@0.7": 1 / 3, "Pr@0.8": 0.12345, "Pr@0.9": 0.0, "oIoU": 0.7381,
             "mIoU": 0.600849}
    reference = {name: 0.25 for name in model}
    table = format_metric_table([("model, test (3)", model), ("class-only, test (3)", reference)])
    assert table.splitlines() == [
        "|                      | Pr@0.5 | Pr@0.6 | Pr@0.7 | Pr@0.8 | Pr@0.9 |   oIoU |   mIoU |",
        "|----------------------|-------:|-------:|-------:|-------:|-------:|-------:|-------:|",
        "| model, test (3)      | 100.00 |  50.00 |  33.33 |  12.35 |   0.00 |  73.81 |  60.08 |",
        "| class-only, test (3) |  25.00 |  25.00 |  25.00 |  25.00 |  25.00 |  25.00 |  25.00 |",
    ]
    # The unlabelled table is the labelled one without its first column.
    assert format_metric_table(model).splitlines()[2] == "| " + table.splitlines()[2].split(" | ", 1)[1]


# --- evaluate module ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("path", [MODULE_DIR, MODULE_DIR / "referring_segmentation.py"])
def test_evaluate_module_matches_functions(path, tmp_path, no_network):
    import evaluate

    module = evaluate.load(str(path), cache_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    predictions, references = [], []
    for height, width in [(5, 7), (12, 9), (4, 4), (3, 3)]:
        references.append((rng.random((height, width)) > 0.5).astype(np.int64))
        predictions.append((rng.random((height, width)) > 0.4).astype(np.uint8))
    predictions[-1][:] = 0  # an empty union
    references[-1][:] = 0
    for prediction, reference in zip(predictions[:2], references[:2]):
        module.add_batch(predictions=[prediction], references=[reference])
    result = module.compute(predictions=predictions[2:], references=references[2:], empty_policy="zero")

    expected = ReferringSegmentationMetric(empty_policy="zero")
    for prediction, reference in zip(predictions, references):
        expected.update(torch.from_numpy(prediction)[None], torch.from_numpy(reference)[None])
    assert result == expected.compute()
    assert result["num_samples"] == 4 and 0 < result["oIoU"] < 1


def test_evaluate_module_options(tmp_path, no_network):
    import evaluate

    module = evaluate.load(str(MODULE_DIR), cache_dir=str(tmp_path))
    prediction, reference = np.array([[1, 1]]), np.array([[1, 0]])
    assert module.compute(predictions=[prediction], references=[reference])["Pr@0.5"] == 1.0
    assert module.compute(predictions=[prediction], references=[reference], strict=True)["Pr@0.5"] == 0.0
    empty = np.zeros((2, 2))
    assert math.isnan(module.compute(predictions=[empty], references=[empty], empty_policy="skip")["mIoU"])
    reference = np.zeros((8, 8), dtype=bool)
    reference[2] = True
    prediction = reference.copy()
    prediction[3] = True
    assert module.compute(predictions=[prediction], references=[reference])["oIoU"] == 0.5
    assert module.compute(predictions=[prediction], references=[reference], size=4)["oIoU"] == 0.0


# --- uncertainty quality ------------------------------------------------------------------------------------------


def exact_auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mann–Whitney AUROC with average ranks for ties."""
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = average_rank[inverse]
    num_positive, num_negative = positives.sum(), (~positives).sum()
    return (ranks[positives].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)


def exact_aurc(uncertainty: np.ndarray, errors: np.ndarray) -> float:
    """Mean selective risk, keeping the least uncertain pixels first."""
    order = np.argsort(uncertainty, kind="stable")
    risk = np.cumsum(errors[order]) / np.arange(1, len(order) + 1)
    return risk.mean()


def uncertainty_case(size=256, seed=0):
    """Probabilities, labels and the resulting error map on a (2, size, size) batch."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.rand(2, 1, size, size, generator=generator)
    labels = (torch.rand(2, size, size, generator=generator) < probabilities[:, 0]).long()
    errors = (probabilities[:, 0] > 0.5) != labels.bool()
    return probabilities, labels, errors, generator


def quality(probabilities, uncertainty, labels, **kwargs) -> dict:
    metric = UncertaintyQualityMetric(**kwargs)
    metric.update(probabilities, uncertainty, labels)
    return metric.compute()


def test_auroc_extremes_and_chance():
    probabilities, labels, errors, generator = uncertainty_case()
    assert quality(probabilities, errors.float(), labels)["auroc"] == 1.0
    assert quality(probabilities, 1 - errors.float(), labels)["auroc"] == 0.0
    random = torch.rand(errors.shape, generator=generator)
    assert quality(probabilities, random, labels)["auroc"] == pytest.approx(0.5, abs=0.01)


def test_auroc_and_aurc_match_exact_references():
    probabilities, labels, errors, generator = uncertainty_case()
    # An informative but imperfect uncertainty: errors score higher on average.
    uncertainty = (0.35 * errors.float() + 0.65 * torch.rand(errors.shape, generator=generator)).clamp(0, 1)
    result = quality(probabilities, uncertainty, labels)
    scores, positives = uncertainty.flatten().numpy(), errors.flatten().numpy()
    reference_auroc = exact_auroc(scores, positives)
    assert 0.6 < reference_auroc < 0.95
    assert result["auroc"] == pytest.approx(reference_auroc, abs=1e-4)  # only ties inside a 1/1000 bin differ
    assert result["aurc"] == pytest.approx(exact_aurc(scores, positives.astype(float)), abs=1e-4)


def test_aurc_with_ties_is_the_expectation_over_orders():
    # Two bins, [correct, error] = [2, 1] and [1, 2]: average the exact AURC over every order within each bin.
    correct, errors = torch.tensor([2, 1]), torch.tensor([1, 2])
    low_bin, high_bin = set(itertools.permutations([0, 0, 1])), set(itertools.permutations([0, 1, 1]))
    values = [exact_aurc(np.arange(6), np.array(low + high, float)) for low in low_bin for high in high_bin]
    assert risk_coverage_from_histograms(correct, errors)[2] == pytest.approx(np.mean(values), abs=1e-12)


def test_risk_coverage_curve():
    probabilities, labels, errors, generator = uncertainty_case()
    perfect = quality(probabilities, errors.float() * 0.5 + 0.25, labels)
    random = quality(probabilities, torch.rand(errors.shape, generator=generator), labels)
    constant = quality(probabilities, torch.full(errors.shape, 0.3), labels)
    error_rate = errors.float().mean().item()
    assert perfect["aurc"] < random["aurc"]
    assert random["aurc"] == pytest.approx(error_rate, abs=0.01)
    assert constant["aurc"] == pytest.approx(error_rate, abs=1e-12)
    coverage, risk = perfect["risk_coverage"]
    assert coverage[0] == 1.0 and risk[0] == pytest.approx(error_rate)
    assert np.all(np.diff(coverage) < 0)
    assert coverage[-1] == pytest.approx(1 - error_rate) and risk[-1] == 0.0  # only the correct pixels are left


def test_ece_of_calibrated_and_overconfident_probabilities():
    probabilities, labels, errors, _ = uncertainty_case(size=512)
    uncertainty = torch.zeros_like(probabilities)
    calibrated = quality(probabilities, uncertainty, labels)["ece"]
    sharpened = torch.sigmoid(4 * torch.logit(probabilities))  # same mask, overconfident probabilities
    overconfident = quality(sharpened, uncertainty, labels)["ece"]
    assert calibrated < 0.005
    assert overconfident > 0.1


def test_ece_hand_computed():
    # Bins of width 0.5: [0.1, 0.2] with no foreground (|0.15 - 0| × 2) and [0.9, 0.7] with one (|0.8 - 0.5| × 2).
    probabilities = torch.tensor([[[0.1, 0.2, 0.9, 0.7]]])
    labels = torch.tensor([[[0, 0, 1, 0]]])
    result = quality(probabilities, torch.zeros_like(probabilities), labels, num_calibration_bins=2)
    assert result["ece"] == pytest.approx((0.15 * 2 + 0.3 * 2) / 4)


def test_uncertainty_metric_streams():
    probabilities, labels, errors, generator = uncertainty_case(size=64)
    uncertainty = torch.rand(errors.shape, generator=generator)
    whole = quality(probabilities, uncertainty, labels)
    metric = UncertaintyQualityMetric()
    for i in range(2):
        metric.update(probabilities[i : i + 1], uncertainty[i : i + 1], labels[i : i + 1])
    streamed = metric.compute()
    assert {k: streamed[k] for k in ("auroc", "aurc")} == {k: whole[k] for k in ("auroc", "aurc")}  # integer histograms
    assert streamed["ece"] == pytest.approx(whole["ece"], rel=1e-12)
    metric.reset()
    assert math.isnan(metric.compute()["auroc"])
