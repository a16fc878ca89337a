"""CroBIM-U model configuration."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# The feature strides an AutoBackbone must produce, in order: CAPM, LGFA and MID read all four.
BACKBONE_STRIDES = (4, 8, 16, 32)
FOUR_STAGES = ["stage1", "stage2", "stage3", "stage4"]
# Strides the mask head can work at (below 4 through an image stem, see `mask_stride`).
MASK_STRIDES = (4, 2, 1)
POSITION_ENCODINGS = ("sine", "none")
# The stride-4 path's settings: the first choice of each is the papers' (and the default).
LIGHTER_PATH_CHOICES = {
    "lgfa_fine_attention": ("full", "upsampled"),
    "lgfa_fine_smoothing": ("separable", "depthwise"),
    "mask_head_conv": ("full", "separable"),
}
UDLR_MASK_MODES = ("fixed", "adaptive")
UNCERTAINTY_TARGET_SOURCES = ("final", "coarse")

# Named presets. Full-size presets follow the recipe of the field (Swin-B window 12 or ConvNeXt-B, BERT-base,
# 480x480 inputs); `tiny` keeps tests and the CPU demo fast.
_BERT_BASE = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
# The full-size presets keep the papers' stride-4 path. Of the lighter settings, `lgfa_fine_attention="upsampled"`
# and a half-width `udlr_hidden_dim` lost over a point of the demo's mIoU on one seed; `mask_head_conv="separable"`
# lost 1.9 points on the relation family over three seeds, and 2.4 with `lgfa_fine_smoothing="depthwise"`
# (BENCHMARKS.md, "A lighter stride-4 path"). They stay config fields for users who trade accuracy for speed.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "backbone_config": {
            "model_type": "swin",
            "image_size": 256,
            "embed_dim": 16,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 2, 2, 4],
            "window_size": 8,
            "out_features": FOUR_STAGES,
        },
        "text_config": {
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 64,
        },
        "d_model": 64,
        "num_attention_heads": 4,
        "num_prompts": 4,
        "ffn_dim": 128,
        "mask_head_dim": 32,
        "udlr_hidden_dim": 16,
    },
    "swin-base": {
        "backbone_config": {
            "model_type": "swin",
            "image_size": 384,
            "embed_dim": 128,
            "depths": [2, 2, 18, 2],
            "num_heads": [4, 8, 16, 32],
            "window_size": 12,
            "drop_path_rate": 0.3,
            "out_features": FOUR_STAGES,
        },
        "text_config": _BERT_BASE,
    },
    "convnext-base": {
        "backbone_config": {
            "model_type": "convnext",
            "hidden_sizes": [128, 256, 512, 1024],
            "depths": [3, 3, 27, 3],
            "drop_path_rate": 0.3,
            "out_features": FOUR_STAGES,
        },
        "text_config": _BERT_BASE,
    },
}


class CrobimUConfig(PreTrainedConfig):
    r"""
    Configuration of [`CrobimUForReferringSegmentation`]: an AutoBackbone image encoder, a BERT-style text encoder,
    CroBIM's bidirectional fusion (CAPM, LGFA, MID) and CroBIM-U's uncertainty modules (RUS, UGF, UDLR). With
    `use_rus=use_ugf=use_udlr=False` the model is the CroBIM base.

    The defaults describe the `swin-base` preset, with the papers' stride-4 path. Use [`CrobimUConfig.from_preset`] for
    `tiny`, `swin-base` and `convnext-base`.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of any AutoBackbone with four stages at strides 4, 8, 16 and 32 (Swin, ConvNeXt, ...). Defaults
            to Swin-B with window 12.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of a BERT-like text encoder (anything `AutoModel` builds that returns `last_hidden_state`).
            Defaults to BERT-base-uncased.
        d_model (`int`, *optional*, defaults to 256):
            Width of the fusion, decoder and uncertainty modules.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Heads of every cross-modal attention; must divide `d_model`.
        ffn_dim (`int`, *optional*, defaults to 512):
            Hidden width of the feed-forward blocks of CAPM and MID.
        num_prompts (`int`, *optional*, defaults to 10):
            Learnable CAPM prompt tokens, prepended to the word tokens.
        capm_num_layers (`int`, *optional*, defaults to 1):
            CAPM layers (self-attention over prompts and words, cross-attention to the visual context, FFN).
        mid_layers_per_level (`int`, *optional*, defaults to 1):
            Bidirectional MID layers at each of strides 32, 16 and 8 (coarse to fine).
        mask_head_dim (`int`, *optional*, defaults to 128):
            Width of the pixel embedding that the mask head and UDLR read.
        mask_stride (`int`, *optional*, defaults to 4):
            Stride of the mask head, 4, 2 or 1. Below 4, a light convolutional stem reads the image at that stride
            and the stride-4 pixel embedding is upsampled onto it (a U-Net-style detail path): objects a few pixels
            across, such as vehicles, are lost at stride 4.
        lgfa_fine_attention (`str`, *optional*, defaults to `"full"`):
            `"full"`: LGFA's pixel-word attention runs at every stride (the papers); `"upsampled"`: stride 4 has none
            and its pixels are modulated by stride 8's word context, bilinearly upsampled (our lighter stride-4 path:
            about 4 GFLOP less per expression for Swin-B at 480x480).
        lgfa_fine_smoothing (`str`, *optional*, defaults to `"separable"`):
            LGFA's top-down smoothing at stride 4: `"separable"` (depthwise 3x3 then pointwise, as at the coarser
            strides) or `"depthwise"` (the depthwise 3x3 alone).
        mask_head_conv (`str`, *optional*, defaults to `"full"`):
            The MID pixel head's 3x3 convolution: `"full"` or `"separable"` (depthwise 3x3 then pointwise).
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after attention and feed-forward blocks.
        position_encoding (`str`, *optional*, defaults to `"sine"`):
            `"sine"`: 2-D sine positions in CAPM's visual context and MID's visual tokens; `"none"`: no positions (a
            position-blind control for measuring what the positions are worth; not for use).
        num_pointers (`int`, *optional*, defaults to 0):
            Spatial pointers at stride 8 (our addition, see [`CrobimUSpatialPointers`]): each picks one place in the
            image with a softmax over the stride-8 tokens, and every token and mask-head pixel is told its offset
            and distance to it. With two or more, the first is trained towards the object a relational expression
            names (where `reference_labels` are given) and the last towards the target. 0 turns them off.
        pointer_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the pointers' cross-entropy towards the target (and the reference, where given), each pooled
            to the stride-8 grid.
        use_rus (`bool`, *optional*, defaults to `True`):
            Referring Uncertainty Scorer: one uncertainty logit per stride-32 token.
        use_ugf (`bool`, *optional*, defaults to `True`):
            Uncertainty-Gated Fusion at `ugf_levels`; needs `use_rus`.
        use_udlr (`bool`, *optional*, defaults to `True`):
            Uncertainty-Driven Local Refinement at `mask_stride`; needs `use_rus`.
        ugf_levels (`list[int]`, *optional*, defaults to `[8, 16, 32]`):
            Strides (from 4, 8, 16, 32) at which UGF adds its gated language increment.
        ugf_gate_scale_init (`float`, *optional*, defaults to 4.0):
            Initial slope `s` of the gate `g = sigmoid(s * u + b)` over the uncertainty `u` in [0, 1]; the slope
            stays positive (softplus), so the gate always grows with uncertainty.
        ugf_gate_bias_init (`float`, *optional*, defaults to -2.0):
            Initial offset `b` of the UGF gate: sure regions start with a small language increment.
        udlr_hidden_dim (`int`, *optional*, defaults to 64):
            Width of the UDLR refiner.
        udlr_mask_threshold (`float`, *optional*, defaults to 0.15):
            Uncertainty `u` at which the UDLR soft mask `M = sigmoid((u - threshold) / temperature)` is one half.
        udlr_mask_temperature (`float`, *optional*, defaults to 0.05):
            Softness of the UDLR mask.
        udlr_mask_mode (`str`, *optional*, defaults to `"fixed"`):
            Where the UDLR mask's midpoint sits. `"fixed"`: at `udlr_mask_threshold` for every image. `"adaptive"`
            (our alternative): per image at `min(udlr_mask_threshold, q)`, where `q` is the uncertainty that the
            `udlr_adaptive_share` most uncertain pixels of the image reach (at the refiner's resolution), so that the
            mask is at least one half on at least that share of every image. Why: RUS predicts the share of wrong
            pixels in a 32x32 cell, so a boundary error or a small missed object gives `u` of about 0.06-0.12, below
            the fixed midpoint 0.15 (mask 0.06-0.26), and `u` shrinks as training errors become rare; a threshold
            ranked within each image, as PointRend ranks points, keeps refining the most uncertain places whatever
            the map's overall level. It never opens the mask less than `"fixed"`.
        udlr_adaptive_share (`float`, *optional*, defaults to 0.1):
            With `udlr_mask_mode="adaptive"`, the share of each image's pixels, in (0, 1), whose mask is at least one
            half. 0.1 is about the area that a small target and its boundary touch on the coarse map of a 160-pixel
            scene (cells of 32x32 pixels, each 4% of it).
        bce_weight (`float`, *optional*, defaults to 0.9):
            Weight of the binary cross-entropy in the segmentation loss `Lseg`.
        dice_weight (`float`, *optional*, defaults to 0.1):
            Weight of the Dice loss in `Lseg`.
        coarse_loss_weight (`float`, *optional*, defaults to 0.4):
            `λc`, weight of `Lseg` on the coarse logits (used only when UDLR is on; otherwise they are the logits).
        uncertainty_loss_weight (`float`, *optional*, defaults to 1.0):
            `λu`, weight of the RUS loss `BCE(U, E)`.
        uncertainty_target (`str`, *optional*, defaults to `"soft"`):
            `"soft"`: `E = |sigmoid(P) - G|`; `"hard"`: `E = 1` where the thresholded prediction is wrong.
        uncertainty_pooling (`str`, *optional*, defaults to `"avg"`):
            How the error map is pooled to the RUS grid: `"avg"` (share of error in the cell) or `"max"`.
        uncertainty_target_source (`str`, *optional*, defaults to `"final"`):
            The prediction whose errors make the RUS target `E`. `"final"`: the logits after UDLR. `"coarse"` (our
            alternative): the coarse logits before UDLR, upsampled to the labels' size like the final ones, so that
            UDLR's own corrections do not lower `E`, and with it the UDLR mask, exactly where UDLR works. Without
            UDLR both are the same logits.
        uncertainty_warmup_steps (`int`, *optional*, defaults to 0):
            `λu` ramps linearly from 0 over this many optimisation steps (pass `global_step` to `forward`).
        detach_uncertainty (`bool`, *optional*, defaults to `True`):
            Detach `U` where UGF and UDLR read it, so RUS learns from its own loss only.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of the fusion and decoder weights.
    """

    model_type = "crobim_u"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="swin", init_kwargs=dict(PRESETS["swin-base"]["backbone_config"])
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", init_kwargs=dict(_BERT_BASE)),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    d_model: int = 256
    num_attention_heads: int = 8
    ffn_dim: int = 512
    num_prompts: int = 10
    capm_num_layers: int = 1
    mid_layers_per_level: int = 1
    mask_head_dim: int = 128
    mask_stride: int = 4
    lgfa_fine_attention: str = "full"
    lgfa_fine_smoothing: str = "separable"
    mask_head_conv: str = "full"
    hidden_dropout: float = 0.0
    position_encoding: str = "sine"
    num_pointers: int = 0
    pointer_loss_weight: float = 0.5
    use_rus: bool = True
    use_ugf: bool = True
    use_udlr: bool = True
    ugf_levels: list[int] | tuple[int, ...] = (8, 16, 32)
    ugf_gate_scale_init: float = 4.0
    ugf_gate_bias_init: float = -2.0
    udlr_hidden_dim: int = 64
    udlr_mask_threshold: float = 0.15
    udlr_mask_temperature: float = 0.05
    udlr_mask_mode: str = "fixed"
    udlr_adaptive_share: float = 0.1
    bce_weight: float = 0.9
    dice_weight: float = 0.1
    coarse_loss_weight: float = 0.4
    uncertainty_loss_weight: float = 1.0
    uncertainty_target: str = "soft"
    uncertainty_pooling: str = "avg"
    uncertainty_target_source: str = "final"
    uncertainty_warmup_steps: int = 0
    detach_uncertainty: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # The sub-config defaults hold one dict per class; give every config its own copy.
        for key in ("backbone_config", "text_config"):
            if isinstance(getattr(self, key), dict):
                setattr(self, key, copy.deepcopy(getattr(self, key)))
        # JSON has no tuples: keep one type so that a saved and reloaded config compares equal.
        self.ugf_levels = [int(level) for level in self.ugf_levels]
        super().__post_init__(**kwargs)
        self.validate_crobim_u()

    def validate_crobim_u(self) -> None:
        """Raises `ValueError` for settings no model can be built from."""
        if self.num_attention_heads < 1 or self.d_model <= 0 or self.d_model % self.num_attention_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be a positive multiple of num_attention_heads "
                f"({self.num_attention_heads}), which must be at least 1."
            )
        for name in ("ffn_dim", "mask_head_dim", "udlr_hidden_dim", "capm_num_layers", "mid_layers_per_level"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.mask_stride not in MASK_STRIDES:
            raise ValueError(f"mask_stride must be one of {MASK_STRIDES}, got {self.mask_stride!r}.")
        for name, choices in LIGHTER_PATH_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts must be >= 0, got {self.num_prompts}.")
        unknown_levels = sorted(set(self.ugf_levels) - set(BACKBONE_STRIDES))
        if unknown_levels:
            raise ValueError(f"Unknown UGF level(s) {unknown_levels}: ugf_levels takes strides from {BACKBONE_STRIDES}.")
        if self.use_ugf and not self.ugf_levels:
            raise ValueError("use_ugf=True needs at least one stride in ugf_levels.")
        for module in ("ugf", "udlr"):
            if getattr(self, f"use_{module}") and not self.use_rus:
                raise ValueError(f"use_{module}=True needs use_rus=True: {module.upper()} reads the RUS uncertainty map.")
        if self.uncertainty_target not in ("soft", "hard"):
            raise ValueError(f"uncertainty_target must be 'soft' or 'hard', got {self.uncertainty_target!r}.")
        if self.uncertainty_pooling not in ("avg", "max"):
            raise ValueError(f"uncertainty_pooling must be 'avg' or 'max', got {self.uncertainty_pooling!r}.")
        if self.ugf_gate_scale_init <= 0:
            raise ValueError(
                f"ugf_gate_scale_init must be > 0 (the UGF gate's slope is a softplus), got {self.ugf_gate_scale_init}."
            )
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}.")
        if self.num_pointers < 0:
            raise ValueError(f"num_pointers must be >= 0, got {self.num_pointers}.")
        if self.udlr_mask_temperature <= 0:
            raise ValueError(f"udlr_mask_temperature must be > 0, got {self.udlr_mask_temperature}.")
        if self.udlr_mask_mode not in UDLR_MASK_MODES:
            raise ValueError(f"udlr_mask_mode must be one of {UDLR_MASK_MODES}, got {self.udlr_mask_mode!r}.")
        if not 0 < self.udlr_adaptive_share < 1:
            raise ValueError(f"udlr_adaptive_share must lie in (0, 1), got {self.udlr_adaptive_share}.")
        if self.uncertainty_target_source not in UNCERTAINTY_TARGET_SOURCES:
            raise ValueError(
                f"uncertainty_target_source must be one of {UNCERTAINTY_TARGET_SOURCES}, got "
                f"{self.uncertainty_target_source!r}."
            )
        weights = ("bce_weight", "dice_weight", "coarse_loss_weight", "uncertainty_loss_weight", "pointer_loss_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.uncertainty_warmup_steps < 0:
            raise ValueError(f"uncertainty_warmup_steps must be >= 0, got {self.uncertainty_warmup_steps}.")
        out_features = getattr(self.backbone_config, "out_features", None)
        if out_features is not None and len(out_features) != len(BACKBONE_STRIDES):
            raise ValueError(
                f"backbone_config must output {len(BACKBONE_STRIDES)} feature maps (strides {BACKBONE_STRIDES}), "
                f"got out_features={out_features}."
            )
        if not hasattr(self.text_config, "hidden_size"):
            raise ValueError(f"text_config ({type(self.text_config).__name__}) has no hidden_size: use a BERT-like encoder.")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CrobimUConfig:
        """
        Builds a named preset: `tiny` (tests, CPU demo), `swin-base` or `convnext-base` (the field's recipe).

        Args:
            name (`str`): One of `CrobimUConfig.presets()`.
            overrides: Config fields to change; `backbone_config`/`text_config` dicts of the preset's model type update
                the preset's, others replace them.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
        settings = copy.deepcopy(PRESETS[name])
        for key in ("backbone_config", "text_config"):
            override = overrides.pop(key, None)
            if isinstance(override, dict) and override.get("model_type", settings[key]["model_type"]) == settings[key][
                "model_type"
            ]:
                settings[key].update(override)
            elif override is not None:  # another architecture: its settings replace the preset's
                settings[key] = override
        settings.update(overrides)
        return cls(**settings)

    @staticmethod
    def presets() -> list[str]:
        """Names accepted by [`CrobimUConfig.from_preset`]."""
        return sorted(PRESETS)


__all__ = ["CrobimUConfig"]
