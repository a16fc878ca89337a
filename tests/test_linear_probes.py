"""`benchmarks/linear_probes.py`: its labels, AUROC and cell choice by hand, and a run on a tiny random model folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from crobim_u import CrobimUImageProcessor, CrobimUProcessor
from crobim_u.demo import QUICK_RECIPE, build_model_and_tokenizer


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import linear_probes  # noqa: E402


def test_comparison_labels_come_from_the_generators_phrases():
    label = linear_probes.comparison_label
    assert label("the red car to the left of the leftmost building", "relation") == "left"
    assert label("the car right of the large pond", "relation") == "right"
    assert label("the tree nearest to the blue tennis court", "relation") == "closest"
    assert label("the white plane farthest from the smallest pond", "relation") == "farthest"
    assert label("the biggest white storage tank", "size") == "larger"
    assert label("the small ship", "size") == "smaller"


def test_auroc_counts_ties_half_and_needs_both_classes():
    positive = np.array([True, True, False, False])
    assert linear_probes.auroc(np.array([3.0, 4.0, 1.0, 2.0]), positive) == 1.0
    assert linear_probes.auroc(np.array([1.0, 2.0, 3.0, 4.0]), positive) == 0.0
    assert linear_probes.auroc(np.zeros(4), positive) == 0.5
    assert math.isnan(linear_probes.auroc(np.zeros(2), np.array([True, True])))


def test_each_probe_takes_as_many_cells_on_each_side_of_a_sample():
    def mask(top, left, bottom, right):
        array = np.zeros((32, 32), np.uint8)
        array[top:bottom, left:right] = 1
        return PIL.Image.fromarray(array)

    target, lookalike = mask(0, 0, 16, 16), mask(16, 16, 24, 24)  # 4 cells and 1 cell of a 4x4 grid
    row = {
        "mask": target,
        "class_mask": PIL.Image.fromarray(np.maximum(np.asarray(target), np.asarray(lookalike))),
        "reference_mask": mask(0, 24, 5, 32),  # covers 5/8 of one cell
    }
    chosen = linear_probes.choose_cells(row, (4, 4), 0.5, 24, np.random.default_rng(0))
    assert set(chosen["target"]) <= {0, 1, 4, 5} and len(chosen["target"]) == 1
    assert chosen["lookalike"].tolist() == [10]
    assert chosen["reference"].tolist() == [3] and len(chosen["elsewhere"]) == 1
    assert chosen["elsewhere"][0] != 3


def test_probes_run_on_a_saved_tiny_model_and_write_their_results(tmp_path, capsys):
    model, tokenizer, _ = build_model_and_tokenizer(QUICK_RECIPE, "scratch")
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 128, "width": 128}), tokenizer, max_length=20)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    output = tmp_path / "probes.json"
    linear_probes.main([
        "--model", str(tmp_path / "model"), "--num-samples", "20", "--image-size", "128", "--threads", "1",
        "--cache-dir", str(tmp_path / "cache"), "--output", str(output),
    ])
    results = json.loads(output.read_text())
    assert results["num_samples"] == 20 and "linear_probes.py" in results["command"]
    assert results["model"] == str(tmp_path / "model")
    assert results["split"]["train_samples"] + results["split"]["test_samples"] == 20
    assert 0.0 <= results["mIoU"] <= 1.0
    assert sum(block["count"] for block in results["mIoU_by_comparison"].values()) == 20
    probes = results["probes"]
    assert set(probes) == {"relation_word", "landmark_place", "target_vs_lookalike", "reference_vs_elsewhere"}
    assert sum(probes["relation_word"]["classes"].values()) == 20

    sentence_stages = {"text_encoder", "capm", "mid_language"}
    # The demo's model has UGF at stride 8 and spatial pointers: every map stage and readout is there.
    map_stages = {"image_s8", "lgfa_s8", "ugf_s8", "mid_s8", "pixel_embedding"}
    assert set(results["stages"]) == sentence_stages | map_stages
    for stage, block in probes["relation_word"]["stages"].items():
        assert block["num_train"] > 0 and block["num_test"] > 0, stage
        if "skipped" not in block:
            assert 0.0 <= block["accuracy"] <= 1.0 and 0.0 < block["chance"] <= 1.0
    assert set(probes["relation_word"]["stages"]) == sentence_stages
    for stage, block in probes["landmark_place"]["stages"].items():
        assert block["num_train"] > 0 and block["num_test"] > 0, stage
        if "skipped" not in block:
            assert all(math.isfinite(block[key]) for key in ("r2", "r2_x", "r2_y")), stage
    assert "first_pointer_centre" in probes["landmark_place"]["readouts"]

    scored = 0
    for name in ("target_vs_lookalike", "reference_vs_elsewhere"):
        assert set(probes[name]["stages"]) == map_stages
        for stage, block in probes[name]["stages"].items():
            assert block["num_train"] >= 0 and block["num_test"] >= 0
            if "skipped" not in block:
                scored += 1
                assert block["num_train"] > 0 and block["num_test"] > 0
                assert 0.0 <= block["auroc"] <= 1.0, (name, stage)
                for kind in block["auroc_by_kind"].values():
                    assert kind["auroc"] is None or 0.0 <= kind["auroc"] <= 1.0
        for readout in probes[name]["readouts"].values():
            assert readout["auroc"] is None or 0.0 <= readout["auroc"] <= 1.0
    assert scored > 0  # at least one cell probe had cells on both sides in both parts
    assert set(probes["target_vs_lookalike"]["readouts"]) == {"mask_logits", "last_pointer_logits"}

    printed = capsys.readouterr().out
    assert "| capm |" in printed and "| image_s8 |" in printed and "target/look-alike AUROC by kind" in printed
