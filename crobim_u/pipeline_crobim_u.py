"""The `referring-image-segmentation` pipeline: an image and a phrase in, the object's mask and uncertainty out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image
from transformers import Pipeline


PIPELINE_TASK = "referring-image-segmentation"


class CrobimUReferringSegmentationPipeline(Pipeline):
    r"""
    Referring image segmentation: `pipe(image, "the small white car left of the large building")`.

    Call it with one image and one expression, or one image and a list of expressions (the image is encoded
    once for all of them), or a list of `{"image": ..., "expression": ...}` dicts.

    Each result is a dict:
    - `mask` (`PIL.Image.Image`, mode "L", values 0/255): the referred object at the image's original size;
    - `uncertainty` (`np.ndarray` of shape `(height, width)`, values in [0, 1]): the referring-uncertainty map,
      `None` for a model without RUS;
    - `score` (`float`): the mask's confidence (see the image processor);
    - `reliability` (`float` in [0, 1]): the IoU the uncertainty map expects the mask to have,
      higher = more reliable (see the image processor's `mask_reliability`); `None` for a model without RUS;
    - `expression` (`str`).

    Args (at call time):
        threshold (`float`, *optional*, defaults to 0.5): probability above which a pixel is in the mask.
        max_length (`int`, *optional*): token limit per expression; defaults to the processor's.
    """

    _load_processor = True
    _load_image_processor = None
    _load_tokenizer = None
    _load_feature_extractor = False

    def __call__(self, image: Any, expressions: str | list[str] | None = None, **kwargs: Any) -> Any:
        if expressions is None:
            if isinstance(image, dict):
                return super().__call__(image, **kwargs)
            if isinstance(image, list) and all(isinstance(item, dict) for item in image):
                return super().__call__(image, **kwargs)
            raise ValueError(
                "Pass an expression: pipe(image, 'the red car'), pipe(image, ['expr 1', 'expr 2']) or "
                "pipe([{'image': ..., 'expression': ...}, ...])."
            )
        return super().__call__({"image": image, "expression": expressions}, **kwargs)

    def _sanitize_parameters(self, threshold: float | None = None, max_length: int | None = None, **kwargs: Any):
        preprocess_params = {} if max_length is None else {"max_length": max_length}
        postprocess_params = {} if threshold is None else {"threshold": threshold}
        return preprocess_params, {}, postprocess_params

    def preprocess(self, inputs: dict[str, Any], max_length: int | None = None) -> dict[str, Any]:
        if "image" not in inputs or "expression" not in inputs:
            raise ValueError(f"Each input needs an 'image' and an 'expression', got keys {sorted(inputs)}.")
        expressions = inputs["expression"]
        single = isinstance(expressions, str)
        expressions = [expressions] if single else list(expressions)
        encoding = self.processor(images=inputs["image"], text=expressions, max_length=max_length)
        model_inputs = {key: value for key, value in encoding.items() if key != "original_sizes"}
        model_inputs["original_sizes"] = encoding["original_sizes"]
        model_inputs["expressions"] = expressions
        model_inputs["single"] = single
        return model_inputs

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        passthrough = {key: model_inputs.pop(key) for key in ("original_sizes", "expressions", "single")}
        outputs = self.model(**model_inputs)
        return {"logits": outputs.logits, "uncertainty_logits": outputs.uncertainty_logits, **passthrough}

    def postprocess(self, model_outputs: dict[str, Any], threshold: float | None = None) -> Any:
        outputs = SimpleNamespace(
            logits=model_outputs["logits"], uncertainty_logits=model_outputs["uncertainty_logits"]
        )
        # Without a threshold, the processor's default (`DEFAULT_THRESHOLD`) applies: the pipeline keeps no copy.
        options = {} if threshold is None else {"threshold": threshold}
        results = self.processor.post_process_referring_segmentation(
            outputs, target_sizes=model_outputs["original_sizes"], **options
        )
        records = []
        for expression, result in zip(model_outputs["expressions"], results):
            mask = result["mask"].cpu().numpy().astype(np.uint8) * 255
            uncertainty = result["uncertainty"]
            records.append(
                {
                    "mask": Image.fromarray(mask, mode="L"),
                    "uncertainty": None if uncertainty is None else uncertainty.float().cpu().numpy(),
                    "score": float(result["score"]),
                    "reliability": result["reliability"],
                    "expression": expression,
                }
            )
        return records[0] if model_outputs["single"] else records

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Saves the model (with its code and pipeline entry) and the processor, so the folder reloads whole."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


__all__ = ["CrobimUReferringSegmentationPipeline", "PIPELINE_TASK"]
