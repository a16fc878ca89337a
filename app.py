"""
CroBIM-U in the browser: choose an example scene or upload an image (PNG, JPEG or GeoTIFF), type one referring
expression per line, and see each expression's mask on the image beside its uncertainty map; download the masks
(GeoTIFF for a georeferenced input, PNG otherwise).

`python app.py` (with the `app` extra: `pip install -e ".[app]"`) serves the page on http://127.0.0.1:7860. The model
is read from the `CROBIM_U_MODEL` environment variable (a checkpoint folder or Hub id), by default `outputs/demo`, the
folder `crobim-u demo` writes. On a Hugging Face Space this file is the app (`app_file` in README.md's front matter).
Each request runs `crobim_u.inference.predict.predict_files`, the code behind `crobim-u predict`, so the page shows
and serves exactly what the command line writes.
"""

from __future__ import annotations

import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from crobim_u.data.synthetic import generate_sample
from crobim_u.inference.loading import load_checkpoint
from crobim_u.inference.predict import PredictOptions, open_scene, predict_files
from crobim_u.inference.tiling import model_input_size


MODEL_ENV = "CROBIM_U_MODEL"
DEFAULT_MODEL = "outputs/demo"
# Scenes of the demo's difficulty, each with a second object of the referred class: the expression decides which.
EXAMPLE_SEEDS = (0, 3, 9)
EXAMPLE_DIFFICULTY = "easy"
# Side of the example scenes when no model is loaded (the demo's input size); otherwise the model's input side.
DEFAULT_EXAMPLE_SIDE = 160
PREVIEW_MAX_SIDE = 1024
DOWNLOAD_FIELDS = ("mask", "uncertainty", "geojson")
# Record fields left out of the figures shown: file paths on the server, and the status of a run that succeeded.
HIDDEN_FIELDS = ("input", "mask", "uncertainty", "overlay", "geojson", "status", "error")
NO_MODEL_HELP = (
    "**No model loaded** from `{path}`: {problem}\n\n"
    "Train the demo model with `crobim-u demo` (it writes `outputs/demo`; about 14 minutes on a 2-core CPU), or "
    "point `CROBIM_U_MODEL` at a CroBIM-U checkpoint folder or Hub id, then start the app again."
)


def load_model(path: str) -> tuple[Any, Any, str | None]:
    """
    Loads the model and processor of `path` (a folder or Hub id).

    Returns:
        `(model, processor, None)`, or `(None, None, problem)` with the reason no model could be loaded.
    """
    if path == DEFAULT_MODEL and not os.path.isdir(path):
        return None, None, "the folder does not exist."
    try:
        model, processor = load_checkpoint(path)
    except (OSError, ValueError) as error:
        return None, None, f"{type(error).__name__}: {error}"
    return model, processor, None


def write_example_scenes(folder: Path, side: int) -> list[list[str]]:
    """Draws the example scenes with the synthetic generator; returns `[image path, image path, expression]` rows (the
    picture shown in the examples table, the file segmented, the expression)."""
    examples = []
    for seed in EXAMPLE_SEEDS:
        sample = generate_sample(seed, image_size=side, difficulty=EXAMPLE_DIFFICULTY)
        path = folder / f"synthetic-{EXAMPLE_DIFFICULTY}-{seed}.png"
        sample["image"].save(path)
        examples.append([str(path), str(path), sample["expression"]])
    return examples


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """`"4,3,2"` -> `(4, 3, 2)`; an empty field -> `None` (the default band choice)."""
    if not text or not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise gr.Error(
            f"Bands: expected 1-based band numbers separated by commas, e.g. 4,3,2; got {text!r}."
        ) from None


def preview_image(path: str | None, bands_text: str | None) -> np.ndarray | None:
    """The image as the model reads it (bands chosen, stretched to 8 bits), at most `PREVIEW_MAX_SIDE` pixels."""
    if path is None:
        return None
    try:
        scene = open_scene(path, parse_bands(bands_text))
    except (OSError, ValueError, ImportError) as error:
        raise gr.Error(f"{type(error).__name__}: {error}") from None
    try:
        scale = max(1.0, max(scene.height, scene.width) / PREVIEW_MAX_SIDE)
        shape = (max(1, round(scene.height / scale)), max(1, round(scene.width / scale)))
        return scene.read(0, 0, scene.height, scene.width, None if scale == 1 else shape)
    finally:
        if hasattr(scene, "close"):
            scene.close()


def build_app(model_path: str | None = None) -> gr.Blocks:
    """
    Builds the page for the model at `model_path` (default: `CROBIM_U_MODEL`, else `outputs/demo`).

    Args:
        model_path (`str`, *optional*): A CroBIM-U checkpoint folder or Hub id.

    Returns:
        `gradio.Blocks`: the app; call `.launch()` to serve it.
    """
    model_path = model_path or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    model, processor, problem = load_model(model_path)
    work_dir = Path(tempfile.mkdtemp(prefix="crobim-u-app-"))
    atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    (work_dir / "examples").mkdir()
    side = DEFAULT_EXAMPLE_SIDE if processor is None else model_input_size(processor)[0]
    examples = write_example_scenes(work_dir / "examples", side)

    def segment(
        path: str | None,
        expressions_text: str,
        bands_text: str,
        threshold: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> tuple[list[tuple[str, str]], list[dict[str, Any]], list[str]]:
        if model is None:
            raise gr.Error(NO_MODEL_HELP.format(path=model_path, problem=problem))
        if path is None:
            raise gr.Error("No image: choose an example scene or upload a PNG, JPEG or GeoTIFF file.")
        expressions = [line.strip() for line in (expressions_text or "").splitlines() if line.strip()]
        options = PredictOptions(threshold=threshold, bands=parse_bands(bands_text))
        output_dir = tempfile.mkdtemp(dir=work_dir)
        progress(0, desc="Segmenting")
        try:
            records = predict_files(model, processor, [path], expressions, output_dir, options)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        failed = [record for record in records if record["status"] != "ok"]
        if failed:
            raise gr.Error(failed[0]["error"])
        overlays = [(record["overlay"], f"{record['expression']} (score {record['score']:.3f})") for record in records]
        figures = [{key: value for key, value in record.items() if key not in HIDDEN_FIELDS} for record in records]
        downloads = [record[field] for record in records for field in DOWNLOAD_FIELDS if record.get(field)]
        return overlays, figures, downloads

    with gr.Blocks(title="CroBIM-U referring segmentation") as app:
        gr.Markdown(
            "# CroBIM-U: referring segmentation of overhead images\n"
            "Choose an example scene or upload an image, type what to find (one expression per line), and press "
            "**Segment**. Each result shows the mask in red on the image and, beside it, the model's uncertainty "
            f"(dark blue: sure, yellow: unsure). Model: `{model_path}`."
        )
        if model is None:
            gr.Markdown(NO_MODEL_HELP.format(path=model_path, problem=problem), elem_id="no-model")
        with gr.Row():
            with gr.Column():
                image_file = gr.File(
                    label="Image (PNG, JPEG or GeoTIFF)", file_types=[".png", ".jpg", ".jpeg", ".tif", ".tiff"],
                    type="filepath", elem_id="image-file",
                )
                preview = gr.Image(label="Input", interactive=False, height=320, elem_id="preview")
                expressions = gr.Textbox(
                    label="Expressions, one per line", lines=3, elem_id="expressions",
                    placeholder="the white car left of the large building\nthe largest building",
                )
                bands = gr.Textbox(
                    label="Bands (GeoTIFF with other than 1 or 3 bands): 1-based red, green, blue, e.g. 4,3,2",
                    elem_id="bands",
                )
                threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Threshold", elem_id="threshold")
                run = gr.Button("Segment", variant="primary", interactive=model is not None, elem_id="segment")
            with gr.Column():
                overlays = gr.Gallery(
                    label="Mask and uncertainty", columns=1, object_fit="contain", height="auto", elem_id="overlays"
                )
                figures = gr.JSON(label="Score and figures per expression", elem_id="figures")
                downloads = gr.File(label="Masks to download", file_count="multiple", elem_id="downloads")
        gr.Examples(examples=examples, inputs=[preview, image_file, expressions], label="Example scenes (synthetic)")
        image_file.change(preview_image, [image_file, bands], preview)
        bands.submit(preview_image, [image_file, bands], preview)
        run.click(segment, [image_file, expressions, bands, threshold], [overlays, figures, downloads])
    return app


if __name__ == "__main__":
    # Loopback unless GRADIO_SERVER_NAME says otherwise (a Space sets 0.0.0.0); never a public share link.
    build_app().launch(share=False)
