"""Linear probes: where does a trained model lose "left of the landmark"?

    python benchmarks/linear_probes.py --model outputs/demo [--num-samples 600] [--seed 0] [--threads 1]

Runs a saved model (a folder with its processor) once over the relations probe's kind of test split (relation and
size-comparison expressions whose target has a same-class look-alike: `learning_curve.relational_test_split`, scenes
of `--seed`, the first `--num-samples` that qualify), captures intermediate tensors with forward hooks, and fits small
linear probes on them, with one 70/30 split by sample (`--seed`) shared by every probe. Each probe reports held-out
figures, where a probe's regularisation is chosen by 3-fold cross-validation grouped by sample on its training part.

Stages (names in the results):
- `text_encoder`: the (frozen) text encoder's last hidden states, mean over the attended tokens;
- `capm`: CAPM's output (the prompts and words after reading the image), mean over prompts and attended words:
  the sentence vector LGFA reads;
- `mid_language`: MID's decoded language, the same mean: what the mask head's query is projected from;
- `image_s8`: the image encoder's stride-8 map projected to `d_model` (`visual_proj`): image only, a control;
- `lgfa_s8`: LGFA's fused stride-8 map;
- `ugf_s8`: that map after UGF, as MID reads it (only where UGF gates stride 8);
- `mid_s8`: MID's stride-8 tokens after its last layer there (and the spatial pointers' geometry, where the model has
  pointers);
- `pixel_embedding`: the mask head's pixel embedding (at `mask_stride`), averaged over each stride-8 cell.

Probes:
- `relation_word` (sentence stages): which comparison the expression makes (left, right, above, below, closest,
  farthest: the generator's `RELATIONS`; larger, smaller: its `SIZE_WORDS`), multinomial logistic regression,
  held-out accuracy beside chance (the test share of the most frequent class). A sanity check: the words are there.
- `landmark_place` (sentence stages; relation expressions only): the named reference object's centre (x, y as
  fractions of the side, from `reference_mask`), ridge regression, held-out R². The frozen text cannot see the image:
  its figure is what the wording alone tells (e.g. "the leftmost building" is on the left), the floor for CAPM's.
  Readout beside it: the R² of the first spatial pointer's centre itself (no fit; with two or more pointers it is
  trained towards the reference).
- `target_vs_lookalike` (map stages, per stride-8 cell): cells lying mostly (> `--min-cover`) on the target against
  cells lying mostly on same-class look-alikes (`class_mask` minus `mask`), logistic regression with balanced class
  weights, held-out AUROC (split by sample). The image-only map has no expression to read, so its figure is the
  control (near 0.5 up to what the image alone biases: a larger object covers more cells). Readouts beside it: the
  model's own mask logits averaged over the cell, and the last spatial pointer's logits (no fit).
- `reference_vs_elsewhere` (map stages, per cell): cells lying mostly on the named reference object against cells
  that touch it nowhere. The image-only map scores well here too (an object against mostly ground, and some classes
  are landmarks more often): what the language adds is the gain over `image_s8`. Readout: the first pointer's logits.
A sample gives as many cells to each side of a cell probe (at most `--cells-per-group`, a random subset), and none
where a side has none: every sample weighs alike on both sides (so the class mix of the scenes cannot separate them),
large objects do not dominate, and the probes stay fast.

For context the results also hold the model's mIoU on the split, overall and per comparison word. Writes `--output`
(default `benchmarks/results/linear_probes.json`) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crobim_u import CrobimUForReferringSegmentation, CrobimUProcessor
from crobim_u.data.synthetic import RELATIONS, SIZE_WORDS, load_synthetic
from crobim_u.demo import RELATIONAL_FAMILIES, DemoRecipe
from crobim_u.metrics import ReferringSegmentationMetric, average_ranks, intersection_and_union, iou_from_counts
from crobim_u.modeling_crobim_u import masked_mean


SENTENCE_STAGES = ("text_encoder", "capm", "mid_language")
MAP_STAGES = ("image_s8", "lgfa_s8", "ugf_s8", "mid_s8", "pixel_embedding")
STAGE_DESCRIPTIONS = {
    "text_encoder": "text encoder's last hidden states, mean over attended tokens",
    "capm": "CAPM output (prompts + words after reading the image), mean: the sentence vector LGFA reads",
    "mid_language": "MID's decoded language, mean: what the mask head's query is projected from",
    "image_s8": "image encoder's stride-8 map projected to d_model (image only: control)",
    "lgfa_s8": "LGFA's fused stride-8 map",
    "ugf_s8": "the fused stride-8 map after UGF (MID's input)",
    "mid_s8": "MID's stride-8 tokens after its last layer (and the pointers' geometry)",
    "pixel_embedding": "mask head's pixel embedding, averaged over each stride-8 cell",
}
# The comparison each expression makes, by the generator's own phrases: relation phrases, then size words.
RELATION_PHRASES = sorted(
    ((phrase, relation) for relation, phrases in RELATIONS.items() for phrase in phrases), key=lambda p: -len(p[0])
)
SIZE_LABELS = {
    word: "larger" if name.startswith("large") else "smaller" for name, words in SIZE_WORDS.items() for word in words
}
# Kinds of comparison, for the cell probes' figures per kind: where "left of" is lost need not be where "larger" is.
COMPARISON_KINDS = {
    **{relation: "direction" for relation in ("left", "right", "above", "below")},
    "closest": "distance", "farthest": "distance", "larger": "size", "smaller": "size",
}
CELL_GROUPS = ("target", "lookalike", "reference", "elsewhere")
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)  # strongest first: ties go to the simpler probe
RIDGE_GRID = (100.0, 10.0, 1.0, 1e-1, 1e-2, 1e-3)


def comparison_label(expression: str, family: str) -> str:
    """The comparison an expression of the relation or size family makes (`left`, ..., `larger`, `smaller`)."""
    words = expression.split()
    if family == "size":
        for word in words:
            if word in SIZE_LABELS:
                return SIZE_LABELS[word]
    elif family == "relation":
        padded = f" {expression} "
        # The head ("the [ATTR] CLASS") has no relation phrase and the reference is non-relational, so the first
        # phrase found is the relation; the longest phrases are tried first ("to the left of" before "left of").
        for phrase, relation in RELATION_PHRASES:
            if f" {phrase} " in padded:
                return relation
    raise ValueError(f"No comparison word in {expression!r} (family {family!r}).")


def probe_split(num_samples: int, image_size: int, difficulty: str, seed: int, cache_dir: str | None = None) -> Any:
    """
    The first `num_samples` test scenes of `seed` whose expression is a relation or size comparison and whose target
    has a same-class look-alike (`learning_curve.relational_test_split`'s rows, in the same order).
    """
    count = max(8, math.ceil(1.3 * num_samples))
    while True:
        test = load_synthetic(
            num_train=0, num_test=count, num_validation=0, image_size=image_size, difficulty=difficulty, seed=seed,
            families=RELATIONAL_FAMILIES, cache_dir=cache_dir, num_proc=1,
        )["test"].filter(lambda flag: flag, input_columns="has_distractor")
        if len(test) >= num_samples or count > 50 * num_samples:
            return test.select(range(min(num_samples, len(test))))
        count = math.ceil(count * 1.2 * num_samples / max(len(test), 1)) + 8


def cover(mask: Any, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each grid cell `(h*w,)` that a mask (PIL or array, foreground > 0) covers."""
    mask = torch.from_numpy(np.asarray(mask) > 0).float()[None, None]
    return F.adaptive_avg_pool2d(mask, grid).flatten()


def choose_cells(
    row: dict[str, Any], grid: tuple[int, int], min_cover: float, per_group: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """
    Cell indices (row-major on the stride-8 grid) of each group of `CELL_GROUPS`. The two groups of a probe take as
    many cells each (at most `per_group`), or none where one of them has none: every sample then weighs as much on
    each side, and what differs between scenes (the class of the look-alikes, how many there are) cannot separate
    the sides.
    """
    target, same_class, reference = (cover(row[key], grid) for key in ("mask", "class_mask", "reference_mask"))
    lookalike = (same_class - target).clamp(min=0)
    groups = {
        "target": target > min_cover,
        "lookalike": lookalike > min_cover,
        "reference": reference > min_cover,
        "elsewhere": reference == 0,
    }
    chosen = {}
    for positive, negative in (("target", "lookalike"), ("reference", "elsewhere")):
        members = [torch.nonzero(groups[name]).flatten().numpy() for name in (positive, negative)]
        count = min(per_group, *(len(indices) for indices in members))
        for name, indices in zip((positive, negative), members):
            chosen[name] = np.sort(rng.choice(indices, count, replace=False)) if count else indices[:0]
    return chosen


class Capture:
    """Forward hooks that keep the tensors of the stages named in `STAGE_DESCRIPTIONS` during one forward pass."""

    def __init__(self, model: CrobimUForReferringSegmentation):
        self.tensors: dict[str, Any] = {}
        mid = model.mid
        # MID's stride-8 tokens: after the pointers' geometry where the model has pointers, else its last layer's.
        last_s8 = mid.pointers if mid.pointers is not None else (mid.levels["8"][-1] if len(mid.levels["8"]) else None)
        outputs = [
            (model.text_encoder, "text_hidden", lambda output: output.last_hidden_state),
            (model.capm, "capm", lambda output: masked_mean(*output)),
            (model.visual_proj["8"], "image_s8", lambda output: output),
            (model.lgfa, "lgfa_s8", lambda output: output[8]),  # before UGF replaces the dict's entry
            (mid, "pixel_embedding", lambda output: output[1]),
        ]
        if last_s8 is not None:
            outputs.append((last_s8, "mid_s8_tokens", lambda output: output[0]))
        if mid.pointers is not None:
            outputs.append((mid.pointers, "pointer_centres", lambda output: output[1].centres))
        inputs = [(mid.sentence_norm, "mid_language", lambda args: args[0])]
        self.has_ugf_s8 = model.ugf is not None and "8" in model.ugf
        if self.has_ugf_s8:
            inputs.append((mid, "ugf_s8", lambda args: args[0][8]))
        self.handles = [module.register_forward_hook(self.keeper(name, pick)) for module, name, pick in outputs]
        self.handles += [
            module.register_forward_pre_hook(self.input_keeper(name, pick)) for module, name, pick in inputs
        ]

    def keeper(self, name: str, pick: Any) -> Any:
        def hook(module, args, output) -> None:
            self.tensors[name] = pick(output)

        return hook

    def input_keeper(self, name: str, pick: Any) -> Any:
        def hook(module, args) -> None:
            self.tensors[name] = pick(args)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def collect(
    model: CrobimUForReferringSegmentation,
    processor: CrobimUProcessor,
    dataset: Any,
    batch_size: int = 32,
    min_cover: float = 0.5,
    cells_per_group: int = 24,
    seed: int = 0,
) -> dict[str, Any]:
    """
    Runs the model once over `dataset` and returns, per sample, the pooled sentence-stage features, the features of
    its chosen cells at every map stage, the readouts (mask and pointer logits per cell, pointer centres), labels
    (comparison word, reference centre) and the model's intersection and union counts.
    """
    model.eval()
    capture = Capture(model)
    rng = np.random.default_rng(seed)
    sentence = {name: [] for name in SENTENCE_STAGES}
    cells: dict[str, list] = {"sample": [], **{f"is_{group}": [] for group in CELL_GROUPS}}
    maps: dict[str, list] = {}
    readouts: dict[str, list] = {}
    pointer_centres, reference_centres, labels, intersections, unions = [], [], [], [], []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            inputs = processor(images=rows["image"], text=rows["expression"])
            inputs.pop("original_sizes")
            capture.tensors.clear()
            outputs = model(**inputs)
            tensors = capture.tensors
            attention_mask = inputs["attention_mask"].bool()
            sentence["text_encoder"].append(masked_mean(tensors["text_hidden"], attention_mask))
            sentence["capm"].append(tensors["capm"])
            sentence["mid_language"].append(tensors["mid_language"])
            image_map = tensors["image_s8"]
            if inputs.get("image_indices") is not None:
                image_map = image_map[inputs["image_indices"]]
            height, width = image_map.shape[-2:]
            stage_maps = {"image_s8": image_map, "lgfa_s8": tensors["lgfa_s8"]}
            if capture.has_ugf_s8:
                stage_maps["ugf_s8"] = tensors["ugf_s8"]
            if "mid_s8_tokens" in tensors:
                tokens = tensors["mid_s8_tokens"]
                stage_maps["mid_s8"] = tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)
            stage_maps["pixel_embedding"] = F.adaptive_avg_pool2d(tensors["pixel_embedding"], (height, width))
            batch_readouts = {"mask_logits": F.adaptive_avg_pool2d(outputs.logits, (height, width))}
            if outputs.pointer_logits is not None:
                batch_readouts["last_pointer_logits"] = outputs.pointer_logits[:, -1:]
                if outputs.pointer_logits.shape[1] > 1:  # the first pointer is trained towards the reference
                    batch_readouts["first_pointer_logits"] = outputs.pointer_logits[:, :1]
                    pointer_centres.append(tensors["pointer_centres"][:, 0])

            for index in range(len(rows["expression"])):
                sample = start + index
                row = {key: rows[key][index] for key in ("mask", "class_mask", "reference_mask")}
                chosen = choose_cells(row, (height, width), min_cover, cells_per_group, rng)
                indices = np.unique(np.concatenate(list(chosen.values()))).astype(np.int64)
                for group in CELL_GROUPS:
                    cells[f"is_{group}"].append(np.isin(indices, chosen[group]))
                cells["sample"].append(np.full(len(indices), sample))
                picked = torch.from_numpy(indices)
                for name, feature_map in stage_maps.items():
                    maps.setdefault(name, []).append(feature_map[index].flatten(1)[:, picked].T.numpy())
                for name, score_map in batch_readouts.items():
                    readouts.setdefault(name, []).append(score_map[index, 0].flatten()[picked].numpy())

                labels.append(comparison_label(rows["expression"][index], rows["family"][index]))
                reference = np.asarray(rows["reference_mask"][index]) > 0
                if reference.any():
                    ys, xs = np.nonzero(reference)
                    reference_centres.append(((xs.mean() + 0.5) / reference.shape[1],
                                              (ys.mean() + 0.5) / reference.shape[0]))
                else:
                    reference_centres.append((math.nan, math.nan))
                mask = torch.from_numpy(np.asarray(rows["mask"][index]) > 0)[None]
                intersection, union = intersection_and_union(outputs.logits[index : index + 1], mask)
                intersections.append(int(intersection.item()))
                unions.append(int(union.item()))
    finally:
        capture.remove()
    return {
        "sentence": {name: torch.cat(parts).numpy() for name, parts in sentence.items()},
        "cells": {name: np.concatenate(parts) for name, parts in cells.items()},
        "maps": {name: np.concatenate(parts) for name, parts in maps.items()},
        "readouts": {name: np.concatenate(parts) for name, parts in readouts.items()},
        "pointer_centres": torch.cat(pointer_centres).numpy() if pointer_centres else None,
        "reference_centres": np.asarray(reference_centres, dtype=np.float64),
        "labels": labels,
        "intersection": torch.tensor(intersections, dtype=torch.int64),
        "union": torch.tensor(unions, dtype=torch.int64),
        "grid": (int(height), int(width)),
    }


# --- probes ----------------------------------------------------------------------------------------------------------


def standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Features scaled by the training part's mean and standard deviation, as float32 tensors."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return [torch.from_numpy(((part - mean) / std).astype(np.float32)) for part in (train, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, balanced: bool) -> torch.nn.Linear:
    """Multinomial logistic regression (L2 on the weights), trained to convergence with LBFGS."""
    probe = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    weight = None
    if balanced:
        counts = torch.bincount(y, minlength=num_classes).float()
        weight = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), 0.0)
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-6, tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y, weight=weight) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.requires_grad_(False)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if not num_positive or not num_negative:
        return math.nan
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def r_squared(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """R² per column, about the held-out mean (NaN where the held-out truth does not vary)."""
    residual = ((truth - predicted) ** 2).sum(0)
    total = ((truth - truth.mean(0)) ** 2).sum(0)
    return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), math.nan)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression on standardised `x` (float64): weights and intercept."""
    n, d = x.shape
    mean_y = y.mean(0)
    weights = np.linalg.solve(x.T @ x / n + alpha * np.eye(d), x.T @ (y - mean_y) / n)
    return weights, mean_y


def group_folds(groups: np.ndarray, num_folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold number per item, items of one group (sample) always in one fold."""
    unique = np.unique(groups)
    fold_of = dict(zip(unique.tolist(), rng.permutation(len(unique)) % num_folds))
    return np.array([fold_of[group] for group in groups.tolist()])


def choose_strength(
    grid: tuple[float, ...], score: Any, folds: np.ndarray, num_folds: int
) -> tuple[float, float | None]:
    """The strength of `grid` with the best mean cross-validated `score(strength, fit_part, check_part)`."""
    best, best_score = grid[len(grid) // 2], None
    for strength in grid:
        values = [score(strength, folds != fold, folds == fold) for fold in range(num_folds)]
        values = [value for value in values if not math.isnan(value)]
        if values and (best_score is None or np.mean(values) > best_score + 1e-9):
            best, best_score = strength, float(np.mean(values))
    return best, best_score


def auroc_by_kind(scores: np.ndarray, positive: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
    """AUROC of the items of each kind (`kinds`: one name per item)."""
    return {
        kind: {"auroc": auroc(scores[kinds == kind], positive[kinds == kind]), "num_test": int((kinds == kind).sum())}
        for kind in sorted(set(kinds.tolist()))
    }


def classify(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, train: np.ndarray, binary: bool, seed: int,
    kinds: np.ndarray | None = None, num_folds: int = 3,
) -> dict[str, Any]:
    """
    Logistic probe trained on the items `train` selects, scored on the others: AUROC (`binary`, balanced class
    weights; with `kinds`, a name per item, also per kind) or accuracy and chance (multinomial). `labels` are ints;
    `groups` the sample of each item.
    """
    test = ~train
    num_classes = int(labels.max()) + 1
    result: dict[str, Any] = {
        "num_train": int(train.sum()), "num_test": int(test.sum()),
        "num_train_samples": int(len(np.unique(groups[train]))), "num_test_samples": int(len(np.unique(groups[test]))),
    }
    if len(np.unique(labels[train])) < 2 or len(np.unique(labels[test])) < (2 if binary else 1):
        return {**result, "skipped": "too few classes in the training or test part"}

    def scores(probe: torch.nn.Linear, x: torch.Tensor) -> np.ndarray:
        logits = probe(x)
        return (logits[:, 1] - logits[:, 0]).numpy() if binary else logits.argmax(1).numpy()

    def evaluate(probe: torch.nn.Linear, x: torch.Tensor, y: np.ndarray) -> float:
        return auroc(scores(probe, x), y == 1) if binary else float((scores(probe, x) == y).mean())

    x_train, y_train, rng = features[train], labels[train], np.random.default_rng(seed)
    folds = group_folds(groups[train], num_folds, rng)

    def cv_score(l2: float, fit_part: np.ndarray, check_part: np.ndarray) -> float:
        if len(np.unique(y_train[fit_part])) < 2 or not check_part.any():
            return math.nan
        fit_x, check_x = standardize(x_train[fit_part], x_train[check_part])
        probe = fit_logistic(fit_x, torch.from_numpy(y_train[fit_part]), num_classes, l2, binary)
        return evaluate(probe, check_x, y_train[check_part])

    l2, cv = choose_strength(L2_GRID, cv_score, folds, num_folds)
    train_x, test_x = standardize(x_train, features[test])
    probe = fit_logistic(train_x, torch.from_numpy(y_train), num_classes, l2, binary)
    figure = evaluate(probe, test_x, labels[test])
    result.update(l2=l2, cv=cv)
    if binary:
        result["auroc"] = figure
        if kinds is not None:
            result["auroc_by_kind"] = auroc_by_kind(scores(probe, test_x), labels[test] == 1, kinds[test])
    else:
        result["accuracy"] = figure
        result["chance"] = float(np.bincount(labels[test], minlength=num_classes).max() / test.sum())
    return result


def regress(
    features: np.ndarray, targets: np.ndarray, train: np.ndarray, seed: int, num_folds: int = 3
) -> dict[str, Any]:
    """Ridge probe of `targets` `(n, 2)` (x, y) trained on the rows `train` selects: held-out R² per coordinate."""
    test = ~train
    result: dict[str, Any] = {"num_train": int(train.sum()), "num_test": int(test.sum())}
    if train.sum() < 2 * num_folds or test.sum() < 2:
        return {**result, "skipped": "too few samples"}
    x_train, y_train = features[train].astype(np.float64), targets[train]
    folds = group_folds(np.arange(len(x_train)), num_folds, np.random.default_rng(seed))

    def cv_score(alpha: float, fit_part: np.ndarray, check_part: np.ndarray) -> float:
        fit_x, check_x = (part.double().numpy() for part in standardize(x_train[fit_part], x_train[check_part]))
        weights, intercept = fit_ridge(fit_x, y_train[fit_part], alpha)
        return float(np.nanmean(r_squared(y_train[check_part], check_x @ weights + intercept)))

    alpha, cv = choose_strength(RIDGE_GRID, cv_score, folds, num_folds)
    train_x, test_x = (part.double().numpy() for part in standardize(x_train, features[test].astype(np.float64)))
    weights, intercept = fit_ridge(train_x, y_train, alpha)
    r2 = r_squared(targets[test], test_x @ weights + intercept)
    return {**result, "r2": float(np.nanmean(r2)), "r2_x": float(r2[0]), "r2_y": float(r2[1]), "alpha": alpha, "cv": cv}


def run_probes(collected: dict[str, Any], seed: int = 0, train_share: float = 0.7) -> dict[str, Any]:
    """Every probe at every stage where it applies, on one split by sample (`train_share` of them to train)."""
    labels = collected["labels"]
    num_samples = len(labels)
    order = np.random.default_rng(seed).permutation(num_samples)
    train_sample = np.zeros(num_samples, dtype=bool)
    train_sample[order[: round(train_share * num_samples)]] = True
    samples = np.arange(num_samples)
    probes: dict[str, Any] = {}

    classes = sorted(set(labels))
    label_ids = np.array([classes.index(label) for label in labels])
    probes["relation_word"] = {
        "classes": {name: int(count) for name, count in sorted(Counter(labels).items())},
        "stages": {
            stage: classify(collected["sentence"][stage], label_ids, samples, train_sample, binary=False, seed=seed)
            for stage in SENTENCE_STAGES
        },
    }

    centres = collected["reference_centres"]
    named = ~np.isnan(centres).any(1)
    probes["landmark_place"] = {
        "stages": {
            stage: regress(collected["sentence"][stage][named], centres[named], train_sample[named], seed)
            for stage in SENTENCE_STAGES
        },
        "readouts": {},
    }
    if collected["pointer_centres"] is not None:
        test = named & ~train_sample
        r2 = r_squared(centres[test], collected["pointer_centres"][test].astype(np.float64))
        probes["landmark_place"]["readouts"]["first_pointer_centre"] = {
            "r2": float(np.nanmean(r2)) if test.sum() > 1 else math.nan,
            "r2_x": float(r2[0]) if test.sum() > 1 else math.nan,
            "r2_y": float(r2[1]) if test.sum() > 1 else math.nan,
            "num_test": int(test.sum()),
        }

    cells = collected["cells"]
    cell_train = train_sample[cells["sample"]]
    cell_kinds = np.array([COMPARISON_KINDS[label] for label in labels])[cells["sample"]]
    pairs = {
        "target_vs_lookalike": ("target", "lookalike", ("mask_logits", "last_pointer_logits")),
        "reference_vs_elsewhere": ("reference", "elsewhere", ("first_pointer_logits",)),
    }
    for probe_name, (positive, negative, readout_names) in pairs.items():
        keep = cells[f"is_{positive}"] | cells[f"is_{negative}"]
        cell_labels = cells[f"is_{positive}"][keep].astype(np.int64)
        block: dict[str, Any] = {"stages": {}, "readouts": {}}
        for stage, features in collected["maps"].items():
            block["stages"][stage] = classify(
                features[keep], cell_labels, cells["sample"][keep], cell_train[keep], binary=True, seed=seed,
                kinds=cell_kinds[keep],
            )
        test = keep & ~cell_train
        for name in readout_names:
            if name in collected["readouts"]:
                scores, truth = collected["readouts"][name][test], cells[f"is_{positive}"][test]
                block["readouts"][name] = {
                    "auroc": auroc(scores, truth), "num_test": int(test.sum()),
                    "auroc_by_kind": auroc_by_kind(scores, truth, cell_kinds[test]),
                }
        probes[probe_name] = block
    return {
        "split": {"train_samples": int(train_sample.sum()), "test_samples": int((~train_sample).sum()), "seed": seed},
        "probes": probes,
    }


def model_scores(collected: dict[str, Any]) -> dict[str, Any]:
    """The model's mIoU on the split, overall and per comparison word (for reading the probes against)."""
    metric = ReferringSegmentationMetric()
    metric.add_counts(collected["intersection"], collected["union"])
    iou, _ = iou_from_counts(collected["intersection"], collected["union"])
    labels = np.array(collected["labels"])
    by_word = {
        label: {"count": int((labels == label).sum()), "mIoU": float(iou.numpy()[labels == label].mean())}
        for label in sorted(set(labels.tolist()))
    }
    return {"mIoU": metric.compute()["mIoU"], "mIoU_by_comparison": by_word}


def finite_or_none(value: Any) -> Any:
    """JSON-ready: NaN and infinities become None, recursively."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_table(report: dict[str, Any]) -> str:
    """One row per stage: each probe's held-out figure, with its train/test items."""
    probes = report["probes"]
    columns = [
        ("relation word acc", "relation_word", "accuracy"),
        ("landmark R²", "landmark_place", "r2"),
        ("target/look-alike AUROC", "target_vs_lookalike", "auroc"),
        ("reference/elsewhere AUROC", "reference_vs_elsewhere", "auroc"),
    ]
    lines = ["| stage | " + " | ".join(title for title, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    stages = [*SENTENCE_STAGES, *[stage for stage in MAP_STAGES if stage in probes["target_vs_lookalike"]["stages"]]]
    readouts = sorted({name for _, probe, _ in columns for name in probes[probe].get("readouts", {})})
    for stage in [*stages, *readouts]:
        cells = []
        for _, probe, key in columns:
            block = probes[probe]["stages"].get(stage) or probes[probe].get("readouts", {}).get(stage)
            if block is None:
                cells.append("")
            elif block.get(key) is None:
                cells.append("n/a")
            else:
                counts = f" ({block['num_train']}/{block['num_test']})" if "num_train" in block else ""
                cells.append(f"{block[key]:.3f}{counts}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    chance = {stage: block.get("chance") for stage, block in probes["relation_word"]["stages"].items()}
    chance = next((value for value in chance.values() if value is not None), None)
    if chance is not None:
        lines.append(f"\nrelation word chance (most frequent class in the test part): {chance:.3f}; "
                     "(n/m): train/test items")

    # Target against look-alike per kind of comparison: the held-out cells of each kind's samples.
    block = probes["target_vs_lookalike"]
    rows = {**block["stages"], **block["readouts"]}
    kinds = sorted({kind for row in rows.values() for kind in row.get("auroc_by_kind", {})})
    if kinds:
        lines += ["", "| target/look-alike AUROC by kind | " + " | ".join(kinds) + " |",
                  "|---|" + "---:|" * len(kinds)]
        for stage, row in rows.items():
            by_kind = row.get("auroc_by_kind", {})
            cells = [
                "n/a" if by_kind.get(kind, {}).get("auroc") is None
                else f"{by_kind[kind]['auroc']:.3f} ({by_kind[kind]['num_test']})"
                for kind in kinds
            ]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines.append("(n): held-out cells")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder with its processor")
    parser.add_argument("--num-samples", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=DemoRecipe.image_size, help="side of the generated scenes")
    parser.add_argument("--difficulty", default=DemoRecipe.difficulty)
    parser.add_argument("--seed", type=int, default=0, help="scenes, the train/test split and the cell subsets")
    parser.add_argument("--train-share", type=float, default=0.7)
    parser.add_argument("--min-cover", type=float, default=0.5, help="share of a cell an object must cover")
    parser.add_argument("--cells-per-group", type=int, default=24, help="most cells per sample of each group")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", help="datasets cache folder of the generated scenes")
    parser.add_argument("--output", default="benchmarks/results/linear_probes.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    model = CrobimUForReferringSegmentation.from_pretrained(args.model, use_safetensors=True).eval()
    processor = CrobimUProcessor.from_pretrained(args.model)
    dataset = probe_split(args.num_samples, args.image_size, args.difficulty, args.seed, args.cache_dir)
    data_seconds = time.time() - started
    collected = collect(
        model, processor, dataset, args.batch_size, args.min_cover, args.cells_per_group, args.seed
    )
    forward_seconds = time.time() - started - data_seconds
    probes = run_probes(collected, args.seed, args.train_share)
    report = {
        "command": "python benchmarks/linear_probes.py " + " ".join(
            shlex.quote(part) for part in (argv if argv is not None else sys.argv[1:])
        ),
        "model": args.model,
        "num_samples": len(dataset),
        "image_size": args.image_size,
        "difficulty": args.difficulty,
        "seed": args.seed,
        "min_cover": args.min_cover,
        "cells_per_group": args.cells_per_group,
        "grid": list(collected["grid"]),
        "threads": args.threads,
        "stages": {stage: STAGE_DESCRIPTIONS[stage] for stage in (*SENTENCE_STAGES, *collected["maps"])},
        **model_scores(collected),
        **probes,
        "seconds": {
            "data": round(data_seconds, 1), "forward": round(forward_seconds, 1),
            "probes": round(time.time() - started - data_seconds - forward_seconds, 1),
        },
    }
    report = finite_or_none(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"{report['num_samples']} samples (relation or size, each target with a same-class look-alike), "
          f"{report['split']['train_samples']} to train and {report['split']['test_samples']} to test the probes; "
          f"model mIoU {100 * report['mIoU']:.2f}")
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
