"""Peak memory and wall time of `crobim-u predict` on a 10,000 x 10,000 3-band uint16 GeoTIFF, on the CPU.

    python benchmarks/large_scene.py [--size 10000] [--window 480] [--overlap 0.25] [--batch_size 4]
                                     [--mode tiled] [--threads N] [--keep DIR]

1. Writes a procedural scene (smooth ground, sensor noise, bright rectangular roofs; UTM zone 33N, 0.5 m pixels) as a
   tiled, deflate-compressed GeoTIFF, strip by strip, so generating it stays in bounded memory.
2. Saves the `tiny` preset with random weights and a 480x480 processor: the model's answers are meaningless, but
   its cost per window and the memory of tiling, blending and writing are those of any checkpoint of that size (a
   Swin-B checkpoint costs more time per window, not more scene memory).
3. Runs `crobim-u predict` on the scene in a child process and reports its wall time and peak resident memory
   (`ru_maxrss` of the child), which must stay under 4 GiB.
4. Checks the outputs: the mask and uncertainty GeoTIFFs have the input's CRS, transform and size, and every GeoJSON
   vertex lies inside the scene bounds.

Everything is written to a temporary folder (or `--keep DIR`). The wall time depends on the other processes sharing
the cores; `--threads` sets the child's torch threads (default: torch's choice).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
import rasterio.windows
import shapely
import shapely.geometry
from affine import Affine
from transformers import BertTokenizer

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation, CrobimUImageProcessor, CrobimUProcessor


CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
LIMIT_BYTES = 4 * 2**30
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "largest", "large", "building", "white", "roof", "car"]


def write_scene(path: Path, size: int, strip: int = 512, seed: int = 0) -> None:
    """A `size` x `size` 3-band uint16 GeoTIFF written strip by strip."""
    rng = np.random.default_rng(seed)
    roofs = [(*rng.integers(0, size, 2), *rng.integers(20, 200, 2), *rng.integers(9000, 14000, 3)) for _ in range(400)]
    cols = np.arange(size, dtype=np.float32)
    profile = {
        "driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint16", "crs": CRS,
        "transform": TRANSFORM, "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
        "predictor": 2, "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as scene:
        for top in range(0, size, strip):
            rows = np.arange(top, min(top + strip, size), dtype=np.float32)
            ground = 1500 + 600 * np.sin(cols / 350)[None] * np.cos(rows / 420)[:, None]
            noise = rng.standard_normal((3, len(rows), size), dtype=np.float32) * 40
            data = np.stack([ground + 150 * band for band in range(3)]) + noise
            for row, col, height, width, *colour in roofs:
                inside = slice(max(row, top) - top, min(row + height, top + len(rows)) - top)
                if inside.start < inside.stop:
                    data[:, inside, col : col + width] = np.array(colour).reshape(3, 1, 1)
            window = rasterio.windows.Window(0, top, size, len(rows))
            scene.write(np.clip(data, 0, 65535).astype(np.uint16), window=window)


def save_model(path: Path) -> None:
    """The `tiny` preset, random weights, with a 480x480 processor and a word-level tokenizer."""
    config = CrobimUConfig.from_preset("tiny", text_config={"vocab_size": len(WORDS)})
    CrobimUForReferringSegmentation(config).save_pretrained(path)
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)})
    CrobimUProcessor(CrobimUImageProcessor(), tokenizer).save_pretrained(path)


def check_outputs(record: dict, scene_path: Path) -> dict:
    """The output rasters' grid against the input's, and the GeoJSON vertices against the scene bounds."""
    with rasterio.open(scene_path) as scene:
        grid, bounds = (scene.crs, scene.transform, scene.shape), scene.bounds
    checks = {}
    for key in ("mask", "uncertainty"):
        with rasterio.open(record[key]) as output:
            checks[f"{key}_same_grid"] = (output.crs, output.transform, output.shape) == grid
    # The GeoJSON is in WGS 84 (RFC 7946): compare its vertices with the scene's bounds in longitude and latitude.
    west, south, east, north = rasterio.warp.transform_bounds(grid[0], "EPSG:4326", *bounds, densify_pts=21)
    with open(record["vector"]) as file:
        features = json.load(file)["features"]
    points = shapely.get_coordinates([shapely.geometry.shape(feature["geometry"]) for feature in features])
    tolerance = 1e-9
    inside = bool(
        ((points[:, 0] >= west - tolerance) & (points[:, 0] <= east + tolerance)).all()
        and ((points[:, 1] >= south - tolerance) & (points[:, 1] <= north + tolerance)).all()
    )
    checks.update(features=record["num_features"], vertices=len(points), polygons_inside_bounds=inside)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=10_000, help="scene side in pixels")
    parser.add_argument("--window", type=int, default=480)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--mode", default="tiled", choices=("tiled", "downsample-refine"))
    parser.add_argument("--expression", default="the largest white building")
    parser.add_argument("--threads", type=int, help="torch threads of the predict process")
    parser.add_argument("--keep", help="write everything to this folder instead of a temporary one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="crobim-u-large-scene-") as temporary:
        folder = Path(args.keep or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        scene_path, model_path, output = folder / "scene.tif", folder / "model", folder / "predictions"
        start = time.perf_counter()
        write_scene(scene_path, args.size)
        generation_seconds = time.perf_counter() - start
        save_model(model_path)

        command = [
            sys.executable, "-m", "crobim_u.cli", "predict", "--model", str(model_path),
            "--expression", args.expression, "--output_dir", str(output), "--window", str(args.window),
            "--overlap", str(args.overlap), "--batch_size", str(args.batch_size), "--mode", args.mode,
            "--device", "cpu", str(scene_path),
        ]
        environment = dict(os.environ)
        if args.threads:
            environment["OMP_NUM_THREADS"] = str(args.threads)
        start = time.perf_counter()
        completed = subprocess.run(command, env=environment)
        predict_seconds = time.perf_counter() - start
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux

        (record,) = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
        report = {
            "scene": f"{args.size}x{args.size}x3 uint16, {scene_path.stat().st_size / 2**20:.0f} MiB on disk",
            "command": " ".join(["crobim-u", *command[3:]]),
            "threads": args.threads or "torch default",
            "exit_status": completed.returncode,
            "status": record["status"],
            "windows": record.get("num_windows"),
            "predict_wall_seconds": round(predict_seconds, 1),
            "seconds_per_window": round(predict_seconds / max(1, record.get("num_windows") or 0), 3),
            "predict_peak_rss_gib": round(child_peak / 2**30, 3),
            "under_4_gib": child_peak < LIMIT_BYTES,
            "generation_seconds": round(generation_seconds, 1),
            "generation_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        }
        if record["status"] == "ok":
            report.update(check_outputs(record, scene_path))
        print(json.dumps(report, indent=2))
        passed = record["status"] == "ok" and report["under_4_gib"] and report.get("polygons_inside_bounds")
        passed = passed and report["mask_same_grid"] and report["uncertainty_same_grid"]
        return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
