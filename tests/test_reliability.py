"""The per-answer reliability figure, how it and the score rank answers, and where it is reported (post-processing,
pipeline, `crobim-u predict`, `crobim-u evaluate`)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from helpers import WORDS, make_processor, random_image, small_dataset, tiny_model

import crobim_u
from crobim_u.cli import main
from crobim_u.data import export_folder
from crobim_u.inference.evaluation import evaluate_referring_segmentation
from crobim_u.inference.predict import RESULTS_FILE
from crobim_u.metrics import (
    average_ranks,
    iou_from_counts,
    kept_mean_iou,
    mask_reliability,
    rank_answers,
    spearman_correlation,
)


def square_mask(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


# --- the figure on hand-made maps ---------------------------------------------------------------------------------


def test_reliability_is_the_iou_the_map_expects():
    mask = square_mask(10, 4, 4, 2)  # 4 pixels
    uncertainty = torch.zeros(10, 10)
    assert mask_reliability(mask, uncertainty) == 1.0  # nothing expected wrong: (4 + 1) / (4 + 1)
    uncertainty[4, 4] = 0.5  # half a false positive inside the mask
    assert mask_reliability(mask, uncertainty) == pytest.approx((4 - 0.5 + 1) / (4 + 1))
    uncertainty[0, 0] = uncertainty[9, 9] = 1.0  # two expected misses outside, anywhere in the image
    assert mask_reliability(mask, uncertainty) == pytest.approx((4 - 0.5 + 1) / (4 + 2 + 1))


def test_the_same_expected_errors_weigh_less_on_a_larger_mask():
    small, large = square_mask(32, 10, 10, 2), square_mask(32, 10, 10, 8)
    uncertainty = torch.zeros(32, 32)
    uncertainty[0, :4] = 1.0  # four expected misses far from both masks
    assert mask_reliability(small, uncertainty) == pytest.approx(5 / 9)
    assert mask_reliability(large, uncertainty) == pytest.approx(65 / 69)


def test_empty_and_full_masks():
    uncertainty = torch.tensor([[0.0, 0.5], [1.0, 0.5]])
    empty, full = torch.zeros(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
    assert mask_reliability(empty, uncertainty) == pytest.approx(1 / 3)  # two expected misses
    assert mask_reliability(empty, torch.zeros(2, 2)) == 1.0  # nothing predicted, nothing expected missed
    assert mask_reliability(full, uncertainty) == pytest.approx((4 - 2 + 1) / (4 + 1))
    assert mask_reliability(full, torch.ones(2, 2)) == pytest.approx(1 / 5)
    # Every pixel of the mask expected wrong still leaves the +1: (1 - 1 + 1) / (1 + 3 + 1).
    assert mask_reliability(square_mask(2, 0, 0, 1), torch.full((2, 2), 1.0)) == pytest.approx(1 / 5)
    assert mask_reliability(np.ones((1, 1), dtype=bool), np.full((1, 1), 1.0)) == pytest.approx(1 / 2)


def test_reliability_accepts_numpy_float16_like_predict_writes_it():
    rng = np.random.default_rng(0)
    uncertainty = rng.random((40, 30)).astype(np.float32)
    mask = np.zeros((40, 30), dtype=bool)
    mask[10:20, 5:9] = True
    expected = mask_reliability(torch.from_numpy(mask), torch.from_numpy(uncertainty))
    assert mask_reliability(mask, uncertainty.astype(np.float16)) == pytest.approx(expected, abs=1e-3)
    assert mask_reliability(mask.astype(np.uint8), uncertainty) == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= expected <= 1.0


def test_more_uncertainty_lowers_reliability_inside_and_outside_the_mask():
    mask = square_mask(32, 10, 10, 8)
    uncertainty = torch.full((32, 32), 0.01)
    before = mask_reliability(mask, uncertainty)
    inside, outside = uncertainty.clone(), uncertainty.clone()
    inside[12, 12] = 0.9
    outside[30, 30] = 0.9
    assert mask_reliability(mask, inside) < before and mask_reliability(mask, outside) < before


@pytest.mark.parametrize(
    ("mask", "uncertainty", "message"),
    [
        (torch.zeros(4, 4), torch.zeros(4, 5), r"one size, got \(4, 4\) and \(4, 5\)"),
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), r"\(H, W\) maps"),
        (torch.zeros(0, 4), torch.zeros(0, 4), "at least one pixel"),
    ],
)
def test_reliability_errors_name_what_is_wrong(mask, uncertainty, message):
    with pytest.raises(ValueError, match=message):
        mask_reliability(mask, uncertainty)


# --- ranking answers ----------------------------------------------------------------------------------------------


def test_average_ranks_and_spearman_with_ties():
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 30, 20]), [1, 3, 3, 5, 3])
    assert spearman_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5), what scipy.stats.spearmanr gives.
    assert spearman_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman_correlation([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    assert spearman_correlation([0.1, 5, 7], [1, 2, 300]) == pytest.approx(1.0)  # ranks only
    assert math.isnan(spearman_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="one value per sample"):
        spearman_correlation([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        average_ranks([1.0, float("nan")])


IOU = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.3, 0.5, 0.7])  # mIoU 0.46


def test_rank_answers_perfect_and_reversed_signals():
    ranking = rank_answers(IOU, reliability=IOU, score=-IOU)
    assert ranking["num_samples"] == 10 and ranking["mIoU_all"] == pytest.approx(0.46)
    assert ranking["spearman_reliability"] == pytest.approx(1.0) and ranking["spearman_score"] == pytest.approx(-1.0)
    # 20% set aside = the two lowest: 0.0 and 0.1 by reliability, 1.0 and 0.8 by (reversed) score.
    assert ranking["mIoU_kept_80"] == pytest.approx(4.5 / 8)
    assert ranking["mIoU_kept_80_score"] == pytest.approx(2.8 / 8)
    assert ranking["set_aside"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert ranking["curve_reliability"][0] == ranking["curve_score"][0] == pytest.approx(0.46)
    assert ranking["curve_reliability"][-1] == pytest.approx(1.0)  # only the best answer is kept
    assert ranking["curve_score"][-1] == pytest.approx(0.0)
    assert all(np.diff(ranking["curve_reliability"]) > 0) and all(np.diff(ranking["curve_score"]) < 0)


def test_kept_mean_iou_takes_ties_across_the_cut_in_expectation():
    iou = np.array([0.9, 0.7, 0.2, 0.4, 1.0])
    signal = np.array([1.0, 1.0, 0.0, 0.0, 2.0])
    # One set aside from the tied pair (0.2, 0.4): the kept one is worth their mean, 0.3.
    assert kept_mean_iou(iou, signal, 1) == pytest.approx((1.0 + 0.9 + 0.7 + 0.3) / 4)
    assert kept_mean_iou(iou, signal, 2) == pytest.approx((1.0 + 0.9 + 0.7) / 3)
    # A constant signal ranks nothing: every curve point is the mIoU, whatever the order of the samples.
    flat = rank_answers(iou, reliability=np.ones(5), score=np.zeros(5))
    assert flat["curve_reliability"] == pytest.approx([iou.mean()] * 10)
    assert math.isnan(flat["spearman_reliability"])
    with pytest.raises(ValueError, match="keep at least one"):
        kept_mean_iou(iou, signal, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iou": [], "reliability": [], "score": []}, "non-empty"),
        ({"iou": [0.5, 0.5], "reliability": [0.1], "score": [0.1, 0.2]}, r"reliability must have one value per answer"),
        ({"iou": [0.5, 0.5], "reliability": [0.1, 0.2], "score": [0.1, float("nan")]}, "score holds NaN"),
        ({"iou": [0.5], "reliability": [0.1], "score": [0.1], "set_aside_percents": [0, 10]}, "include 20"),
    ],
)
def test_rank_answers_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_answers(**kwargs)


# --- where the figure is reported -----------------------------------------------------------------------------------


def test_post_processing_reports_the_reliability_of_each_mask():
    processor = make_processor()
    generator = torch.Generator().manual_seed(0)
    outputs = SimpleNamespace(
        logits=torch.randn(2, 1, 64, 64, generator=generator) * 4,
        uncertainty_logits=torch.randn(2, 1, 2, 2, generator=generator) * 2,
    )
    results = processor.post_process_referring_segmentation(outputs, target_sizes=[(50, 70), (64, 64)])
    for result in results:
        assert set(result) == {"mask", "probabilities", "uncertainty", "score", "reliability"}
        assert isinstance(result["reliability"], float) and 0.0 <= result["reliability"] <= 1.0
        assert result["reliability"] == mask_reliability(result["mask"], result["uncertainty"])
    without = processor.post_process_referring_segmentation(SimpleNamespace(logits=outputs.logits))
    assert [result["reliability"] for result in without] == [None, None]


def test_pipeline_carries_reliability_only_with_rus():
    processor = make_processor()
    model = tiny_model(text_config={"vocab_size": len(WORDS)})
    image = random_image(90, 70)
    result = crobim_u.referring_segmentation_pipeline(model, processor=processor)(image, "the red car")
    encoding = processor(images=image, text=["the red car"])
    sizes = encoding.pop("original_sizes")
    with torch.no_grad():
        expected = processor.post_process_referring_segmentation(model(**encoding), target_sizes=sizes)[0]
    assert result["reliability"] == pytest.approx(expected["reliability"], abs=1e-6)
    base = tiny_model(text_config={"vocab_size": len(WORDS)}, use_rus=False, use_ugf=False, use_udlr=False)
    assert crobim_u.referring_segmentation_pipeline(base, processor=processor)(image, "the car")["reliability"] is None


def test_predict_writes_reliability_in_each_record(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_model(text_config={"vocab_size": len(WORDS)}).save_pretrained(checkpoint)
    make_processor().save_pretrained(checkpoint)
    image = random_image(50, 40)
    image.save(tmp_path / "small.png")
    status = main(["predict", "--model", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--expression",
                   "the red car", "--no_progress", str(tmp_path / "small.png")])
    assert status == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / RESULTS_FILE).read_text().splitlines()]
    encoding = make_processor()(images=image, text=["the red car"])
    sizes = encoding.pop("original_sizes")
    model = crobim_u.CrobimUForReferringSegmentation.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        expected = make_processor().post_process_referring_segmentation(model(**encoding), target_sizes=sizes)[0]
    # predict keeps the uncertainty map as float16.
    assert record["reliability"] == pytest.approx(expected["reliability"], abs=2e-3)


def test_evaluation_ranks_answers_by_reliability_and_score():
    model, processor, dataset = tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor(), small_dataset()
    results = evaluate_referring_segmentation(
        model, processor, dataset, batch_size=2, progress=False, return_counts=True, reliability_metrics=True
    )
    expected_reliability, expected_score = [], []
    for row in dataset:
        encoding = processor(images=row["image"], text=row["expression"])
        sizes = encoding.pop("original_sizes")
        with torch.no_grad():
            answer = processor.post_process_referring_segmentation(model(**encoding), target_sizes=sizes)[0]
        expected_reliability.append(answer["reliability"])
        expected_score.append(answer["score"])
    np.testing.assert_allclose(results["sample_reliability"].numpy(), expected_reliability, atol=1e-6)
    np.testing.assert_allclose(results["sample_score"].numpy(), expected_score, atol=1e-6)
    iou, _ = iou_from_counts(results["intersection"], results["union"])
    expected = rank_answers(iou.numpy(), results["sample_reliability"].numpy(), results["sample_score"].numpy())
    block = results["reliability"]
    assert block["mean_reliability"] == pytest.approx(np.mean(expected_reliability))
    assert block["mIoU_all"] == pytest.approx(results["mIoU"])
    for key in ("spearman_reliability", "spearman_score", "mIoU_kept_80", "mIoU_kept_80_score"):
        assert block[key] == pytest.approx(expected[key], nan_ok=True), key
    base = tiny_model(text_config={"vocab_size": len(WORDS)}, use_rus=False, use_ugf=False, use_udlr=False)
    with pytest.raises(ValueError, match="reliability_metrics needs a model with RUS"):
        evaluate_referring_segmentation(base, processor, dataset, reliability_metrics=True, progress=False)
    assert "reliability" not in evaluate_referring_segmentation(model, processor, dataset, progress=False)


@pytest.mark.parametrize("use_rus", [True, False])
def test_evaluate_command_reports_reliability_where_there_is_uncertainty(tmp_path, capsys, use_rus):
    switches = {} if use_rus else {"use_rus": False, "use_ugf": False, "use_udlr": False}
    model, processor = tiny_model(text_config={"vocab_size": len(WORDS)}, **switches), make_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    export_folder(DatasetDict({"test": small_dataset(4).remove_columns("class_mask")}), tmp_path / "data")
    code = main(["evaluate", "--model", str(tmp_path / "model"), "--dataset", "folder", "--data_dir",
                 str(tmp_path / "data"), "--output_file", str(tmp_path / "eval.json"), "--no_progress"])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "eval.json").read_text())
    if not use_rus:
        assert "reliability" not in printed and "reliability" not in record
        return
    assert "reliability: mean" in printed and "Spearman with IoU" in printed
    block = record["reliability"]
    assert 0.0 <= block["mean_reliability"] <= 1.0 and block["num_samples"] == 4
    assert len(block["curve_reliability"]) == len(block["set_aside"]) == 10
