"""`crobim-u evaluate` and the evaluation loop behind it."""

import json

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from helpers import WORDS, make_processor, small_dataset, tiny_model

from crobim_u.cli import main
from crobim_u.data import export_folder
from crobim_u.inference.evaluation import evaluate_reference_masks, evaluate_referring_segmentation
from crobim_u.metrics import METRIC_ORDER, ReferringSegmentationMetric


def direct_scores(model, processor, dataset):
    """Per-sample IoU computed the plain way: one sample at a time, at its original size."""
    intersections, unions = [], []
    for row in dataset:
        inputs = processor(images=row["image"], text=row["expression"])
        sizes = inputs.pop("original_sizes")
        with torch.no_grad():
            logits = model(**inputs).logits
        mask = processor.post_process_referring_segmentation(
            type("O", (), {"logits": logits, "uncertainty_logits": None})(), target_sizes=sizes
        )[0]["mask"].numpy()
        truth = np.asarray(row["mask"]) > 0
        intersections.append((mask & truth).sum())
        unions.append((mask | truth).sum())
    ious = np.array(intersections) / np.array(unions)
    return {"oIoU": sum(intersections) / sum(unions), "mIoU": ious.mean(), "Pr@0.5": (ious >= 0.5).mean()}


def test_evaluation_matches_a_plain_per_sample_loop():
    model, processor, dataset = tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor(), small_dataset()
    results = evaluate_referring_segmentation(model, processor, dataset, batch_size=2, progress=False)
    expected = direct_scores(model, processor, dataset)
    assert results["num_samples"] == 5
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-9), key


def test_evaluation_runs_the_model_without_building_a_graph():
    model, processor, dataset = tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor(), small_dataset()
    grad_enabled = []
    model.register_forward_hook(lambda module, args, output: grad_enabled.append(torch.is_grad_enabled()))
    evaluate_referring_segmentation(model, processor, dataset, batch_size=2, progress=False)
    assert grad_enabled == [False] * 3  # 5 samples in batches of 2


def test_per_sample_counts_score_a_subset_like_running_the_model_on_it():
    model, processor, dataset = tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor(), small_dataset()
    everything = evaluate_referring_segmentation(model, processor, dataset, batch_size=2, progress=False,
                                                 return_counts=True)
    assert everything["intersection"].shape == everything["union"].shape == (5,)
    subset = [0, 2, 3]
    metric = ReferringSegmentationMetric()
    metric.add_counts(everything["intersection"][subset], everything["union"][subset])
    direct = evaluate_referring_segmentation(model, processor, dataset.select(subset), progress=False)
    assert metric.compute() == direct


def test_uncertainty_metrics_need_rus_and_lie_in_range():
    dataset, processor = small_dataset(3), make_processor()
    with_rus = tiny_model(text_config={"vocab_size": len(WORDS)})
    results = evaluate_referring_segmentation(with_rus, processor, dataset, uncertainty_metrics=True, progress=False)
    assert 0.0 <= results["auroc"] <= 1.0 and 0.0 <= results["ece"] <= 1.0 and results["aurc"] >= 0.0
    without = tiny_model(text_config={"vocab_size": len(WORDS)}, use_rus=False, use_ugf=False, use_udlr=False)
    with pytest.raises(ValueError, match="needs a model with RUS"):
        evaluate_referring_segmentation(without, processor, dataset, uncertainty_metrics=True, progress=False)


def test_reference_masks_are_scored_with_the_same_metrics():
    dataset = small_dataset(4)
    perfect = evaluate_reference_masks(dataset.map(lambda row: {"answer": row["mask"]}, features=None), "answer")
    assert perfect["mIoU"] == 1.0 and perfect["oIoU"] == 1.0
    class_only = evaluate_reference_masks(dataset, "class_mask")
    assert 0.0 < class_only["mIoU"] < 1.0
    with pytest.raises(ValueError, match="no column 'nothing'"):
        evaluate_reference_masks(dataset, "nothing")


def test_evaluate_command_prints_the_table_and_writes_json(tmp_path, capsys):
    model, processor = tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    dataset = small_dataset().remove_columns("class_mask")
    export_folder(DatasetDict({"test": dataset}), tmp_path / "data")

    code = main(["evaluate", "--model", str(tmp_path / "model"), "--dataset", "folder", "--data_dir",
                 str(tmp_path / "data"), "--split", "test", "--batch_size", "2", "--uncertainty_metrics",
                 "--output_file", str(tmp_path / "eval.json"), "--no_progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Pr@0.5" in printed and "oIoU" in printed and "5 samples" in printed
    assert "AUROC" in printed
    record = json.loads((tmp_path / "eval.json").read_text())
    assert set(METRIC_ORDER) <= set(record) and record["num_samples"] == 5
    expected = evaluate_referring_segmentation(model, processor, dataset, progress=False)
    for key in METRIC_ORDER:
        assert record[key] == pytest.approx(expected[key], abs=1e-12)


def test_evaluate_command_names_a_missing_split(tmp_path):
    model, processor = tiny_model(text_config={"vocab_size": len(WORDS)}), make_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    export_folder(DatasetDict({"test": small_dataset(2).remove_columns("class_mask")}), tmp_path / "data")
    with pytest.raises(SystemExit, match="split 'validation' not in the data set"):
        main(["evaluate", "--model", str(tmp_path / "model"), "--dataset", "folder", "--data_dir",
              str(tmp_path / "data"), "--split", "validation"])
