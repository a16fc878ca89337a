"""PyTorch CroBIM-U: uncertainty-driven referring segmentation for remote-sensing images.

Reading order: attention and small blocks; CroBIM (CAPM, LGFA, MID); CroBIM-U (RUS, UGF, UDLR); losses; the
pre-trained base class; the model.

The papers (CroBIM, arXiv 2410.08613; CroBIM-U, arXiv 2601.03490) give no equations for several parts. Every choice
that is ours is marked "Our interpretation" in the docstring of the module that makes it, with the config field
that changes it where one exists.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_FOR_BACKBONE_MAPPING, AutoBackbone, AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_crobim_u import BACKBONE_STRIDES, FOUR_STAGES, CrobimUConfig


# MID decodes coarse to fine at these strides, then the mask head works at stride 4 (or `mask_stride`).
DECODER_STRIDES = (32, 16, 8)
# CAPM reads visual context at these strides (stride 4 adds many tokens and little context).
CONTEXT_STRIDES = (8, 16, 32)
# Files that travel with every checkpoint, so that it loads with `trust_remote_code=True` where the package is absent.
SHIPPED_MODULES = (
    "configuration_crobim_u",
    "modeling_crobim_u",
    "image_processing_crobim_u",
    "processing_crobim_u",
    "pipeline_crobim_u",
)
# Written into config.json: `pipeline(model=folder, trust_remote_code=True)` finds the task and its code here.
CUSTOM_PIPELINES = {
    "referring-image-segmentation": {
        "impl": "pipeline_crobim_u.CrobimUReferringSegmentationPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
}
# Prior log-odds of the RUS logits: most pixels of a referring mask are predicted correctly.
UNCERTAINTY_PRIOR_LOGIT = -2.0


@dataclass
class CrobimUSegmentationOutput(ModelOutput):
    r"""
    Output of [`CrobimUForReferringSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            `Lseg(P) + λc·Lseg(P_coarse) + λu·BCE(U, E)` (the terms of switched-off modules are left out).
        logits (`torch.FloatTensor` of shape `(batch_size, 1, height, width)`):
            Mask logits `P` at the input resolution.
        coarse_logits (`torch.FloatTensor` of shape `(batch_size, 1, height / s, width / s)`, `s = mask_stride`):
            Mask logits of the MID head before UDLR; equal to `logits` at stride `s` when UDLR is off.
        uncertainty_logits (`torch.FloatTensor` of shape `(batch_size, 1, height / 32, width / 32)`, *optional*):
            Referring-uncertainty logits `U` of RUS; `None` when `use_rus=False`.
        segmentation_loss (`torch.FloatTensor` of shape `()`, *optional*):
            `Lseg(P)`.
        coarse_loss (`torch.FloatTensor` of shape `()`, *optional*):
            `Lseg(P_coarse)`, unweighted; only with UDLR.
        uncertainty_loss (`torch.FloatTensor` of shape `()`, *optional*):
            `BCE(U, E)`, unweighted and before the warm-up factor; only with RUS.
        uncertainty_target (`torch.FloatTensor` of shape `(batch_size, 1, height / 32, width / 32)`, *optional*):
            The online error-consistency target `E` that RUS was trained towards.
        pointer_logits (`torch.FloatTensor` of shape `(batch_size, num_pointers, height / 8, width / 8)`, *optional*):
            Logits of each spatial pointer over the stride-8 grid (a softmax over the grid gives where it points);
            `None` when `num_pointers=0`.
        pointer_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the pointers towards the target (and the reference, where `reference_labels` are
            given), unweighted; only with pointers.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    coarse_logits: torch.FloatTensor | None = None
    uncertainty_logits: torch.FloatTensor | None = None
    segmentation_loss: torch.FloatTensor | None = None
    coarse_loss: torch.FloatTensor | None = None
    uncertainty_loss: torch.FloatTensor | None = None
    uncertainty_target: torch.FloatTensor | None = None
    pointer_logits: torch.FloatTensor | None = None
    pointer_loss: torch.FloatTensor | None = None


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """
    2-D sine/cosine position encoding of shape `(height * width, dim)`; half the channels encode y, half x.

    Positions are the cell centres as fractions of the side, so one place in the image has one encoding at every
    stride and every input size ("left of" reads the same at stride 8 and 32, at 160 and 480 pixels). The angular
    frequencies run geometrically from pi (half a cycle across the image: the coarse place, without ambiguity) to
    32 pi (16 cycles: the place to 1/32 of the side).
    """
    quarter = dim // 4
    frequencies = math.pi * 32.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter - 1, 1))
    y = ((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height)[:, None] * frequencies
    x = ((torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width)[:, None] * frequencies
    y = torch.cat([y.sin(), y.cos()], dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    x = torch.cat([x.sin(), x.cos()], dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    encoding = torch.cat([y, x], dim=-1).reshape(height * width, 4 * quarter)
    return F.pad(encoding, (0, dim - 4 * quarter)).to(dtype)


def position_encoding(
    config: CrobimUConfig, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The configured position encoding, `(height * width, d_model)`: sine, or zeros for the position-blind control."""
    if config.position_encoding == "none":
        return torch.zeros(height * width, config.d_model, device=device, dtype=dtype)
    return sine_position_encoding(height, width, config.d_model, device, dtype)


def cell_centres(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(height * width, 2)`: the (x, y) centre of every cell of a grid as fractions of the image side, row-major."""
    y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(height * width, 2)


def flatten_map(feature_map: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, H*W, C)`."""
    return feature_map.flatten(2).transpose(1, 2)


def unflatten_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """
    `(B, H*W, C)` -> `(B, C, H, W)`, a channels-last view. Permuting (rather than transposing and reshaping) keeps
    the batch stride well formed at batch size 1, so convolutions and interpolation see channels-last memory and
    take their fast kernels instead of a strided copy.
    """
    return tokens.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)


class _SelectImages(torch.autograd.Function):
    """
    `images[indices]` along the batch, with a gradient in the images' memory format. Indexing's own backward returns
    a contiguous gradient; for channels-last images the convolutions, norms and activations upstream then mix two
    layouts, and on CPU their backward kernels fall back to slow paths (GELU's about 20 times slower).
    """

    @staticmethod
    def forward(ctx, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.shape = images.shape
        ctx.channels_last = images.ndim == 4 and images.is_contiguous(memory_format=torch.channels_last)
        return images[indices]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        grad_images = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
        return grad_images.index_add_(0, indices, grad), None


def select_images(images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """
    The feature maps `(B_images, C, H, W)` of each expression's image: `(len(indices), C, H, W)`.

    With one image the result is a broadcast view, not a copy: the copies per expression took about 5% of a forward
    with eight expressions on one image, and the consumers only read the maps (writing into a broadcast view raises).
    """
    if indices is None:
        return images
    if images.shape[0] == 1:
        return images.expand(indices.shape[0], *images.shape[1:])
    return _SelectImages.apply(images, indices)


def check_attended(word_mask: torch.Tensor) -> None:
    """Raises a `ValueError` where an expression has no attended token (its attention would be undefined)."""
    if not bool(word_mask.any(dim=1).all()):
        raise ValueError("Every expression needs at least one attended token; an attention_mask row is all zeros.")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `tokens` `(B, L, C)` over the positions where `mask` `(B, L)` is True."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class CrobimUAttention(nn.Module):
    """
    Multi-head cross-attention with a boolean key mask.

    Both implementations give the same result: "sdpa" calls `F.scaled_dot_product_attention` with a boolean mask,
    "eager" masks with `-inf`. Neither adds a large negative constant, which leaves denormal probabilities that stall
    the next matmul on x86 CPUs.
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.d_model // config.num_attention_heads
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = tokens.shape
        return tokens.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of projected, head-split `query`/`key`/`value`; returns `(B, Lq, d_model)` before `out_proj`."""
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if self.config._attn_implementation == "eager":
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            context = scores.softmax(dim=-1) @ value
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return context.transpose(1, 2).flatten(2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query (`torch.Tensor` of shape `(B, Lq, d_model)`)
            key (`torch.Tensor` of shape `(B, Lk, d_model)`)
            value (`torch.Tensor` of shape `(B, Lk, d_model)`, *optional*): defaults to `key`.
            key_mask (`torch.BoolTensor` of shape `(B, Lk)`, *optional*): True where a key may be attended to.
        """
        value = key if value is None else value
        context = self.attend(
            self.split_heads(self.q_proj(query)),
            self.split_heads(self.k_proj(key)),
            self.split_heads(self.v_proj(value)),
            key_mask,
        )
        return self.out_proj(context)


class CrobimUFeedForward(nn.Sequential):
    def __init__(self, config: CrobimUConfig):
        super().__init__(
            nn.Linear(config.d_model, config.ffn_dim),
            nn.GELU(),
            nn.Dropout(config.hidden_dropout),
            nn.Linear(config.ffn_dim, config.d_model),
        )


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv + GroupNorm + GELU: GroupNorm keeps the decoder independent of the (small) batch size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(math.gcd(8, out_channels), out_channels),
        nn.GELU(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# CroBIM: CAPM (vision -> language), LGFA (language -> vision), MID (both ways, coarse to fine)
# ---------------------------------------------------------------------------------------------------------------------


class CrobimUPromptModulationLayer(GradientCheckpointingLayer):
    """One CAPM layer: prompts and words talk to each other, then read the visual context, then an FFN."""

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.d_model)
        self.self_attn = CrobimUAttention(config)
        self.cross_attn_norm = nn.LayerNorm(config.d_model)
        self.cross_attn = CrobimUAttention(config)
        self.ffn_norm = nn.LayerNorm(config.d_model)
        self.ffn = CrobimUFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def context_keys_and_values(self, placed_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The cross-attention's keys and values, head-split, from the visual context with its positions `(B_images,
        N, d_model)`: they depend on the image only, so several expressions of one image share them.
        """
        attention = self.cross_attn
        return attention.split_heads(attention.k_proj(placed_context)), attention.split_heads(
            attention.v_proj(placed_context)
        )

    def forward(
        self,
        language: torch.Tensor,
        language_mask: torch.Tensor,
        context_key: torch.Tensor,
        context_value: torch.Tensor,
    ) -> torch.Tensor:
        normed = self.self_attn_norm(language)
        language = language + self.dropout(self.self_attn(normed, normed, normed, language_mask))
        attention = self.cross_attn
        query = attention.split_heads(attention.q_proj(self.cross_attn_norm(language)))
        read = attention.out_proj(attention.attend(query, context_key, context_value, None))
        language = language + self.dropout(read)
        return language + self.dropout(self.ffn(self.ffn_norm(language)))


class CrobimUContextAwarePromptModulation(nn.Module):
    """
    CAPM, vision -> language: learnable prompt tokens are prepended to the word tokens, and both cross-attend to
    multi-scale visual context so that the language features carry what the image shows.

    Our interpretation: the context is the stride 8, 16 and 32 visual tokens with 2-D sine position encodings (so
    that "left of" and "top" can be read from positions) plus a learned embedding per scale, in the keys and the
    values (so that a word carries where the things it read are: "left of the building" then compares a pixel's
    place with the building's); each layer is self-attention over prompts and words, cross-attention to the
    context, and an FFN (`capm_num_layers`, `num_prompts`).
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.config = config
        self.prompts = nn.Parameter(torch.zeros(config.num_prompts, config.d_model))
        self.level_embeddings = nn.Parameter(torch.zeros(len(CONTEXT_STRIDES), config.d_model))
        self.layers = nn.ModuleList(CrobimUPromptModulationLayer(config) for _ in range(config.capm_num_layers))

    def image_context(self, visual_maps: dict[int, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's context keys and values `(B_images, heads, N, d_head)`, computed once per image."""
        context = []
        for index, stride in enumerate(CONTEXT_STRIDES):
            feature_map = visual_maps[stride]
            height, width = feature_map.shape[-2:]
            position = position_encoding(self.config, height, width, feature_map.device, feature_map.dtype)
            context.append(flatten_map(feature_map) + (position + self.level_embeddings[index]))
        placed_context = torch.cat(context, dim=1)
        return [layer.context_keys_and_values(placed_context) for layer in self.layers]

    def forward(
        self,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        image_context: list[tuple[torch.Tensor, torch.Tensor]],
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Returns the language tokens `(B, num_prompts + L, d_model)` and their mask, from the words `(B, L, d_model)`
        and the output of [`~CrobimUContextAwarePromptModulation.image_context`] (each expression reads the image
        `image_indices` names; without it, expression `i` reads image `i`).
        """
        batch_size = words.shape[0]
        prompts = self.prompts.unsqueeze(0).expand(batch_size, -1, -1)
        language = torch.cat([prompts, words], dim=1)
        prompt_mask = word_mask.new_ones(batch_size, self.prompts.shape[0])
        language_mask = torch.cat([prompt_mask, word_mask], dim=1)
        for layer, (key, value) in zip(self.layers, image_context):
            language = layer(language, language_mask, select_images(key, image_indices), select_images(value, image_indices))
        return language, language_mask


@dataclass
class CrobimUPixelSide:
    """What LGFA computes from the image alone at one scale, once per image (`(B_images, h*w, d_model)` each)."""

    pixels: torch.Tensor  # the visual tokens, contiguous
    query: torch.Tensor | None  # their attention queries (None where the scale takes the coarser scale's word context)
    vision: torch.Tensor  # their projection that the word context modulates
    size: tuple[int, int]

    def select(self, image_indices: torch.Tensor | None) -> CrobimUPixelSide:
        """The tokens of each expression's image."""
        if image_indices is None:
            return self
        query = None if self.query is None else select_images(self.query, image_indices)
        return CrobimUPixelSide(
            select_images(self.pixels, image_indices), query, select_images(self.vision, image_indices), self.size
        )


class CrobimUPixelWordAttention(GradientCheckpointingLayer):
    """
    LGFA at one scale, language -> vision: every pixel attends to the words, and the pixel is modulated by what it
    read.

    Our interpretation of the attention-deficit compensation: a pixel's attention to the words is "weak" when even
    its best-matching word scores low. With `r = sigmoid(max_w q·k_w / sqrt(d_head))` averaged over heads, the
    sentence vector is added with weight `1 - r`, so pixels the words do not reach still receive the sentence.

    With `reads_words=False` (stride 4 under `lgfa_fine_attention="upsampled"`), the scale has no attention of its
    own: its pixels are modulated by the next coarser scale's word context, upsampled.
    """

    def __init__(self, config: CrobimUConfig, reads_words: bool = True):
        super().__init__()
        self.pixel_norm = nn.LayerNorm(config.d_model)
        self.attention = CrobimUAttention(config) if reads_words else None
        self.sentence_proj = nn.Linear(config.d_model, config.d_model) if reads_words else None
        self.vision_proj = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.GELU())
        self.fuse_proj = nn.Linear(config.d_model, config.d_model)

    def pixel_side(self, feature_map: torch.Tensor) -> CrobimUPixelSide:
        """The image-only part, `(B_images, d_model, h, w)` -> [`CrobimUPixelSide`]: shared by an image's expressions."""
        # One copy to token-major layout: the norm, the residual sum and the linears then read contiguous memory
        # (a strided residual sum at stride 4 cost more than the copy).
        pixels = flatten_map(feature_map).contiguous()
        normed = self.pixel_norm(pixels)
        query = None if self.attention is None else self.attention.q_proj(normed)
        return CrobimUPixelSide(pixels, query, self.vision_proj(normed), tuple(feature_map.shape[-2:]))

    def forward(
        self,
        pixels: torch.Tensor,
        query: torch.Tensor | None,
        vision: torch.Tensor,
        language: torch.Tensor,
        language_mask: torch.Tensor,
        sentence: torch.Tensor,
        word_context: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Returns the modulated map `(B, d_model, *size)` and the word context `(B, h*w, d_model)` it read, from the
        expressions' pixels, queries and vision projections (a [`CrobimUPixelSide`] selected per expression; passed
        as tensors so that any gradient checkpointing sees them). `word_context` is read instead of the attention
        where the scale has none.
        """
        height, width = size
        attention = self.attention
        if attention is not None:
            query = attention.split_heads(query)
            key = attention.split_heads(attention.k_proj(language))
            value = attention.split_heads(attention.v_proj(language))
            # The scores are needed for the relevance anyway, so the attention reuses them instead of computing them
            # again inside SDPA. With few keys (the words) this is also faster than the CPU SDPA kernel. The mask is
            # -inf (exact zeros after the softmax), so no denormal probabilities arise.
            # The scale goes on the few keys rather than on the pixel-by-word scores, and the mask fills the fresh
            # scores in place (matmul's backward does not read its output): two passes fewer over the largest tensor.
            scores = query @ (key.transpose(-1, -2) / math.sqrt(attention.head_dim))
            scores = scores.masked_fill_(~language_mask[:, None, None, :], float("-inf"))
            relevance = torch.sigmoid(scores.amax(dim=-1)).mean(dim=1).unsqueeze(-1)
            word_context = attention.out_proj((scores.softmax(dim=-1) @ value).transpose(1, 2).flatten(2))
            word_context = word_context.addcmul_(1.0 - relevance, self.sentence_proj(sentence).unsqueeze(1))
        elif word_context is None:
            raise ValueError("A scale without its own pixel-word attention needs the coarser scale's word_context.")
        # In place on fresh outputs (none of their backward passes reads them): at stride 4 each new tensor costs a
        # pass over memory the allocator has just mapped.
        pixels = self.fuse_proj(vision * word_context).add_(pixels)
        return unflatten_tokens(pixels, height, width), word_context


class CrobimULanguageGuidedAggregation(nn.Module):
    """
    LGFA: pixel-word attention at every scale, then cross-scale aggregation.

    Our interpretation of the aggregation: a top-down pass (stride 32 -> 4) that adds the upsampled coarser map and
    smooths with a depthwise-separable 3x3 convolution, so fine scales see the coarse language-aware context.

    `lgfa_fine_attention="upsampled"` (our lighter stride-4 path): stride 4 has no pixel-word attention of its own
    and is modulated by stride 8's word context, bilinearly upsampled; `lgfa_fine_smoothing="depthwise"` drops the
    pointwise convolution of the stride-4 smoothing.
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.config = config
        self.pixel_word_attention = nn.ModuleDict(
            {
                str(stride): CrobimUPixelWordAttention(
                    config, reads_words=stride != 4 or config.lgfa_fine_attention == "full"
                )
                for stride in BACKBONE_STRIDES
            }
        )
        self.smooth = nn.ModuleDict(
            {
                str(stride): nn.Sequential(
                    nn.Conv2d(config.d_model, config.d_model, 3, padding=1, groups=config.d_model),
                    *(
                        [nn.Conv2d(config.d_model, config.d_model, 1, bias=False)]
                        if stride != 4 or config.lgfa_fine_smoothing == "separable"
                        else []
                    ),
                    nn.GroupNorm(math.gcd(8, config.d_model), config.d_model),
                )
                for stride in BACKBONE_STRIDES[:-1]
            }
        )

    def pixel_sides(self, visual_maps: dict[int, torch.Tensor]) -> dict[int, CrobimUPixelSide]:
        """The image-only part at every scale, once per image."""
        return {
            stride: self.pixel_word_attention[str(stride)].pixel_side(visual_maps[stride]) for stride in BACKBONE_STRIDES
        }

    def forward(
        self,
        pixel_sides: dict[int, CrobimUPixelSide],
        language: torch.Tensor,
        language_mask: torch.Tensor,
        sentence: torch.Tensor,
        image_indices: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """
        Returns the fused maps, stride -> `(B, d_model, h, w)`, from the output of
        [`~CrobimULanguageGuidedAggregation.pixel_sides`] (each expression reads the image `image_indices` names).
        """
        fused, coarser, word_context = {}, None, None
        for stride in reversed(BACKBONE_STRIDES):
            pixel_word_attention = self.pixel_word_attention[str(stride)]
            if pixel_word_attention.attention is None:
                # Stride 8's word context on the stride-4 grid.
                coarse_size = fused[2 * stride].shape[-2:]
                word_context = flatten_map(
                    F.interpolate(
                        unflatten_tokens(word_context, *coarse_size), size=pixel_sides[stride].size, mode="bilinear",
                        align_corners=False,
                    )
                )
            side = pixel_sides[stride].select(image_indices)
            feature_map, word_context = pixel_word_attention(
                side.pixels, side.query, side.vision, language, language_mask, sentence, word_context, size=side.size
            )
            if coarser is not None:
                upsampled = F.interpolate(coarser, size=feature_map.shape[-2:], mode="bilinear", align_corners=False)
                feature_map = self.smooth[str(stride)](upsampled.add_(feature_map)).add_(feature_map)
            fused[stride] = coarser = feature_map
        return fused


class CrobimUMutualInteractionLayer(GradientCheckpointingLayer):
    """One MID layer: the text reads the vision, the vision reads the (updated) text, then an FFN for each."""

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.text_norm = nn.LayerNorm(config.d_model)
        self.text_reads_vision = CrobimUAttention(config)
        self.vision_norm = nn.LayerNorm(config.d_model)
        self.vision_reads_text = CrobimUAttention(config)
        self.text_ffn_norm = nn.LayerNorm(config.d_model)
        self.text_ffn = CrobimUFeedForward(config)
        self.vision_ffn_norm = nn.LayerNorm(config.d_model)
        self.vision_ffn = CrobimUFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        vision: torch.Tensor,
        vision_position: torch.Tensor,
        language: torch.Tensor,
        language_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        language = language + self.dropout(
            self.text_reads_vision(self.text_norm(language), vision + vision_position, vision)
        )
        vision = vision + self.dropout(
            self.vision_reads_text(self.vision_norm(vision) + vision_position, language, language, language_mask)
        )
        language = language + self.dropout(self.text_ffn(self.text_ffn_norm(language)))
        vision = vision + self.dropout(self.vision_ffn(self.vision_ffn_norm(vision)))
        return vision, language


class CrobimUMutualInteractionDecoder(nn.Module):
    """
    MID: cascaded bidirectional cross-attention at strides 32, 16 and 8 (coarse to fine, each level starting from
    the upsampled result of the coarser one), then a mask head at stride 4. Each level adds the 2-D sine position
    encoding to its visual tokens, so that what the words read carries where it is.

    Our interpretation of the mask head: a stride-4 pixel embedding `E` (`mask_head_dim` channels; a 1x1 then a 3x3
    convolution, or with `mask_head_conv="separable"` a depthwise 3x3 and a 1x1) scored against a projection of the
    decoded sentence vector, `P_coarse = <E, q> / sqrt(mask_head_dim) + b`, so the final decision
    is conditioned on the language directly. With `mask_stride` below 4, `E` is upsampled onto the features of a
    [`CrobimUDetailStem`] and mixed with them by a 3x3 convolution before it is scored.
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.config = config
        self.levels = nn.ModuleDict(
            {
                str(stride): nn.ModuleList(
                    CrobimUMutualInteractionLayer(config) for _ in range(config.mid_layers_per_level)
                )
                for stride in DECODER_STRIDES
            }
        )
        if config.mask_head_conv == "full":
            smoothing = [conv_norm_act(config.mask_head_dim, config.mask_head_dim, 3)]
        else:  # depthwise 3x3, then pointwise: about a ninth of the full 3x3's products
            smoothing = [
                nn.Conv2d(config.mask_head_dim, config.mask_head_dim, 3, padding=1, groups=config.mask_head_dim, bias=False),
                conv_norm_act(config.mask_head_dim, config.mask_head_dim, 1),
            ]
        self.pixel_head = nn.Sequential(conv_norm_act(config.d_model, config.mask_head_dim, 1), *smoothing)
        self.detail_fuse = (
            conv_norm_act(config.mask_head_dim, config.mask_head_dim, 3) if config.mask_stride < 4 else None
        )
        self.sentence_norm = nn.LayerNorm(config.d_model)
        self.sentence_proj = nn.Linear(config.d_model, config.mask_head_dim)
        self.mask_bias = nn.Parameter(torch.zeros(1))
        self.pointers = CrobimUSpatialPointers(config) if config.num_pointers else None

    def forward(
        self,
        fused_maps: dict[int, torch.Tensor],
        language: torch.Tensor,
        language_mask: torch.Tensor,
        detail_map: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """
        Returns the coarse mask logits `(B, 1, H/s, W/s)`, the pixel embedding `(B, mask_head_dim, H/s, W/s)`, with
        `s` = 4, or the stride of `detail_map` (the [`CrobimUDetailStem`] features) where given, and the pointer
        logits `(B, num_pointers, H/8, W/8)` (`None` without pointers).
        """
        coarser = pointers = None
        for stride in (*DECODER_STRIDES, 4):
            feature_map = fused_maps[stride]
            if coarser is not None:
                feature_map = F.interpolate(
                    coarser, size=feature_map.shape[-2:], mode="bilinear", align_corners=False
                ).add_(feature_map)
            if stride == 4:
                break
            height, width = feature_map.shape[-2:]
            vision = flatten_map(feature_map)
            position = position_encoding(self.config, height, width, vision.device, vision.dtype)
            # Each token carries its place (as in a ViT), so that the words read where things are, not only which.
            vision = vision + position
            for layer in self.levels[str(stride)]:
                vision, language = layer(vision, position.unsqueeze(0), language, language_mask)
            if stride == 8 and self.pointers is not None:
                vision, pointers = self.pointers(vision, height, width, language, language_mask)
            coarser = unflatten_tokens(vision, height, width)

        pixel_embedding = self.pixel_head(feature_map)
        if detail_map is not None:
            upsampled = F.interpolate(pixel_embedding, size=detail_map.shape[-2:], mode="bilinear", align_corners=False)
            pixel_embedding = self.detail_fuse(upsampled + detail_map)
        if pointers is not None:
            pixel_embedding = pixel_embedding + self.pointers.pixel_geometry(pointers, pixel_embedding.shape[-2:])
        query = self.sentence_proj(self.sentence_norm(masked_mean(language, language_mask)))
        coarse_logits = torch.einsum("bchw,bc->bhw", pixel_embedding, query) / math.sqrt(query.shape[-1])
        pointer_logits = None if pointers is None else pointers.logits
        return (coarse_logits + self.mask_bias).unsqueeze(1), pixel_embedding, pointer_logits


@dataclass
class CrobimUPointers:
    """Where the spatial pointers point: their logits over the stride-8 grid, centres and spreads."""

    logits: torch.Tensor  # (B, K, h, w)
    centres: torch.Tensor  # (B, K, 2), (x, y) as fractions of the image side
    spreads: torch.Tensor  # (B, K, 2), standard deviation of the pointed-at place in x and y
    sentence: torch.Tensor  # (B, d_model), what the geometry is read against


class CrobimUGeometryEmbedding(nn.Module):
    """An MLP from per-location geometry features, conditioned on the sentence, to `out_dim` channels."""

    def __init__(self, num_features: int, config: CrobimUConfig, out_dim: int):
        super().__init__()
        self.features_proj = nn.Linear(num_features, config.d_model)
        self.sentence_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, out_dim)

    def forward(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """`features` `(B, N, num_features)`, `sentence` `(B, d_model)` -> `(B, N, out_dim)`."""
        hidden = F.gelu(self.features_proj(features) + self.sentence_proj(sentence).unsqueeze(1))
        return self.out_proj(hidden)


def pointer_geometry(grid: torch.Tensor, centres: torch.Tensor, spreads: torch.Tensor) -> torch.Tensor:
    """
    Geometry of every grid cell relative to each pointer: `(B, N, 5 * K)` from `grid` `(N, 2)` and pointers `(B, K,
    2)`: the offset (dx, dy) from the pointed-at place, the distance, and the place's spread in x and y.
    """
    offsets = grid[None, :, None, :] - centres[:, None, :, :]  # (B, N, K, 2)
    distance = offsets.square().sum(-1, keepdim=True).add(1e-6).sqrt()
    spreads = spreads[:, None, :, :].expand_as(offsets)
    return torch.cat([offsets, distance, spreads], dim=-1).flatten(2)


class CrobimUSpatialPointers(nn.Module):
    """
    Spatial pointers, after MID's stride-8 level (our addition; the papers have no such module; `num_pointers`).

    A relation ("the car left of the tennis court") compares a candidate's place with another object's, and a size or
    extreme word picks one object among its look-alikes. Attention lets a word read *what* the pixels show, and the
    positions let it read roughly where; neither hands the pixels an explicit comparison. Each pointer k:
    1. pools the words with a learned query (which words name the place: "the tennis court"), projects them to a
       query, and scores every stride-8 token against it; a softmax over the grid is where it points;
    2. takes the softmax-weighted centre and spread of the cell positions (a soft argmax);
    3. adds to every token an MLP of its offset and distance to that place, conditioned on the sentence, so that the
       next pointer and the rest of the decoder read "left of it", "near it".
    The mask head gets the same geometry relative to every pointer at its own stride, plus the pixel's own position.
    With two or more pointers, the first is trained towards the reference object where the data name it
    (`reference_labels`), and the last towards the target: locating the reference, then the target relative to it, as
    in the program-based referring models (CLEVR-Ref+'s relate step).
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        d_model, num_pointers = config.d_model, config.num_pointers
        self.num_pointers = num_pointers
        self.word_queries = nn.Parameter(torch.zeros(num_pointers, d_model))
        self.language_norm = nn.LayerNorm(d_model)
        self.query_proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_pointers))
        self.token_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_pointers))
        self.key_proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_pointers))
        self.token_geometry = nn.ModuleList(
            CrobimUGeometryEmbedding(5, config, d_model) for _ in range(num_pointers)
        )
        self.head_geometry = CrobimUGeometryEmbedding(5 * num_pointers + 2, config, config.mask_head_dim)

    def forward(
        self, vision: torch.Tensor, height: int, width: int, language: torch.Tensor, language_mask: torch.Tensor
    ) -> tuple[torch.Tensor, CrobimUPointers]:
        """`vision` `(B, h*w, d_model)` stride-8 tokens -> the tokens with geometry added, and the pointers."""
        grid = cell_centres(height, width, vision.device, vision.dtype)
        sentence = masked_mean(language, language_mask)
        normed_language = self.language_norm(language)
        word_scores = torch.einsum("bld,kd->bkl", normed_language, self.word_queries)
        word_weights = word_scores.masked_fill(~language_mask[:, None, :], float("-inf")).softmax(dim=-1)
        phrases = word_weights @ language  # (B, K, d_model)
        logits, centres, spreads = [], [], []
        for index in range(self.num_pointers):
            query = self.query_proj[index](phrases[:, index])
            keys = self.key_proj[index](self.token_norm[index](vision))
            pointer_logits = torch.einsum("bnd,bd->bn", keys, query) / math.sqrt(query.shape[-1])
            weights = pointer_logits.softmax(dim=-1)
            centre = weights @ grid  # (B, 2)
            spread = (weights @ grid.square() - centre.square()).clamp(min=0).add(1e-6).sqrt()
            geometry = pointer_geometry(grid, centre[:, None], spread[:, None])
            vision = vision + self.token_geometry[index](geometry, sentence)
            logits.append(pointer_logits)
            centres.append(centre)
            spreads.append(spread)
        pointers = CrobimUPointers(
            logits=torch.stack(logits, dim=1).unflatten(-1, (height, width)),
            centres=torch.stack(centres, dim=1),
            spreads=torch.stack(spreads, dim=1),
            sentence=sentence,
        )
        return vision, pointers

    def pixel_geometry(self, pointers: CrobimUPointers, size: tuple[int, int]) -> torch.Tensor:
        """The mask head's geometry channels `(B, mask_head_dim, *size)` (a channels-last view)."""
        height, width = size
        grid = cell_centres(height, width, pointers.centres.device, pointers.centres.dtype)
        features = pointer_geometry(grid, pointers.centres, pointers.spreads)
        features = torch.cat([features, grid.unsqueeze(0).expand(features.shape[0], -1, -1)], dim=-1)
        return unflatten_tokens(self.head_geometry(features, pointers.sentence), height, width)


def pointer_loss(pointer_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """
    Cross-entropy of pointer logits `(B, h, w)` towards the masks `(B, 1, H, W)` pooled to the grid and normalised to a
    distribution; samples with an empty mask do not count. Returns a scalar (0 when every mask is empty).
    """
    target = F.adaptive_avg_pool2d(masks.float(), pointer_logits.shape[-2:]).flatten(1)
    mass = target.sum(-1)
    present = mass > 0
    if not bool(present.any()):
        return pointer_logits.sum() * 0.0
    target = target[present] / mass[present, None]
    log_probabilities = pointer_logits.flatten(1)[present].float().log_softmax(dim=-1)
    return -(target * log_probabilities).sum(-1).mean()


class CrobimUDetailStem(nn.Sequential):
    """
    The image at `mask_stride` (2 or 1) for the mask head: 3x3 convolutions straight from the pixels, the first one
    strided. The backbone's first stage already sits at stride 4, where objects a few pixels across (vehicles, small
    ships) shrink to a cell or less; this path gives the decoder their edges back, as the skip connections of a
    U-Net do.

    Our interpretation: the papers decode at stride 4; this path is off there (`mask_stride=4`, the default).
    """

    def __init__(self, config: CrobimUConfig):
        num_channels = getattr(config.backbone_config, "num_channels", 3)
        super().__init__(
            conv_norm_act(num_channels, config.mask_head_dim, 3, stride=config.mask_stride),
            conv_norm_act(config.mask_head_dim, config.mask_head_dim, 3),
        )


# ---------------------------------------------------------------------------------------------------------------------
# CroBIM-U: RUS (where is the model unsure), UGF (more language there), UDLR (refine there)
# ---------------------------------------------------------------------------------------------------------------------


class CrobimUReferringUncertaintyScorer(nn.Module):
    """
    RUS: aligns the stride-32 visual tokens with the language tokens by scaled dot-product attention and emits one
    uncertainty logit per token, `U` of shape `(B, 1, H/32, W/32)`. Trained towards the online error-consistency
    target `E` (see [`error_consistency_target`]).

    Our interpretation: the scorer reads `[v, a, v * a]` (token, aligned language, their product) through a
    two-layer MLP; the output bias starts at log-odds -2 because most pixels are predicted correctly.
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.attention = CrobimUAttention(config)
        self.scorer = nn.Sequential(
            nn.Linear(3 * config.d_model, config.d_model), nn.GELU(), nn.Linear(config.d_model, 1)
        )

    def forward(self, feature_map: torch.Tensor, language: torch.Tensor, language_mask: torch.Tensor) -> torch.Tensor:
        height, width = feature_map.shape[-2:]
        tokens = self.norm(flatten_map(feature_map))
        aligned = self.attention(tokens, language, language, language_mask)
        logits = self.scorer(torch.cat([tokens, aligned, tokens * aligned], dim=-1))
        return unflatten_tokens(logits, height, width)


class CrobimUUncertaintyGatedFusion(GradientCheckpointingLayer):
    """
    UGF at one scale: a cross-attention "language increment" added to the visual tokens, scaled per channel by a
    gate that grows with the uncertainty `u = sigmoid(U)`: `v <- v + sigmoid(softplus(s) * u + b) * increment`.

    Our interpretation: the slope `softplus(s)` keeps the gate monotone in `u`; `s` and `b` start from
    `ugf_gate_scale_init` and `ugf_gate_bias_init`, so at the start sure tokens get about 12% of the increment and
    fully uncertain ones 88%.
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.attention = CrobimUAttention(config)
        self.gate_scale = nn.Parameter(torch.zeros(config.d_model))
        self.gate_bias = nn.Parameter(torch.zeros(config.d_model))

    def forward(
        self,
        feature_map: torch.Tensor,
        uncertainty: torch.Tensor,
        language: torch.Tensor,
        language_mask: torch.Tensor,
    ) -> torch.Tensor:
        height, width = feature_map.shape[-2:]
        tokens = flatten_map(feature_map)
        increment = self.attention(self.norm(tokens), language, language, language_mask)
        uncertainty = F.interpolate(uncertainty, size=(height, width), mode="bilinear", align_corners=False)
        gate = torch.sigmoid(F.softplus(self.gate_scale) * flatten_map(uncertainty) + self.gate_bias)
        return unflatten_tokens(tokens + gate * increment, height, width)


class CrobimULocalRefiner(nn.Module):
    """
    UDLR: a light convolutional refiner predicts residual logits `R` at stride 4 from the pixel embedding, the coarse
    logits and the uncertainty; a soft mask `M = sigmoid((u - udlr_mask_threshold) / udlr_mask_temperature)` decides
    where they apply: `P = P_coarse + M * R`.

    Our interpretation: the last refiner layer starts at zero, so UDLR starts as the identity and learns residuals
    only where they lower the loss. With `udlr_mask_mode="adaptive"` the threshold is per image, lowered to the
    uncertainty its `udlr_adaptive_share` most uncertain pixels reach (see [`CrobimUConfig`]).
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__()
        self.mask_threshold = config.udlr_mask_threshold
        self.mask_temperature = config.udlr_mask_temperature
        self.mask_mode = config.udlr_mask_mode
        self.adaptive_share = config.udlr_adaptive_share
        self.refiner = nn.Sequential(
            conv_norm_act(config.mask_head_dim + 2, config.udlr_hidden_dim, 3),
            conv_norm_act(config.udlr_hidden_dim, config.udlr_hidden_dim, 3),
        )
        self.residual = nn.Conv2d(config.udlr_hidden_dim, 1, 1)

    def forward(
        self, pixel_embedding: torch.Tensor, coarse_logits: torch.Tensor, uncertainty: torch.Tensor
    ) -> torch.Tensor:
        uncertainty = F.interpolate(uncertainty, size=coarse_logits.shape[-2:], mode="bilinear", align_corners=False)
        # The two one-channel maps join in the pixel embedding's layout: a cat of mixed layouts writes a contiguous
        # map with a strided pass (five times slower than the cat itself at stride 4).
        layout = (
            torch.channels_last if pixel_embedding.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        maps = torch.cat([coarse_logits, uncertainty], dim=1).contiguous(memory_format=layout)
        residual = self.residual(self.refiner(torch.cat([pixel_embedding, maps], dim=1)))
        region = torch.sigmoid((uncertainty - self.mask_threshold_of(uncertainty)) / self.mask_temperature)
        return coarse_logits + region * residual

    def mask_threshold_of(self, uncertainty: torch.Tensor) -> torch.Tensor | float:
        """
        The mask's midpoint: `udlr_mask_threshold`, or in adaptive mode one per image `(B, 1, 1, 1)`, the k-th
        smallest uncertainty with `k = ceil((1 - share) * pixels)` (so at least `share` of the pixels reach it),
        capped at `udlr_mask_threshold`.
        """
        if self.mask_mode == "fixed":
            return self.mask_threshold
        values = uncertainty.flatten(1).float()
        # kthvalue rather than quantile: no input-size limit, and the value is one of the map's own.
        rank = min(values.shape[1], max(1, math.ceil((1 - self.adaptive_share) * values.shape[1])))
        threshold = values.kthvalue(rank, dim=1).values.clamp(max=self.mask_threshold)
        return threshold.view(-1, 1, 1, 1).to(uncertainty.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, averaged over the batch; `logits` and `targets` of shape `(B, 1, H, W)`."""
    probabilities = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probabilities * targets).sum(-1)
    total = probabilities.sum(-1) + targets.sum(-1)
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, bce_weight: float, dice_weight: float
) -> torch.Tensor:
    """`Lseg = bce_weight * BCE + dice_weight * Dice` (the field's recipe is 0.9 / 0.1)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    return bce_weight * bce + dice_weight * dice_loss(logits, targets)


def error_consistency_target(
    logits: torch.Tensor, targets: torch.Tensor, grid_size: tuple[int, int], kind: str, pooling: str
) -> torch.Tensor:
    """
    The online error-consistency target of RUS: where the model's own current prediction (detached) disagrees
    with the ground truth, pooled to the RUS grid.

    Args:
        logits (`torch.Tensor` of shape `(B, 1, H, W)`): the mask logits whose errors are read: the final `P`, or
            the upsampled coarse `P_coarse` (`uncertainty_target_source`).
        targets (`torch.Tensor` of shape `(B, 1, H, W)`): the ground truth `G` in {0, 1}.
        grid_size (`tuple[int, int]`): the RUS grid `(H/32, W/32)`.
        kind (`str`): `"soft"`, `|sigmoid(P) - G|`, or `"hard"`, `1[(sigmoid(P) > 0.5) != G]`.
        pooling (`str`): `"avg"` (share of error in the cell) or `"max"` (any error in the cell).

    Returns:
        `torch.Tensor` of shape `(B, 1, *grid_size)` in [0, 1], without gradient.
    """
    with torch.no_grad():
        probabilities = torch.sigmoid(logits.float())
        if kind == "soft":
            error = (probabilities - targets).abs()
        else:
            error = ((probabilities > 0.5).float() != targets).float()
        pool = F.adaptive_avg_pool2d if pooling == "avg" else F.adaptive_max_pool2d
        return pool(error, grid_size)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class CrobimUPreTrainedModel(PreTrainedModel):
    config_class = CrobimUConfig
    config: CrobimUConfig
    base_model_prefix = "crobim_u"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CrobimUPromptModulationLayer", "CrobimUMutualInteractionLayer"]
    # The loss is a mean over the batch: the Trainer must not rescale it by the number of items.
    accepts_loss_kwargs = False

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs: Any) -> None:
        """
        Checkpoints the innermost checkpointable layers only. Swin marks both its stages and the layers inside them:
        the stage's recomputation would run each of its layers once more, for no memory saved (the peak is one
        layer's activations either way).
        """
        super()._set_gradient_checkpointing(enable=enable, **kwargs)
        if not enable:
            return
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer) and any(
                isinstance(inner, GradientCheckpointingLayer) for inner in module.modules() if inner is not module
            ):
                module.gradient_checkpointing = False

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """
        Saves the weights (safetensors), the config and the code of every shipped module (model, config,
        processors, pipeline), so the folder loads and runs the pipeline with `trust_remote_code=True` alone.
        """
        # Only the saved config carries the pipeline entry: in memory it would make `pipeline(model=model)` ask for
        # `trust_remote_code` even where the package is installed.
        had_entry = hasattr(self.config, "custom_pipelines")
        self.config.custom_pipelines = CUSTOM_PIPELINES
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if not had_entry:
                del self.config.custom_pipelines
        if not kwargs.get("is_main_process", True) or not os.path.isdir(save_directory):
            return
        here = os.path.dirname(os.path.abspath(__file__))
        for module_name in SHIPPED_MODULES:
            source, target = os.path.join(here, f"{module_name}.py"), os.path.join(save_directory, f"{module_name}.py")
            # A model loaded as remote code may not have every sibling next to it: ship what there is.
            if os.path.isfile(source) and not os.path.isfile(target):
                shutil.copyfile(source, target)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, CrobimUContextAwarePromptModulation):
            init.normal_(module.prompts, std=std)
            init.normal_(module.level_embeddings, std=std)
        elif isinstance(module, CrobimUUncertaintyGatedFusion):
            # Inverse softplus, so that softplus(gate_scale) starts at ugf_gate_scale_init.
            scale = self.config.ugf_gate_scale_init
            init.constant_(module.gate_scale, math.log(math.expm1(scale)) if scale < 20 else scale)
            init.constant_(module.gate_bias, self.config.ugf_gate_bias_init)
        elif isinstance(module, CrobimUReferringUncertaintyScorer):
            init.constant_(module.scorer[-1].bias, UNCERTAINTY_PRIOR_LOGIT)
        elif isinstance(module, CrobimULocalRefiner):
            init.zeros_(module.residual.weight)
            init.zeros_(module.residual.bias)
        elif isinstance(module, CrobimUMutualInteractionDecoder):
            init.zeros_(module.mask_bias)
        elif isinstance(module, CrobimUSpatialPointers):
            init.normal_(module.word_queries, std=std)


class CrobimUForReferringSegmentation(CrobimUPreTrainedModel):
    r"""
    CroBIM-U for referring segmentation: given images and referring expressions, predicts the mask of the object
    each expression refers to, and (with RUS) a referring-uncertainty map.

    One image with several expressions: pass each image once in `pixel_values` and, in `image_indices`, the index
    of the image each expression refers to. The image encoder then runs once per image, e.g.
    `model(pixel_values[:1], input_ids[:8], attention_mask[:8], image_indices=torch.zeros(8, dtype=torch.long))`.
    """

    def __init__(self, config: CrobimUConfig):
        super().__init__(config)
        self.backbone = AutoBackbone.from_config(config.backbone_config)
        if len(self.backbone.channels) != len(BACKBONE_STRIDES):
            raise ValueError(
                f"The backbone must output {len(BACKBONE_STRIDES)} feature maps (strides {BACKBONE_STRIDES}), "
                f"got {len(self.backbone.channels)}."
            )
        self.text_encoder = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.visual_proj = nn.ModuleDict(
            {
                str(stride): nn.Sequential(
                    nn.Conv2d(channels, config.d_model, 1, bias=False),
                    nn.GroupNorm(math.gcd(8, config.d_model), config.d_model),
                )
                for stride, channels in zip(BACKBONE_STRIDES, self.backbone.channels)
            }
        )
        self.text_proj = nn.Sequential(
            nn.Linear(config.text_config.hidden_size, config.d_model), nn.LayerNorm(config.d_model)
        )
        self.capm = CrobimUContextAwarePromptModulation(config)
        self.lgfa = CrobimULanguageGuidedAggregation(config)
        self.rus = CrobimUReferringUncertaintyScorer(config) if config.use_rus else None
        self.ugf = (
            nn.ModuleDict({str(stride): CrobimUUncertaintyGatedFusion(config) for stride in config.ugf_levels})
            if config.use_ugf
            else None
        )
        self.mid = CrobimUMutualInteractionDecoder(config)
        self.detail_stem = CrobimUDetailStem(config) if config.mask_stride < 4 else None
        self.udlr = CrobimULocalRefiner(config) if config.use_udlr else None
        self.post_init()

    @classmethod
    def from_pretrained_components(
        cls,
        backbone: str,
        text_encoder: str,
        config: CrobimUConfig | None = None,
        **overrides: Any,
    ) -> CrobimUForReferringSegmentation:
        """
        Builds a model around a pretrained image backbone and text encoder, loading each one's weights once; the
        fusion, decoder and uncertainty modules start from random initialisation. Weights load from safetensors
        only (a component published as a pickled `pytorch_model.bin` alone is refused).

        Args:
            backbone (`str`):
                Hub id or local folder of an AutoBackbone-compatible vision model with four stages (Swin,
                ConvNeXt, ...), e.g. `"microsoft/swin-base-patch4-window12-384-in22k"`.
            text_encoder (`str`):
                Hub id or local folder of a BERT-like encoder, e.g. `"google-bert/bert-base-uncased"`.
            config (`CrobimUConfig`, *optional*):
                Settings of the fusion and uncertainty modules; its sub-configs are replaced by the components'.
            overrides:
                Config fields to set, e.g. `use_udlr=False`.
        """
        # `AutoBackbone.from_pretrained` asks the Hub whether the id exists, even for a local folder: resolve the
        # backbone class from the component's config instead.
        backbone_class = MODEL_FOR_BACKBONE_MAPPING[type(AutoConfig.from_pretrained(backbone))]
        backbone_model = backbone_class.from_pretrained(backbone, out_features=FOUR_STAGES, use_safetensors=True)
        text_model = AutoModel.from_pretrained(text_encoder, add_pooling_layer=False, use_safetensors=True)
        settings = config.to_dict() if config is not None else {}
        for key in ("backbone_config", "text_config", "model_type", "transformers_version", "architectures"):
            settings.pop(key, None)
        settings.update(overrides)
        full_config = CrobimUConfig(
            backbone_config=backbone_model.config.to_dict(), text_config=text_model.config.to_dict(), **settings
        )
        model = cls(full_config)
        # Swap the randomly initialised encoders for the loaded ones instead of copying their weights again.
        model.backbone = backbone_model
        model.text_encoder = text_model
        model.config.backbone_config = backbone_model.config
        model.config.text_config = text_model.config
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.text_encoder.get_input_embeddings()

    def encode_image(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """
        Runs the image encoder once and projects its four feature maps to `d_model`.

        Returns:
            `dict[int, torch.Tensor]`: stride -> `(B_images, d_model, H/stride, W/stride)`.
        """
        self._check_pixel_values(pixel_values)
        return self._encode_checked_image(pixel_values)

    def _encode_checked_image(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """`encode_image` without the check of `pixel_values`, for `forward`, which has checked them already."""
        feature_maps = self.backbone(pixel_values).feature_maps
        return {
            stride: self.visual_proj[str(stride)](feature_map)
            for stride, feature_map in zip(BACKBONE_STRIDES, feature_maps)
        }

    def encode_text(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        text_hidden_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Returns the projected word tokens `(B, L, d_model)` and the boolean word mask `(B, L)`.

        `text_hidden_states`, the text encoder's last hidden states computed beforehand, skip the text encoder.
        """
        if text_hidden_states is None:
            if input_ids is None:
                raise ValueError("encode_text needs input_ids or text_hidden_states.")
            if input_ids.ndim != 2:
                raise ValueError(
                    f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}."
                )
            shape = input_ids.shape
        else:
            hidden_size = self.config.text_config.hidden_size
            if text_hidden_states.ndim != 3 or text_hidden_states.shape[-1] != hidden_size:
                raise ValueError(
                    f"text_hidden_states must have shape (batch_size, sequence_length, {hidden_size}) (the text "
                    f"encoder's hidden size), got {tuple(text_hidden_states.shape)}."
                )
            shape = text_hidden_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=self.device)
        if attention_mask.shape != shape:
            source = "input_ids" if text_hidden_states is None else "text_hidden_states"
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match {source} {tuple(shape)}."
            )
        if text_hidden_states is None:
            text_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                text_kwargs["token_type_ids"] = token_type_ids
            text_hidden_states = self.text_encoder(**text_kwargs).last_hidden_state
        words = self.text_proj(text_hidden_states)
        word_mask = attention_mask.bool()
        check_attended(word_mask)
        return words, word_mask

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raises a `ValueError` unless `pixel_values` is `(B, num_channels, H, W)` with `H` and `W` multiples of 32."""
        num_channels = getattr(self.config.backbone_config, "num_channels", 3)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(
                f"pixel_values height and width must be multiples of 32 (the coarsest stride), got {height}x{width}; "
                "the image processor resizes to 480x480 by default."
            )

    def _check_labels(
        self, labels: torch.Tensor, batch_size: int, height: int, width: int, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Checks `labels` (a `ValueError` if wrong); returns them as float `(B, 1, H, W)` on `pixel_values`' device."""
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (batch_size, height, width):
            raise ValueError(
                f"labels must have shape (batch_size, height, width) = ({batch_size}, {height}, {width}) to match "
                f"input_ids and pixel_values, got {tuple(labels.shape)}."
            )
        if labels.device.type == "meta":
            raise ValueError(
                f"labels are on the meta device (no data); pass them on a real device, e.g. {pixel_values.device}."
            )
        if labels.is_complex():
            raise ValueError(f"labels must be real binary masks in {{0, 1}}, got dtype {labels.dtype}.")
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels contain NaN or Inf; they must be binary masks in {0, 1}.")
        labels = labels.to(device=pixel_values.device, dtype=torch.float32)
        if bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError(
                f"labels must be binary masks in {{0, 1}}, got values {labels.unique()[:8].tolist()}; "
                "the image processor binarizes masks."
            )
        return labels.unsqueeze(1)

    def _check_forward_inputs(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None,
        text_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        text_hidden_states: torch.Tensor | None,
        image_indices: torch.Tensor | None,
        labels: torch.Tensor | None,
        reference_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """
        Checks `forward`'s inputs before any module runs, and raises a `ValueError` that names the first wrong one:
        one text source, its batch size, `pixel_values`, the image count or `image_indices`, then the labels.

        The shapes of `input_ids`, `text_hidden_states` and `attention_mask` are checked by `encode_text`, which
        `forward` calls after encoding the images.

        Returns:
            `labels` and `reference_labels` (each `None` where not given) as float `(B, 1, H, W)` tensors on the
            device of `pixel_values`.
        """
        text_sources = [name for name, value in (
            ("input_ids", input_ids), ("text_embeddings", text_embeddings), ("text_hidden_states", text_hidden_states)
        ) if value is not None]
        if len(text_sources) != 1:
            raise ValueError(
                "Pass exactly one of input_ids, text_embeddings and text_hidden_states, got "
                f"{', '.join(text_sources) or 'none'}."
            )
        if text_embeddings is not None:
            words, word_mask = text_embeddings
            if words.ndim != 3 or words.shape[-1] != self.config.d_model or word_mask.shape != words.shape[:2]:
                raise ValueError(
                    f"text_embeddings must be words (batch_size, sequence_length, {self.config.d_model}) and a mask "
                    f"(batch_size, sequence_length), got {tuple(words.shape)} and {tuple(word_mask.shape)}."
                )
            check_attended(word_mask)
            batch_size = words.shape[0]
        else:
            batch_size = (input_ids if input_ids is not None else text_hidden_states).shape[0]
        self._check_pixel_values(pixel_values)
        if image_indices is None and pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} images for {batch_size} expressions; pass "
                "image_indices to pair several expressions with one image."
            )
        if image_indices is not None:
            if image_indices.shape != (batch_size,):
                raise ValueError(
                    f"image_indices must have shape ({batch_size},), one image index per expression, "
                    f"got {tuple(image_indices.shape)}."
                )
            if batch_size and (image_indices.min() < 0 or image_indices.max() >= pixel_values.shape[0]):
                raise ValueError(f"image_indices must lie in [0, {pixel_values.shape[0] - 1}], got {image_indices.tolist()}.")
        height, width = pixel_values.shape[-2:]
        if labels is not None:
            labels = self._check_labels(labels, batch_size, height, width, pixel_values)
        if reference_labels is not None:
            if labels is None:
                raise ValueError("reference_labels are a training target: pass labels too.")
            reference_labels = self._check_labels(reference_labels, batch_size, height, width, pixel_values)
        return labels, reference_labels

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
        image_indices: torch.Tensor | None = None,
        text_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_hidden_states: torch.Tensor | None = None,
        global_step: int | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CrobimUSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
                Images from [`CrobimUImageProcessor`]; height and width multiples of 32.
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Tokenised referring expressions, one per sample.
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens to attend to, 0 for padding.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Passed to the text encoder.
            labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
                Ground-truth masks in {0, 1} at the input resolution; the loss is computed when given.
            reference_labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
                With `labels` and two or more spatial pointers: the mask of the object each expression names as its
                reference ("the tennis court" in "the car left of the tennis court"), all zeros where it names none;
                the first pointer is trained towards it (the synthetic benchmark's `reference_mask`).
            image_indices (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                For each expression, the index of its image in `pixel_values`; lets several expressions share one
                image encoding. Without it, `num_images` must equal `batch_size`.
            text_embeddings (`tuple(torch.FloatTensor, torch.BoolTensor)`, *optional*):
                The output of [`~CrobimUForReferringSegmentation.encode_text`], words `(batch_size, sequence_length,
                d_model)` and their mask, instead of `input_ids`: encode an expression once and reuse it, e.g. over
                the windows of a large scene.
            text_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`, *optional*):
                The text encoder's last hidden states, computed beforehand, instead of `input_ids`: with a frozen
                text encoder, a training set's expressions can be encoded once rather than at every step.
                `attention_mask` still marks their padding.
            global_step (`int`, *optional*):
                The optimisation step, for the warm-up of the uncertainty loss (`uncertainty_warmup_steps`).
                `None` applies the full weight.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        labels, reference_labels = self._check_forward_inputs(
            pixel_values, input_ids, text_embeddings, text_hidden_states, image_indices, labels, reference_labels
        )
        height, width = pixel_values.shape[-2:]

        # Everything that depends on the image alone runs once per image; expressions pick their image's results.
        visual_maps = self._encode_checked_image(pixel_values)
        image_context = self.capm.image_context(visual_maps)
        pixel_sides = self.lgfa.pixel_sides(visual_maps)
        if text_embeddings is None:
            words, word_mask = self.encode_text(input_ids, attention_mask, token_type_ids, text_hidden_states)
        else:
            words, word_mask = text_embeddings

        language, language_mask = self.capm(words, word_mask, image_context, image_indices)
        sentence = masked_mean(language, language_mask)
        fused_maps = self.lgfa(pixel_sides, language, language_mask, sentence, image_indices)

        uncertainty_logits = uncertainty = None
        if self.rus is not None:
            uncertainty_logits = self.rus(fused_maps[32], language, language_mask)
            read_logits = uncertainty_logits.detach() if self.config.detach_uncertainty else uncertainty_logits
            uncertainty = torch.sigmoid(read_logits)
        if self.ugf is not None:
            for stride, gated_fusion in self.ugf.items():
                fused_maps[int(stride)] = gated_fusion(fused_maps[int(stride)], uncertainty, language, language_mask)

        detail_map = None
        if self.detail_stem is not None:
            detail_map = self.detail_stem(pixel_values)
            detail_map = select_images(detail_map, image_indices)
        coarse_logits, pixel_embedding, pointer_logits = self.mid(fused_maps, language, language_mask, detail_map)
        fine_logits = coarse_logits if self.udlr is None else self.udlr(pixel_embedding, coarse_logits, uncertainty)
        logits = F.interpolate(fine_logits, size=(height, width), mode="bilinear", align_corners=False)

        losses = {}
        if labels is not None:
            losses = self._compute_losses(
                logits, coarse_logits, uncertainty_logits, pointer_logits, labels, reference_labels, global_step
            )
        output = CrobimUSegmentationOutput(
            logits=logits,
            coarse_logits=coarse_logits,
            uncertainty_logits=uncertainty_logits,
            pointer_logits=pointer_logits,
            **losses,
        )
        return output if return_dict else output.to_tuple()

    def uncertainty_warmup(self, global_step: int | None) -> float:
        """The factor in [0, 1] on `λu` at `global_step`: a linear ramp over `uncertainty_warmup_steps`."""
        warmup_steps = self.config.uncertainty_warmup_steps
        if global_step is None or warmup_steps == 0:
            return 1.0
        return min(1.0, (global_step + 1) / warmup_steps)

    def _compute_losses(
        self,
        logits: torch.Tensor,
        coarse_logits: torch.Tensor,
        uncertainty_logits: torch.Tensor | None,
        pointer_logits: torch.Tensor | None,
        labels: torch.Tensor,
        reference_labels: torch.Tensor | None,
        global_step: int | None,
    ) -> dict[str, torch.Tensor | None]:
        """
        The training loss and its terms, keyed by their fields in [`CrobimUSegmentationOutput`]: `loss`,
        `segmentation_loss`, `coarse_loss`, `uncertainty_loss`, `uncertainty_target` and `pointer_loss` (`None` for
        the terms of switched-off modules). `labels` and `reference_labels` are as `_check_labels` returns them.
        """
        config = self.config
        height, width = logits.shape[-2:]
        coarse = uncertainty_loss = uncertainty_target = pointer_error = None
        segmentation = segmentation_loss(logits, labels, config.bce_weight, config.dice_weight)
        loss = segmentation
        # Without UDLR the coarse logits are the final ones.
        coarse_full = logits
        if self.udlr is not None:
            coarse_full = F.interpolate(coarse_logits, size=(height, width), mode="bilinear", align_corners=False)
            coarse = segmentation_loss(coarse_full, labels, config.bce_weight, config.dice_weight)
            loss = loss + config.coarse_loss_weight * coarse
        if uncertainty_logits is not None:
            # "coarse": errors before UDLR, so that UDLR's corrections do not close its own mask.
            target_logits = coarse_full if config.uncertainty_target_source == "coarse" else logits
            uncertainty_target = error_consistency_target(
                target_logits, labels, tuple(uncertainty_logits.shape[-2:]), config.uncertainty_target,
                config.uncertainty_pooling,
            )
            uncertainty_loss = F.binary_cross_entropy_with_logits(uncertainty_logits.float(), uncertainty_target)
            loss = loss + config.uncertainty_loss_weight * self.uncertainty_warmup(global_step) * uncertainty_loss
        if pointer_logits is not None:
            pointer_error = pointer_loss(pointer_logits[:, -1], labels)
            if reference_labels is not None and pointer_logits.shape[1] > 1:
                pointer_error = pointer_error + pointer_loss(pointer_logits[:, 0], reference_labels)
            loss = loss + config.pointer_loss_weight * pointer_error
        return {
            "loss": loss,
            "segmentation_loss": segmentation,
            "coarse_loss": coarse,
            "uncertainty_loss": uncertainty_loss,
            "uncertainty_target": uncertainty_target,
            "pointer_loss": pointer_error,
        }


__all__ = ["CrobimUPreTrainedModel", "CrobimUForReferringSegmentation", "CrobimUSegmentationOutput"]
