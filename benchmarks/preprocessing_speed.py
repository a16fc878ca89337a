"""Preprocessing throughput: 800x800 JPEG file bytes -> `pixel_values` tensor, on the CPU.

    python benchmarks/preprocessing_speed.py [--images 256] [--batch-size 8] [--image PATH]

Decoding is part of what is timed: each image is opened from its encoded bytes, so PIL decodes it inside the
processor call, as it does for a file path or a lazily opened image. By default the JPEGs are procedural overhead-like
scenes (smooth ground, sensor noise, rectangular roofs; quality 90), so no data files are needed; `--image` encodes
a real image instead (resized to 800x800), since JPEG decoding time depends on the content. The work is
single-threaded (PIL decode and resize, one numpy multiply-add), so images per CPU second is the rate on an idle
core; the wall-clock rate drops when other processes share the cores.
"""

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from crobim_u.image_processing_crobim_u import CrobimUImageProcessor


SIZE = 800


def procedural_scene(rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    ground = np.stack([np.sin(8 * x + 5 * y + phase) for phase in rng.uniform(0, 2 * np.pi, 3)], axis=-1) * 40 + 110
    image = Image.fromarray(np.clip(ground + rng.normal(0, 6, ground.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(150):
        left, top = rng.integers(0, SIZE, 2)
        width, height = rng.integers(8, 60, 2)
        draw.rectangle([left, top, left + width, top + height], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").resize((SIZE, SIZE)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images processed in the timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image", help="encode this image instead of the procedural scenes")
    args = parser.parse_args()

    if args.image:
        jpegs = [encode_jpeg(Image.open(args.image))]
    else:
        rng = np.random.default_rng(0)
        jpegs = [encode_jpeg(procedural_scene(rng)) for _ in range(8)]
    processor = CrobimUImageProcessor()

    def open_batch(first: int) -> list[Image.Image]:
        return [Image.open(io.BytesIO(jpegs[i % len(jpegs)])) for i in range(first, first + args.batch_size)]

    def images_per_second(step) -> tuple[float, float]:
        """Images per wall-clock second and per CPU second of this process (robust to a busy machine)."""
        wall, cpu = time.perf_counter(), time.process_time()
        for first in range(0, args.images, args.batch_size):
            step(first)
        return args.images / (time.perf_counter() - wall), args.images / (time.process_time() - cpu)

    def preprocess(first: int) -> None:
        pixel_values = processor(open_batch(first), return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (args.batch_size, 3, 480, 480) and pixel_values.dtype == torch.float32

    preprocess(0)  # warm-up
    total = images_per_second(preprocess)
    decode_only = images_per_second(lambda first: [image.load() for image in open_batch(first)])
    kib = np.mean([len(jpeg) for jpeg in jpegs]) / 1024
    print(f"source: {args.image or 'procedural scenes'}; mean JPEG size {kib:.0f} KiB")
    print(f"800x800 JPEG bytes -> pixel_values (batch {args.batch_size}): {total[0]:.1f} images/s wall clock, "
          f"{total[1]:.1f} images per CPU second")
    print(f"JPEG decoding alone: {decode_only[0]:.1f} images/s wall clock, {decode_only[1]:.1f} images per CPU second")


if __name__ == "__main__":
    main()
