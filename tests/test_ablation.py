"""The ablation study's script: aggregation, tables, and a smoke run of every stage."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from crobim_u.configuration_crobim_u import LIGHTER_PATH_CHOICES


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ablation():
    # Imported by name from its folder, so that the spawned worker processes can import it too.
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("ablation")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def fake_run(ablation, variant: str, seed: int, value: float, auroc: float | None = None, iou=None) -> dict:
    run = {"variant": variant, "seed": seed, **{key: value for key in ablation.SEGMENTATION_KEYS}}
    run["with_distractor"] = {key: value / 2 for key in ablation.SEGMENTATION_KEYS}
    if auroc is not None:
        run.update(auroc=auroc, aurc=0.01, ece=0.02)
    if iou is not None:  # per-sample IoU as counts over unions of 1,000 pixels
        run["samples"] = {"intersection": np.round(np.asarray(iou) * 1000).astype(int).tolist(), "union": [1000] * len(iou)}
    return run


def test_variants_cover_the_study(ablation):
    assert list(ablation.STUDY) == ["base", "base+RUS", "base+RUS+UGF", "base+RUS+UDLR", "full"]
    # Each alternative is the full model with one config field changed, or with the stride-4 path's lighter choices.
    for name, changes in ablation.ALTERNATIVES.items():
        variant = ablation.VARIANTS[name]
        assert variant == {**ablation.VARIANTS["full"], **changes}
        assert len(changes) == 1 or set(changes) <= set(LIGHTER_PATH_CHOICES)
        assert "CrobimUConfig" not in name and name.startswith("full/")
    assert not any(ablation.VARIANTS["base"].values()) and all(ablation.VARIANTS["full"].values())
    # UGF and UDLR read the uncertainty map, so every variant with either has RUS.
    assert all(switches["use_rus"] for switches in ablation.VARIANTS.values() if switches["use_ugf"] or switches["use_udlr"])


def test_summary_is_mean_and_sample_std_over_seeds(ablation):
    runs = [fake_run(ablation, "full", seed, value, auroc) for seed, value, auroc in [(0, 0.2, 0.8), (1, 0.4, 0.9), (2, 0.6, 0.7)]]
    summary = ablation.summarise(runs)
    assert summary["mIoU"]["mean"] == pytest.approx(0.4)
    assert summary["mIoU"]["std"] == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.6
    assert summary["auroc"]["mean"] == pytest.approx(0.8)
    assert summary["with_distractor"]["Pr@0.9"]["mean"] == pytest.approx(0.2)
    base = ablation.summarise([fake_run(ablation, "base", 0, 0.3)])
    assert "auroc" not in base and base["oIoU"] == {"mean": 0.3, "std": 0.0}


def test_table_and_markers(ablation, tmp_path):
    results = {
        "variants": {
            "base": {"summary": ablation.summarise([fake_run(ablation, "base", 0, 0.25)])},
            "full": {"summary": ablation.summarise([fake_run(ablation, "full", 0, 0.5, 0.85)])},
        }
    }
    table = ablation.format_table(results).splitlines()
    assert table[0] == "| variant | Pr@0.5 | Pr@0.6 | Pr@0.7 | Pr@0.8 | Pr@0.9 | oIoU | mIoU | auroc | aurc |"
    assert table[2].startswith("| base | 25.00 ± 0.00 |") and table[2].endswith("| – | – |")
    assert table[3].endswith("| 0.850 ± 0.000 | 1.00 ± 0.00 |")

    page = tmp_path / "page.md"
    page.write_text(f"# Title\n{ablation.MARKERS[0]}\nold\n{ablation.MARKERS[1]}\ntail\n")
    assert ablation.write_between_markers(page, "new table")
    assert page.read_text() == f"# Title\n{ablation.MARKERS[0]}\nnew table\n{ablation.MARKERS[1]}\ntail\n"
    unmarked = tmp_path / "other.md"
    unmarked.write_text("no markers\n")
    assert not ablation.write_between_markers(unmarked, "x") and unmarked.read_text() == "no markers\n"
    assert not ablation.write_between_markers(tmp_path / "missing.md", "x")


# --- the demo's recipe -----------------------------------------------------------------------------------------------


def test_defaults_are_the_demo_recipe_with_each_variant_over_the_demo_model(ablation):
    from crobim_u.demo import DEMO_MODEL_OVERRIDES, DemoRecipe

    args = ablation.build_parser().parse_args([])
    assert args.variants == list(ablation.STUDY) and args.seeds == [0, 1, 2] and args.num_test >= 1000
    assert (args.jobs, args.threads) == (2, 1)
    recipe = ablation.build_recipe(args, "base")
    demo = DemoRecipe()
    for field in ("image_size", "difficulty", "num_train", "max_steps", "batch_size", "expressions_per_image",
                  "relational_share", "learning_rate", "warmup_steps", "uncertainty_warmup_steps"):
        assert getattr(recipe, field) == getattr(demo, field), field
    assert recipe.num_test == 1000
    for variant, switches in ablation.VARIANTS.items():
        overrides = ablation.build_recipe(args, variant).model_overrides
        assert overrides == {**DEMO_MODEL_OVERRIDES, **switches}, variant
    assert ablation.build_recipe(args, "base").model_overrides["num_pointers"] == 2
    common = ablation.model_overrides_of("full", '{"num_pointers": 0}')
    assert common["num_pointers"] == 0 and common["mask_stride"] == DEMO_MODEL_OVERRIDES["mask_stride"]
    # The two uncertainty alternatives are variants of their own.
    assert ablation.VARIANTS["full/adaptive-udlr-mask"]["udlr_mask_mode"] == "adaptive"
    assert ablation.VARIANTS["full/coarse-target"]["uncertainty_target_source"] == "coarse"
    assert set(ablation.FIRST) <= set(ablation.STUDY)


# --- statistics -----------------------------------------------------------------------------------------------------


def test_t_quantiles(ablation):
    assert ablation.t_quantile_975(1) == 12.706 and ablation.t_quantile_975(2) == 4.303
    assert ablation.t_quantile_975(30) == 2.042
    assert ablation.t_quantile_975(60) == pytest.approx(2.000, abs=2e-3)
    assert ablation.t_quantile_975(10**6) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="degrees_of_freedom must be >= 1"):
        ablation.t_quantile_975(0)


BASE_IOU = np.random.default_rng(0).uniform(0.2, 0.8, size=(3, 200)).round(3)
DISTRACTOR = np.arange(200) % 2 == 0


def runs_of(ablation, variant, iou_by_seed):
    return [fake_run(ablation, variant, seed, 0.0, iou=iou) for seed, iou in enumerate(iou_by_seed)]


def test_a_consistent_gain_gives_an_interval_above_zero(ablation):
    base = runs_of(ablation, "base", BASE_IOU)
    better = runs_of(ablation, "full", BASE_IOU + np.array([[0.04], [0.05], [0.06]]))
    comparison = ablation.paired_comparison(better, base, DISTRACTOR, num_resamples=500)
    assert comparison["seeds"] == [0, 1, 2]
    miou = comparison["mIoU"]
    assert miou["per_seed"] == pytest.approx([0.04, 0.05, 0.06]) and miou["mean"] == pytest.approx(0.05)
    assert miou["std"] == pytest.approx(0.01) and miou["seeds_agree"] and miou["pooled"] == pytest.approx(0.05)
    # Every sample gains the same in each seed: the bootstrap has nothing to vary, the seeds set the interval.
    assert miou["bootstrap_95"] == pytest.approx([0.05, 0.05]) and miou["bootstrap_se"] == pytest.approx(0, abs=1e-12)
    assert miou["combined_95"] == pytest.approx([0.05 - 4.303 * 0.01 / math.sqrt(3), 0.05 + 4.303 * 0.01 / math.sqrt(3)])
    assert miou["combined_95"][0] > 0 and miou["verdict"] == "helps"
    # oIoU pooled over seeds: total intersection over total union, both variants on the same samples.
    oiou = comparison["oIoU"]
    assert oiou["pooled"] == pytest.approx(0.05, abs=1e-3) and oiou["bootstrap_95"][0] > 0
    assert comparison["distractor_mIoU"]["pooled"] == pytest.approx(0.05)
    assert comparison["Pr@0.9"]["per_seed"] == pytest.approx([0, 0, 0])  # no IoU reaches 0.9
    worse = ablation.paired_comparison(base, better, DISTRACTOR, num_resamples=500)
    assert worse["mIoU"]["combined_95"][1] < 0 and worse["mIoU"]["verdict"] == "hurts"


def test_differences_that_cancel_give_an_interval_around_zero(ablation):
    base = runs_of(ablation, "base", BASE_IOU)
    # Half the samples gain 0.1, the other half lose 0.1 (alternating): no mean effect, in every seed.
    swing = np.where(np.arange(200) % 4 < 2, 0.1, -0.1)
    noisy = runs_of(ablation, "full", BASE_IOU + swing)
    comparison = ablation.paired_comparison(noisy, base, DISTRACTOR, num_resamples=1000)
    miou = comparison["mIoU"]
    assert miou["mean"] == pytest.approx(0, abs=1e-12) and not miou["seeds_agree"]
    assert miou["bootstrap_95"][0] < 0 < miou["bootstrap_95"][1]
    assert miou["bootstrap_se"] == pytest.approx(0.1 / math.sqrt(200), rel=0.15)
    assert miou["combined_95"][0] < 0 < miou["combined_95"][1] and miou["verdict"] == "inconclusive"
    # The same pattern a hundred times smaller is inside the smallest effect of interest: no effect.
    tiny = ablation.paired_comparison(runs_of(ablation, "full", BASE_IOU + swing / 100), base, DISTRACTOR, 1000)
    assert tiny["mIoU"]["verdict"] == "no effect"


def test_pairing_uses_the_shared_seeds_and_one_seed_has_no_combined_interval(ablation):
    base = runs_of(ablation, "base", BASE_IOU[:2])
    variant = runs_of(ablation, "full", BASE_IOU + 0.02)
    assert ablation.paired_comparison(variant, base, DISTRACTOR, 100)["seeds"] == [0, 1]
    single = ablation.paired_comparison(variant[:1], base[:1], DISTRACTOR, 100)
    assert single["mIoU"]["combined_95"] is None and single["mIoU"]["verdict"] == "helps"
    assert ablation.paired_comparison(variant[2:], base, DISTRACTOR, 100) is None
    none_with_distractor = ablation.paired_comparison(variant, base, np.zeros(200, dtype=bool), 100)
    assert none_with_distractor["distractor_mIoU"] is None
    with pytest.raises(ValueError, match="one test split"):
        ablation.paired_comparison(variant, base, DISTRACTOR[:10], 100)


def test_reliability_block_averages_each_seed_ranking(ablation):
    iou = np.linspace(0.0, 0.9, 10)
    runs = []
    for seed, reliability in enumerate([iou, -iou]):  # seed 0 ranks perfectly, seed 1 backwards
        run = fake_run(ablation, "full", seed, 0.0, auroc=0.8, iou=iou)
        run["samples"].update(reliability=list(reliability), score=list(iou))
        runs.append(run)
    block = ablation.reliability_block(runs)
    assert block["spearman_reliability"] == pytest.approx(0.0) and block["spearman_score"] == pytest.approx(1.0)
    assert block["per_seed"]["0"]["spearman_reliability"] == pytest.approx(1.0)
    assert block["mIoU_all"] == pytest.approx(0.45)
    # 20% set aside: by reliability 0.0 and 0.1 (seed 0) or 0.9 and 0.8 (seed 1); by score always 0.0 and 0.1.
    assert block["mIoU_kept_80"] == pytest.approx((4.4 / 8 + 2.8 / 8) / 2)
    assert block["mIoU_kept_80_score"] == pytest.approx(4.4 / 8)
    assert block["mIoU_kept_80_oracle"] == pytest.approx(4.4 / 8) and block["seeds"] == [0, 1]
    assert len(block["curve_reliability"]) == len(block["set_aside"]) == 10
    assert ablation.reliability_block([fake_run(ablation, "base", 0, 0.0, iou=iou)]) is None


def test_tables_with_intervals(ablation):
    base = runs_of(ablation, "base", BASE_IOU)
    full = runs_of(ablation, "full", BASE_IOU + np.array([[0.04], [0.05], [0.06]]))
    for run in full:
        run.update(auroc=0.8, aurc=0.01, ece=0.02)
        run["samples"].update(reliability=list(BASE_IOU[0]), score=list(BASE_IOU[0]))
    args = ablation.build_parser().parse_args(["--variants", "base", "full", "--bootstrap", "200", "--text-encoder", "scratch"])
    finished = {(run["variant"], run["seed"]): run for run in base + full}
    results = ablation.collect_results(args, finished, DISTRACTOR, argv=[])
    assert set(results["variants"]) == {"base", "full"}
    assert "against_base" not in results["variants"]["base"] and "reliability" not in results["variants"]["base"]
    assert all("samples" not in run for run in results["variants"]["full"]["runs"])
    lines = ablation.format_paired_table(results).splitlines()
    assert lines[0] == ("| variant | ΔmIoU by seed | ΔmIoU [95%] | ΔoIoU [95%] | ΔPr@0.9 [95%] | Δdistractor mIoU [95%] "
                        "| verdict (mIoU) |")
    assert lines[2].startswith("| full | +4.00 / +5.00 / +6.00 | +5.00 [+2.52, +7.48] |") and lines[2].endswith("| helps |")
    assert ablation.format_paired_table(results, "full") == ""
    reliability = ablation.format_reliability_table(results).splitlines()
    assert reliability[2].startswith("| full | ") and len(reliability) == 3
    tables = ablation.format_tables(results)
    assert tables.startswith("| variant | Pr@0.5 |") and "Against the base" in tables and "Ranking answers" in tables


@pytest.mark.slow
def test_quick_run_writes_results_and_figures(ablation, tmp_path):
    output = tmp_path / "ablation.json"
    results = ablation.main(
        ["--quick", "--text-encoder", "scratch", "--output", str(output), "--work-dir", str(tmp_path / "work")]
    )
    saved = json.loads(output.read_text(), parse_constant=lambda name: float(name))
    assert set(saved["variants"]) == {"base", "full"} and saved["seeds"] == [0]
    full, base = saved["variants"]["full"], saved["variants"]["base"]
    assert {"mIoU", "oIoU", "Pr@0.9", "auroc", "against_base", "reliability"} <= set(full) and "auroc" not in base
    assert 0.0 <= full["auroc"] <= 1.0 and all(0.0 <= base[key] <= 1.0 for key in ("mIoU", "oIoU", "Pr@0.9"))
    assert full["against_base"]["mIoU"]["per_seed"] == pytest.approx([full["mIoU"] - base["mIoU"]])
    assert set(ablation.RELIABILITY_KEYS) <= set(full["reliability"])
    run = full["runs"][0]
    curve = run["risk_coverage"]
    assert len(curve["coverage"]) == ablation.CURVE_POINTS and curve["coverage"][0] == 1.0
    assert all(0.0 <= risk <= 1.0 for risk in curve["risk"] if not math.isnan(risk))
    assert full["mIoU"] == results["variants"]["full"]["mIoU"]
    for name in saved["figures"].values():
        assert (tmp_path / name).stat().st_size > 0
    samples = json.loads((tmp_path / saved["samples_file"]).read_text())
    num_test = saved["num_test"]
    assert len(samples["has_distractor"]) == num_test == len(samples["runs"]["base"]["0"]["union"])
    assert len(samples["runs"]["full"]["0"]["reliability"]) == num_test and "reliability" not in samples["runs"]["base"]["0"]

    note = ablation.provenance_note(saved)
    assert f"{saved['run_seconds'] / 3600:.1f} h of training and scoring in all" in note and "--quick" in note
    assert saved["run_seconds"] == pytest.approx(sum(r["train_seconds"] + r["score_seconds"] for r in full["runs"] + base["runs"]), abs=0.2)

    # A restart with the same settings trains nothing: every run comes from the journal of the work folder.
    again = ablation.main(
        ["--quick", "--text-encoder", "scratch", "--output", str(tmp_path / "again.json"), "--work-dir", str(tmp_path / "work")]
    )
    assert again["variants"]["full"]["runs"] == saved["variants"]["full"]["runs"]
    (journal,) = (tmp_path / "work").glob("*/runs.jsonl")
    assert len(journal.read_text().splitlines()) == 2

    # A journal line from an earlier reliability definition is scored again from its saved model: the same figures
    # come back. Without a saved model it is left out of the ranking.
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    full_line = next(line for line in lines if line["variant"] == "full")
    full_line["reliability_definition"] = "mean-uncertainty-in-band"
    full_line["samples"]["reliability"] = [0.0] * num_test
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rescored = ablation.main(
        ["--quick", "--text-encoder", "scratch", "--output", str(tmp_path / "rescored.json"), "--work-dir", str(tmp_path / "work")]
    )
    assert rescored["variants"]["full"]["reliability"]["spearman_reliability"] == pytest.approx(
        full["reliability"]["spearman_reliability"], nan_ok=True
    )
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    restored = next(line for line in lines if line["variant"] == "full")
    assert restored["reliability_definition"] == ablation.RELIABILITY_DEFINITION
    assert restored["samples"]["reliability"] == pytest.approx(samples["runs"]["full"]["0"]["reliability"], abs=1e-6)

    restored["reliability_definition"] = "mean-uncertainty-in-band"
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    shutil.rmtree(journal.parent / "models" / "full-seed0")
    without_model = ablation.main(
        ["--quick", "--text-encoder", "scratch", "--output", str(tmp_path / "left_out.json"), "--work-dir", str(tmp_path / "work")]
    )
    assert "reliability" not in without_model["variants"]["full"]
    assert without_model["variants"]["full"]["mIoU"] == full["mIoU"]
