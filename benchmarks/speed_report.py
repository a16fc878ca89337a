"""Renders the speed and memory results (`benchmarks/results/*.json`) as the Markdown tables of BENCHMARKS.md.

    python benchmarks/speed_report.py [--results benchmarks/results]

Reads `inference_speed.json`, `many_expressions.json`, `training_step*.json` and, where present, `gpu.json`; prints
one table per file with the machine, the versions, the command and the load average it ran under. Every timing is
"median (min-max)" over the timed repeats, after warm-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spread(summary: dict, scale: float = 1.0, digits: int = 2) -> str:
    return (f"{summary['median'] * scale:.{digits}f} ({summary['min'] * scale:.{digits}f}–"
            f"{summary['max'] * scale:.{digits}f})")


def percent(summary: dict) -> str:
    return f"{summary['median']:+.1%} ({summary['min']:+.1%} to {summary['max']:+.1%})"


def header(results: dict) -> str:
    env = results["environment"]
    return (f"`{env['command']}` — {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch thread(s), "
            f"{env['memory_gib']} GiB; torch {env['torch']}, transformers {env['transformers']}, Python "
            f"{env['python']}; {env['date']}; load average (1/5/15 min) {env['load_average_start']} at the start, "
            f"{env['load_average_end']} at the end.")


def inference(results: dict) -> list[str]:
    lines = [header(results), ""]
    lines += ["| batch | case | latency s | images/s | GFLOP | GFLOP/s | share of matmul rate | activations MiB |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch, entry in results["batches"].items():
        for name, case in entry["cases"].items():
            if name == "matmul":
                lines.append(f"| {batch} | fp32 matmul 2048³ ×3 | {spread(case['latency_s'], digits=3)} | | "
                             f"{case['flops'] / 1e9:.1f} | {spread(case['gflops_per_s'], digits=0)} | 100% | |")
                continue
            lines.append(
                f"| {batch} | {name} | {spread(case['latency_s'], digits=3)} | {case['images_per_s']:.2f} | "
                f"{case['flops'] / 1e9:.1f} | {spread(case['gflops_per_s'], digits=1)} | "
                f"{case['fraction_of_matmul_peak']['median']:.0%} | {case['peak_tensor_memory_mib']:.0f} |"
            )
    lines += ["", "| batch | preset | fusion + decoder + uncertainty over the encoders | CroBIM-U over CroBIM | "
              "GFLOP/s over CLIPSeg's |", "|---:|---|---:|---:|---:|"]
    for batch, entry in results["batches"].items():
        for preset, ratios in entry["ratios"].items():
            clip = ratios.get("gflops_per_s_over_clipseg")
            clip_text = f"{clip['median']:.2f}× ({clip['min']:.2f}–{clip['max']:.2f})" if clip else "-"
            lines.append(f"| {batch} | {preset} | {percent(ratios['fusion_decoder_uncertainty_over_encoders'])} | "
                         f"{percent(ratios['crobim_u_over_crobim'])} | {clip_text} |")
    lines += ["", "| model | parameters | fp32 weights MiB | over CroBIM |", "|---|---:|---:|---:|"]
    for preset, model in results["models"].items():
        for name, count in model["parameters"].items():
            over = f"{model['parameter_overhead_over_crobim']:+.2%}" if name == "crobim-u" else ""
            lines.append(f"| {preset} / {name} | {count / 1e6:.2f} M | {count * 4 / 2**20:.0f} | {over} |")
    lines += ["", "GFLOP per module (batch 1, full model):", "", "| preset | " + " | ".join(
        results["batches"]["1"]["cases"][f"{next(iter(results['models']))}/crobim-u"]["flops_per_module"]) + " |"]
    lines.append("|---|" + "---:|" * len(results["batches"]["1"]["cases"][
        f"{next(iter(results['models']))}/crobim-u"]["flops_per_module"]))
    for preset in results["models"]:
        if preset == "clipseg":
            continue
        modules = results["batches"]["1"]["cases"][f"{preset}/crobim-u"]["flops_per_module"]
        lines.append(f"| {preset} | " + " | ".join(f"{flops / 1e9:.2f}" for flops in modules.values()) + " |")
    return lines


def many_expressions(results: dict) -> list[str]:
    settings = results["settings"]
    lines = [header(results), "",
             f"{settings['expressions']} expressions on one {settings['image_size']}² image, {settings['preset']}:", "",
             "| case | latency s | expressions/s | speed-up of `shared` |", "|---|---:|---:|---:|"]
    speedups = {"separate": results["speedup"]["shared_over_separate"],
                "repeated": results["speedup"]["shared_over_repeated"]}
    for name, case in results["cases"].items():
        speedup = f"{spread(speedups[name])}×" if name in speedups else ""
        lines.append(f"| {name} | {spread(case['latency_s'], digits=3)} | {case['expressions_per_s']:.2f} | {speedup} |")
    difference = max(results["max_abs_logit_difference"].values())
    lines += ["", f"Largest logit difference between the three: {difference:.1e}."]
    if "flops" in results:
        lines[-1] += (f" FLOPs: shared {results['flops']['shared'] / 1e9:.0f} G, separate "
                      f"{results['flops']['separate'] / 1e9:.0f} G ({results['speedup']['flops_separate_over_shared']:.2f}×).")
    return lines


def training(results: dict) -> list[str]:
    settings = results["settings"]
    lines = [header(results), "",
             f"{settings['preset']}, batch {settings['batch_size']} × {settings['image_size']}², AdamW; step time over "
             f"steps 2–{settings['steps']}:", "",
             "| gradient checkpointing | step s | CPU s | peak RSS GiB | peak allocated GiB | step tensor peak GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in results["variants"].items():
        lines.append(f"| {name} | {spread(row['timed_steps']['wall'])} | {row['timed_steps']['cpu']['median']:.2f} | "
                     f"{row['peak_rss_gib']:.2f} | {row['peak_allocated_gib']:.2f} | {row['step_tensor_peak_gib']:.2f} |")
    effect = results["checkpointing_effect"]
    lines += ["", f"Checkpointing changes the peak RSS by {effect['peak_rss_change']:+.1%}, the peak allocated tensor "
              f"memory by {effect['peak_allocated_change']:+.1%}, the step's own tensors by "
              f"{effect['step_tensor_peak_change']:+.1%}, the step time by {effect['step_time_change']:+.1%}."]
    if "tiny" in results:
        tiny = results["tiny"]
        lines += ["", f"`tiny` preset, {settings['tiny_batch_size']} × {settings['tiny_image_size']}²: "
                  f"{tiny['steps_per_s']:.2f} steps/s ({tiny['samples_per_s']:.0f} samples/s), step "
                  f"{spread(tiny['timed_steps']['wall'], digits=3)} s over {tiny['timed_steps']['wall']['runs']} steps."]
    return lines


def gpu(results: dict) -> list[str]:
    lines = [header(results), "", f"{results['device']}; bf16 peak {results['bf16_peak']}", "",
             "| case | step s | images/s | TFLOP/s | MFU | peak GiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, case in results["cases"].items():
        if "step_s" not in case:
            lines.append(f"| {name} | {case.get('error') or case.get('skipped')} | | | | |")
            continue
        lines.append(f"| {name} | {spread(case['step_s'], digits=4)} | {case['images_per_s']:.1f} | "
                     f"{case['achieved_tflops']:.1f} | {case['mfu']:.1%} | {case['peak_memory_gib']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    folder = Path(args.results)
    for pattern, render in (("inference_speed", inference), ("many_expressions", many_expressions),
                            ("training_step*", training), ("gpu", gpu)):
        for path in sorted(folder.glob(f"{pattern}.json")):
            print(f"### {path.stem}\n")
            print("\n".join(render(json.loads(path.read_text()))) + "\n")


if __name__ == "__main__":
    main()
