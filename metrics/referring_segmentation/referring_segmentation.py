"""Referring segmentation metric: oIoU, mIoU and Pr@X of binary masks, built on `crobim_u.metrics`."""

import io

import datasets
import evaluate
import numpy as np
import PIL.Image
import torch

from crobim_u.metrics import ReferringSegmentationMetric


_DESCRIPTION = """
Referring (image) segmentation scores one binary mask per image–expression pair. Per sample i,
I_i = |P_i ∧ G_i| and U_i = |P_i ∨ G_i|; then
  oIoU (cIoU, overall IoU) = ΣI / ΣU,
  mIoU = mean of I_i / U_i over samples,
  Pr@X = share of samples with I_i / U_i ≥ X, for X in 0.5, 0.6, 0.7, 0.8, 0.9.
Masks may differ in size between samples. Each mask is stored as a 1-bit PNG between `add_batch` and `compute`
and reduced to its two counts one sample at a time.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of H×W arrays): Predicted masks, foreground where > 0 (NumPy arrays, CPU tensors, nested
        lists, PIL images or image paths).
    references (`list` of H×W arrays): Ground-truth masks, same convention; each the size of its prediction unless
        `size` is given.
    strict (`bool`, *optional*, defaults to `False`): Pr@X counts IoU > X instead of IoU ≥ X.
    empty_policy (`str`, *optional*, defaults to `"one"`): IoU of a sample whose prediction and reference are both
        empty: "one", "zero" (LAVT-style code) or "skip" (left out of mIoU and Pr@X).
    size (`int`, *optional*): Score at a fixed size × size (nearest-neighbour resize of both masks) instead of the
        references' own resolution.
Returns:
    `dict`: `oIoU`, `mIoU`, `Pr@0.5`, `Pr@0.6`, `Pr@0.7`, `Pr@0.8`, `Pr@0.9` (fractions in [0, 1]) and
    `num_samples`.
Examples:
    >>> import numpy as np, evaluate
    >>> metric = evaluate.load("metrics/referring_segmentation")
    >>> prediction = np.array([[1, 1], [0, 0]])
    >>> reference = np.array([[1, 0], [0, 0]])
    >>> metric.compute(predictions=[prediction], references=[reference])["oIoU"]
    0.5
"""

_CITATION = """
@article{sun2026crobimu,
  title={Uncertainty-Driven Referring Remote Sensing Image Segmentation},
  author={Sun and Dong and Jiang and Liu and Gu},
  journal={arXiv preprint arXiv:2601.03490},
  year={2026}
}
"""


def _as_mask(mask):
    """Arrays, tensors and lists become boolean arrays (stored as compact 1-bit PNGs); paths and images pass."""
    if isinstance(mask, (str, dict, PIL.Image.Image)):
        return mask
    return np.asarray(mask) > 0


def _as_masks(masks):
    return None if masks is None else [_as_mask(mask) for mask in masks]


def _decode(encoded: dict) -> torch.Tensor:
    """A stored image (`{"bytes", "path"}`) as a (1, H, W) boolean tensor."""
    source = io.BytesIO(encoded["bytes"]) if encoded["bytes"] is not None else encoded["path"]
    with PIL.Image.open(source) as image:
        return torch.from_numpy(np.asarray(image) > 0)[None]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringSegmentation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Undecoded images: any size per sample, and `compute` decodes one mask at a time.
            features=datasets.Features(
                {"predictions": datasets.Image(decode=False), "references": datasets.Image(decode=False)}
            ),
            reference_urls=["https://arxiv.org/abs/2601.03490"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predicted and reference masks."""
        super().add_batch(predictions=_as_masks(predictions), references=_as_masks(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one predicted and one reference mask."""
        prediction = None if prediction is None else _as_mask(prediction)
        reference = None if reference is None else _as_mask(reference)
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, strict=False, empty_policy="one", size=None):
        metric = ReferringSegmentationMetric(size=size, strict=strict, empty_policy=empty_policy)
        for prediction, reference in zip(predictions, references):
            metric.update(_decode(prediction), _decode(reference))
        return metric.compute()
