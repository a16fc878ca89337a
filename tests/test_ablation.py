"""The ablation study's script: aggregation, tables, and a smoke run of every stage."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ablation():
    # Imported by name from its folder, so that the spawned worker processes can import it too.
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("ablation")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def fake_run(ablation, variant: str, seed: int, value: float, auroc: float | None = None) -> dict:
    run = {"variant": variant, "seed": seed, **{key: value for key in ablation.SEGMENTATION_KEYS}}
    run["with_distractor"] = {key: value / 2 for key in ablation.SEGMENTATION_KEYS}
    if auroc is not None:
        run.update(auroc=auroc, aurc=0.01, ece=0.02)
    return run


def test_variants_cover_the_study(ablation):
    assert list(ablation.STUDY) == ["base", "base+RUS", "base+RUS+UGF", "base+RUS+UDLR", "full"]
    # Each alternative is the full model with exactly one config field changed.
    for name, changes in ablation.ALTERNATIVES.items():
        variant = ablation.VARIANTS[name]
        assert len(changes) == 1 and variant == {**ablation.VARIANTS["full"], **changes}
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


@pytest.mark.slow
def test_quick_run_writes_results_and_figures(ablation, tmp_path):
    output = tmp_path / "ablation.json"
    results = ablation.main(
        ["--quick", "--text-encoder", "scratch", "--output", str(output), "--work-dir", str(tmp_path / "work")]
    )
    saved = json.loads(output.read_text())
    assert set(saved["variants"]) == {"base", "full"} and saved["seeds"] == [0]
    full, base = saved["variants"]["full"], saved["variants"]["base"]
    assert {"mIoU", "oIoU", "Pr@0.9", "auroc"} <= set(full) and "auroc" not in base
    assert 0.0 <= full["auroc"] <= 1.0 and all(0.0 <= base[key] <= 1.0 for key in ("mIoU", "oIoU", "Pr@0.9"))
    run = full["runs"][0]
    curve = run["risk_coverage"]
    assert len(curve["coverage"]) == ablation.CURVE_POINTS and curve["coverage"][0] == 1.0
    assert all(0.0 <= risk <= 1.0 for risk in curve["risk"] if not math.isnan(risk))
    assert full["mIoU"] == results["variants"]["full"]["mIoU"]
    for name in saved["figures"].values():
        assert (tmp_path / name).stat().st_size > 0

    # A restart with the same settings trains nothing: every run comes from the journal of the work folder.
    again = ablation.main(
        ["--quick", "--text-encoder", "scratch", "--output", str(tmp_path / "again.json"), "--work-dir", str(tmp_path / "work")]
    )
    assert again["variants"]["full"]["runs"] == saved["variants"]["full"]["runs"]
    (journal,) = (tmp_path / "work").glob("*/runs.jsonl")
    assert len(journal.read_text().splitlines()) == 2
