"""Image processor for CroBIM-U referring segmentation, on transformers' PIL backend (no torchvision)."""

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType


_EXIF_ORIENTATION = 0x0112
# PIL converts these modes to RGB correctly on its own (CMYK naively: no ICC colour management).
_CONVERTIBLE_MODES = ("RGBX", "CMYK", "YCbCr", "HSV")
# Straight (non-premultiplied) alpha: composited onto black.
_ALPHA_MODES = ("RGBA", "LA", "PA")
# Single-band modes whose values are not 8-bit: read as arrays and scaled by the dtype rules.
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_MASK_MODES = ("1", "L", "P") + _HIGH_DEPTH_MODES
# Pillow first box-reduces by an integer factor when the image is over 3x the target size: ~1.7x faster on large
# scenes, within a few grey levels (mean under one) of exact resampling. Windows read by `inference.tiling` use it too.
REDUCING_GAP = 3.0
# Probability above which a pixel is in the mask: the default of `post_process_referring_segmentation`, the pipeline
# and `crobim-u predict --threshold`.
DEFAULT_THRESHOLD = 0.5


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _is_single_input(value: Any) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike))


def _to_numpy(array: "np.ndarray | torch.Tensor", name: str) -> np.ndarray:
    """Returns `array` as a numpy array (a view where possible); bfloat16, which numpy lacks, becomes float32."""
    if isinstance(array, torch.Tensor):
        if array.is_complex():
            raise TypeError(f"{name}: complex tensors are not images; got dtype {array.dtype}.")
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a bool, integer or float array; got dtype {array.dtype}.")
    if array.size == 0:
        raise ValueError(f"{name}: the image is empty (shape {tuple(array.shape)}).")
    return array


def _exif_upright(image: Image.Image) -> Image.Image:
    """Applies the EXIF orientation tag, so pixels are laid out as image viewers show them."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return image


def _open(item: "Image.Image | str | os.PathLike", name: str) -> Image.Image:
    """Opens (paths) and decodes an image, raising errors that name the input; EXIF orientation is applied."""
    source = f" ({os.fspath(item)})" if isinstance(item, (str, os.PathLike)) else ""
    try:
        if source:
            # Decoded now, and the file closed: the pixels stay in memory.
            with Image.open(item) as image:
                image.load()
        else:
            image = item
            image.load()
    except Image.DecompressionBombError as error:
        raise Image.DecompressionBombError(
            f"{name}{source}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS for a file you trust, or segment the scene "
            "window by window with `crobim-u predict`."
        ) from error
    except (FileNotFoundError, Image.UnidentifiedImageError):
        raise  # PIL's message already names the file
    except (OSError, SyntaxError) as error:  # truncated or corrupt image data
        raise OSError(f"{name}{source}: the image data cannot be decoded ({error}).") from error
    image = _exif_upright(image)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name}: the image is empty (size {image.width}x{image.height}).")
    return image


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Brings pixel values to 0-255 uint8 following the documented dtype rules."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        # Full uint16 range onto the full 8-bit range (65535 / 257 = 255), rounded.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    low, high = array.min(), array.max()
    if array.dtype.kind == "f":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"{name}: the image contains NaN or infinite values.")
        if low < 0 or high > 1:
            raise ValueError(
                f"{name}: float images must hold values in [0, 1]; got values in [{low:.4g}, {high:.4g}]. "
                "Divide 0-255 floats by 255 (or cast them to uint8); already-normalized pixel values cannot be "
                "processed again."
            )
        return np.rint(array.astype(np.float32) * 255).astype(np.uint8)
    # Other integer dtypes (int64 from torch.randint or np.array(list), PIL mode "I", ...) carry no range.
    if low < 0 or high > 255:
        raise ValueError(
            f"{name}: {array.dtype} images must hold values in [0, 255]; got values in [{low}, {high}]. "
            "Cast 16-bit data to uint16 (scaled by its full range) or scale it to 8 bits yourself."
        )
    return array.astype(np.uint8)


def _channels_last(
    array: np.ndarray, name: str, from_torch: bool, input_data_format: "ChannelDimension | str | None"
) -> np.ndarray:
    """Returns an (H, W) or (H, W, 3) view of a 2-D or 3-D array, or raises with the documented rules."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(
            f"{name}: expected an image array of shape (H, W), (H, W, C) or (C, H, W); got shape {array.shape}."
        )
    if input_data_format is not None:
        channels_first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
    elif (array.shape[0] in (1, 3)) != (array.shape[-1] in (1, 3)):
        channels_first = array.shape[0] in (1, 3)
    elif array.shape[0] in (1, 3):
        # Both ends could be channels: follow each library's convention (torch CHW, numpy/PIL HWC).
        channels_first = from_torch
    else:
        bands = min(array.shape[0], array.shape[-1])
        hint = (
            "4 bands may be RGBA or RGB+NIR: pass a PIL RGBA image for alpha, or select the RGB bands, e.g. "
            "array[..., :3]."
            if bands == 4
            else "multispectral input needs band selection first, e.g. array[..., [3, 2, 1]] for the RGB bands."
        )
        raise ValueError(
            f"{name}: expected 1 or 3 channels on the first or last axis; got shape {array.shape}. {hint}"
        )
    array = np.moveaxis(array, 0, -1) if channels_first else array
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 or 3 channels; got shape {array.shape} with {input_data_format=}.")
    return array[..., 0] if array.shape[-1] == 1 else array


def _pil_to_rgb(image: Image.Image, name: str, do_convert_rgb: bool) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if not do_convert_rgb:
        raise ValueError(f"{name}: do_convert_rgb=False accepts RGB images only; got PIL mode {mode!r}.")
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), name)).convert("RGB")
    if mode == "RGBa":  # premultiplied alpha: the colour bands already are the composite onto black
        return Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., :3]))
    if mode == "La":
        return image.getchannel(0).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("1", "L", "P") and "transparency" in image.info):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("RGB")
    if mode in ("1", "L", "P") + _CONVERTIBLE_MODES:
        return image.convert("RGB")
    raise ValueError(
        f"{name}: unsupported PIL mode {mode!r} (PIL has no colorimetric conversion to RGB for it); "
        "convert the image to RGB first, e.g. with PIL.ImageCms."
    )


def image_to_rgb(
    image: Any, name: str, do_convert_rgb: bool, input_data_format: "ChannelDimension | str | None"
) -> Image.Image:
    """Converts one image input to an 8-bit RGB PIL image, the working format of this processor."""
    if _is_single_input(image):
        return _pil_to_rgb(_open(image, name), name, do_convert_rgb)
    if not _is_array(image):
        raise TypeError(
            f"{name}: expected a PIL image, a numpy array, a torch tensor or a file path; got {type(image).__name__}."
        )
    array = _channels_last(_to_numpy(image, name), name, isinstance(image, torch.Tensor), input_data_format)
    if array.ndim == 2 and not do_convert_rgb:
        raise ValueError(f"{name}: do_convert_rgb=False accepts RGB images only; got a single-channel array.")
    array = np.ascontiguousarray(_to_uint8(array, name))
    return Image.fromarray(array).convert("RGB") if array.ndim == 2 else Image.fromarray(array)


def _mask_to_binary(mask: Any, name: str) -> Image.Image:
    """Converts one mask input to an "L" PIL image holding 0 (background) and 1 (foreground)."""
    if _is_single_input(mask):
        mask = _open(mask, name)
        if mask.mode not in _MASK_MODES:
            raise ValueError(
                f"{name}: masks must be single-channel (PIL mode '1', 'L', 'P', 'I', 'I;16' or 'F'); got mode "
                f"{mask.mode!r}. Convert it first, e.g. mask.convert('L')."
            )
        # Mode "P" is read as palette indices, not colours.
        array = np.asarray(mask)
    elif _is_array(mask):
        array = _to_numpy(mask, name)
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        if array.ndim != 2:
            raise ValueError(f"{name}: expected a mask of shape (H, W); got shape {array.shape}.")
    else:
        raise TypeError(
            f"{name}: expected a PIL image, a numpy array, a torch tensor or a file path; got {type(mask).__name__}."
        )
    if array.dtype == np.bool_:
        return Image.fromarray(array.astype(np.uint8))
    foreground = 255 if (array == 255).any() else 1
    invalid = (array != 0) & (array != foreground)
    if invalid.any():
        found = np.unique(array[invalid])[:5].tolist()
        raise ValueError(
            f"{name}: mask values must be {{0, 1}} or {{0, 255}} (bool masks are accepted too); found {found}. "
            "Binarize soft or multi-class masks first, e.g. (mask > 127)."
        )
    return Image.fromarray((array != 0).astype(np.uint8))


def _flatten(inputs: Any, name: str, is_mask: bool) -> list:
    """Turns a single input or a batch into a flat list of single inputs."""
    if _is_single_input(inputs):
        return [inputs]
    if _is_array(inputs):
        if inputs.ndim < 2:
            raise ValueError(f"{name}: expected an array of 2 or more dimensions; got shape {tuple(inputs.shape)}.")
        # A single image is 2-D or 3-D, a single mask 2-D or (H, W, 1); anything with one more axis is a batch.
        single = inputs.ndim == 2 or (inputs.ndim == 3 and (not is_mask or inputs.shape[-1] == 1))
        return [inputs] if single else list(inputs)
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"{name}: got an empty list.")
        for index, item in enumerate(inputs):
            if not (_is_single_input(item) or _is_array(item)):
                raise TypeError(
                    f"{name}[{index}]: expected a PIL image, a numpy array, a torch tensor or a file path; got "
                    f"{type(item).__name__}. Batches are flat lists."
                )
        return list(inputs)
    raise TypeError(
        f"{name}: expected an image (PIL image, numpy array, torch tensor, file path) or a list of them; got "
        f"{type(inputs).__name__}."
    )


def mask_reliability(mask: "torch.Tensor | np.ndarray", uncertainty: "torch.Tensor | np.ndarray") -> float:
    r"""
    How reliable one predicted mask is, read from the referring-uncertainty map: the IoU the map expects the mask to
    have with the truth.

    Our interpretation (a per-answer figure; the paper defines none). RUS is trained to predict, per cell, the share
    of wrongly predicted pixels (the average-pooled error map `E`), so the map summed over a region estimates how
    many pixels there are wrong: inside the predicted mask `M` those are false positives, outside it false
    negatives. With `u` the uncertainty (the sigmoid of the RUS logits, upsampled bilinearly to the mask's size):

    `reliability = (|M| - sum(u over M) + 1) / (|M| + sum(u outside M) + 1)`, clipped to [0, 1]

    the estimated intersection over the estimated union; the `+ 1` makes an empty mask with nothing expected wrong
    elsewhere read 1 (an empty answer to a phrase that refers to nothing visible), and more expected misses read
    lower. Higher means more reliable.

    Why not the mean uncertainty over the mask and a band around it: a stride-32 map puts the uncertainty of a
    small object's boundary in the same cells as the object, so a correct small mask reads more uncertain than a
    confidently wrong one. On the demo's test split that mean ranked answers below chance, this estimate above it
    (BENCHMARKS.md, "Does uncertainty help?").

    Args:
        mask (`torch.Tensor` or `np.ndarray` of shape `(H, W)`):
            The predicted mask (bool, or numbers with foreground `> 0`).
        uncertainty (`torch.Tensor` or `np.ndarray` of shape `(H, W)`):
            Uncertainty in [0, 1] at the mask's size.

    Returns:
        `float`: the reliability in [0, 1].
    """
    mask = torch.as_tensor(mask)
    uncertainty = torch.as_tensor(uncertainty)
    if mask.ndim != 2 or tuple(mask.shape) != tuple(uncertainty.shape):
        raise ValueError(
            f"mask and uncertainty must be (H, W) maps of one size, got {tuple(mask.shape)} and {tuple(uncertainty.shape)}."
        )
    if mask.numel() == 0:
        raise ValueError("mask_reliability needs a map with at least one pixel, got an empty one.")
    inside = mask.to(uncertainty.device) > 0
    # Sums in float64: a float16 map of a large scene would lose its small values in a float16 sum.
    area = inside.sum(dtype=torch.float64)
    expected_wrong_inside = uncertainty[inside].sum(dtype=torch.float64)
    expected_wrong_outside = uncertainty.sum(dtype=torch.float64) - expected_wrong_inside
    estimate = (area - expected_wrong_inside + 1.0) / (area + expected_wrong_outside + 1.0)
    return float(min(max(estimate.item(), 0.0), 1.0))


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    Bilinearly resizes (C, h, w) logits to (C, *size) (`align_corners=False`, no antialiasing, dtype kept).

    The one logit resize of the package: post-processing, the tiled predictor and the evaluation use it, so a mask
    thresholded anywhere comes from the same interpolation. Returns `logits` itself when it already has `size`.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


class CrobimUImageProcessor(PilBackend):
    r"""
    Constructs a CroBIM-U image processor on transformers' PIL backend (no torchvision needed).

    Images are brought to 8-bit RGB, resized to `size` and normalized; binary masks given as `segmentation_maps`
    become `labels` (nearest resize). `post_process_referring_segmentation` maps model outputs back to each image's
    original size.

    Input policy. An image is a PIL image, a numpy array, a torch tensor or the path of a local file; a batch is a
    flat list of these, or a 4-D array or tensor. Errors name the offending input as `images[i]` or
    `segmentation_maps[i]`.

    - Paths (`str`, `os.PathLike`) are opened with PIL and decoded at once. A missing file raises
      `FileNotFoundError`, an unknown format PIL's `UnidentifiedImageError`, truncated or corrupt image data `OSError`,
      and a size above `PIL.Image.MAX_IMAGE_PIXELS` PIL's `DecompressionBombError` (raise that limit, or tile large
      scenes); each message names the input and the file.
    - PIL images get their EXIF orientation applied first (`ImageOps.exif_transpose`), so masks and predictions align
      with what viewers show; `original_sizes` are the upright sizes.
    - PIL `RGB` is used as is (a PNG colour key is ignored). `1`, `L` and `P` are converted to RGB. `RGBX`, `CMYK`,
      `YCbCr` and `HSV` use PIL's conversion (CMYK without ICC colour management). `RGBA`, `LA`, `PA`, `RGBa`, `La`,
      and `L`/`P` with a transparency key are composited onto **black**, the usual no-data colour of overhead
      imagery. `I;16*`, `I` and `F` are read as uint16, int32 and float32 arrays (rules below). `LAB` and any other
      mode raise `ValueError`: PIL has no correct conversion for them.
    - Array dtypes: `uint8` as is; `bool` False/True to 0/255; `uint16` over its full range, `round(v / 257)` (a
      12-bit sensor image stored in uint16 comes out dark); other integer dtypes must hold values in [0, 255] and are
      taken as 8-bit; floats (`float16/32/64`, `bfloat16` tensors) must hold values in [0, 1], `round(v * 255)`.
      Values out of range, NaN or Inf raise `ValueError`; complex, string and object arrays raise `TypeError`.
    - Array layouts: (H, W) is greyscale; (H, W, C) or (C, H, W) needs C = 1 or 3. When only one end of the shape is
      1 or 3 it is the channel axis; when both are, numpy arrays are read channels-last and torch tensors
      channels-first. `input_data_format` overrides the guess. 2, 4 or more bands raise `ValueError` asking for band
      selection (4 bands may be RGBA or RGB+NIR, so they are not guessed).
    - Empty images raise `ValueError`; other types and nested lists raise `TypeError`.

    Masks (`segmentation_maps`) are PIL images of a single-channel mode (`1`, `L`, `P` read as palette indices, `I`,
    `I;16*`, `F`), paths, or arrays of shape (H, W) or (H, W, 1), or (1, H, W) inside a list; a 3-D mask array not
    ending in 1 is a batch (B, H, W), a 4-D one (B, 1, H, W) or (B, H, W, 1). EXIF orientation is applied as for
    images. Mask values must be {0, 1} or {0, 255} (or bool); foreground is the nonzero value. Other values,
    multi-channel masks and masks whose size differs from their image's raise `ValueError`.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize images (and masks) to `size`. Without resizing, all images in a batch must share a size.
        size (`dict[str, int]`, *optional*, defaults to `{"height": 480, "width": 480}`):
            Model input size; the aspect ratio is not kept, as in the published RRSIS recipes.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Resampling filter for images (bilinear, as in the reference training code); masks always use nearest.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the 8-bit values by `rescale_factor`. Inputs are brought to 0-255 first whatever their
            dtype, so floats in [0, 1] need no special setting.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Scale factor applied when `do_rescale` is set.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalize with `image_mean` and `image_std`.
        image_mean (`float` or `list[float]`, *optional*, defaults to `IMAGENET_DEFAULT_MEAN`):
            Per-channel mean subtracted when `do_normalize` is set.
        image_std (`float` or `list[float]`, *optional*, defaults to `IMAGENET_DEFAULT_STD`):
            Per-channel standard deviation divided by when `do_normalize` is set.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert non-RGB inputs to RGB as in the table above. When `False`, inputs that need a colour
            conversion (greyscale, alpha, palette, CMYK, ...) raise `ValueError`; bit-depth scaling still applies.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 480, "width": 480}
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs: Unpack[ImagesKwargs]):
        super().__init__(**kwargs)

    def preprocess(
        self,
        images: ImageInput | str | os.PathLike | list[str | os.PathLike],
        segmentation_maps: ImageInput | str | os.PathLike | list[str | os.PathLike] | None = None,
        return_tensors: str | TensorType | None = "pt",
        **kwargs: Unpack[ImagesKwargs],
    ) -> BatchFeature:
        r"""
        Prepares images, and optionally their masks, for the model.

        Args:
            images (`ImageInput`, file path or list of them):
                One image or a batch, as described in the class docstring.
            segmentation_maps (`ImageInput`, file path or list of them, *optional*):
                Binary masks, one per image and of the same size.
            return_tensors (`str` or `TensorType`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors; `"np"` or `None` for numpy arrays.
            kwargs (`ImagesKwargs`, *optional*):
                Overrides of the processor's parameters for this call.

        Returns:
            [`BatchFeature`] with `pixel_values` (B, 3, height, width) float32, `original_sizes` (a list of (H, W)
            after EXIF orientation, never converted to a tensor) and, with masks, `labels` (B, height, width) int64 in
            {0, 1}.
        """
        return super().preprocess(images, segmentation_maps, return_tensors=return_tensors, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        segmentation_maps: Any,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | str | None,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        images = [
            image_to_rgb(image, f"images[{index}]", do_convert_rgb, input_data_format)
            for index, image in enumerate(_flatten(images, "images", is_mask=False))
        ]
        data = {
            "pixel_values": self._preprocess(images, **kwargs),
            "original_sizes": [(image.height, image.width) for image in images],
        }
        if segmentation_maps is not None:
            masks = _flatten(segmentation_maps, "segmentation_maps", is_mask=True)
            if len(masks) != len(images):
                raise ValueError(
                    f"Got {len(masks)} segmentation maps for {len(images)} images; pass one per image (a 3-D mask "
                    "array is read as a batch of (H, W) masks)."
                )
            masks = [_mask_to_binary(mask, f"segmentation_maps[{index}]") for index, mask in enumerate(masks)]
            for index, (mask, image) in enumerate(zip(masks, images)):
                if mask.size != image.size:
                    raise ValueError(
                        f"segmentation_maps[{index}] is {mask.height}x{mask.width} (HxW) but images[{index}] is "
                        f"{image.height}x{image.width}; a mask must match its image."
                    )
            data["labels"] = self._preprocess_masks(masks, kwargs["do_resize"], kwargs["size"])
        features = BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["original_sizes"])
        if isinstance(features["pixel_values"], torch.Tensor):
            # The conversion shares numpy's buffer, whose address (16-byte aligned) varies from call to call and from
            # process to process; a copy in torch's allocator is 64-byte aligned, so the model's first kernels see the
            # same memory layout in every process.
            features["pixel_values"] = features["pixel_values"].clone()
        return features

    def _preprocess(
        self,
        images: list[Image.Image],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        **kwargs,
    ) -> np.ndarray:
        """Resizes RGB PIL images and returns them rescaled and normalized as one (B, 3, H, W) float32 array."""
        images = [self._resize_pil(image, do_resize, size, resample) for image in images]
        if len({image.size for image in images}) > 1:
            raise ValueError("With do_resize=False all images in a batch must have the same size.")
        # Rescale and normalize fused into one multiply-add per pixel, in float32.
        scale = np.full((3, 1, 1), rescale_factor if do_rescale else 1.0, dtype=np.float32)
        offset = np.zeros((3, 1, 1), dtype=np.float32)
        if do_normalize:
            std = np.broadcast_to(np.asarray(image_std, dtype=np.float32), (3,)).reshape(3, 1, 1)
            mean = np.broadcast_to(np.asarray(image_mean, dtype=np.float32), (3,)).reshape(3, 1, 1)
            scale, offset = scale / std, -mean / std
        width, height = images[0].size
        pixel_values = np.empty((len(images), 3, height, width), dtype=np.float32)
        for image, out in zip(images, pixel_values):
            np.multiply(np.asarray(image).transpose(2, 0, 1), scale, out=out)
            out += offset
        return pixel_values

    def _preprocess_masks(self, masks: list[Image.Image], do_resize: bool, size: SizeDict) -> np.ndarray:
        """Resizes 0/1 masks with nearest neighbour and stacks them as (B, H, W) int64."""
        masks = [self._resize_pil(mask, do_resize, size, PILImageResampling.NEAREST) for mask in masks]
        return np.stack([np.asarray(mask) for mask in masks]).astype(np.int64)

    @staticmethod
    def _resize_pil(
        image: Image.Image, do_resize: bool, size: SizeDict, resample: PILImageResampling | int | None
    ) -> Image.Image:
        if not do_resize:
            return image
        if size.height is None or size.width is None:
            raise ValueError(f"size must have 'height' and 'width'; got {dict(size)}.")
        if image.size == (size.width, size.height):
            return image
        resample = PILImageResampling(resample if resample is not None else PILImageResampling.BILINEAR)
        reducing_gap = None if resample == PILImageResampling.NEAREST else REDUCING_GAP
        return image.resize((size.width, size.height), resample=resample, reducing_gap=reducing_gap)

    def post_process_referring_segmentation(
        self,
        outputs: Any,
        target_sizes: "list[tuple[int, int]] | torch.Tensor | None" = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> list[dict[str, Any]]:
        r"""
        Turns CroBIM-U outputs into one binary mask, probability map and uncertainty map per image.

        Args:
            outputs (`CrobimUSegmentationOutput`):
                Model outputs with `logits` of shape (B, 1, h, w) and `uncertainty_logits` of shape
                (B, 1, h/32, w/32), or `None` when the model's RUS module is off.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape (B, 2), *optional*):
                (H, W) of each result, typically the processor's `original_sizes`. If unset, results keep the logits'
                size.
            threshold (`float`, *optional*, defaults to 0.5):
                A pixel is foreground where its probability is strictly greater than `threshold`.

        Returns:
            `list[dict]`, one per image, on the device of the logits:
            - `"mask"`: `torch.BoolTensor` (H, W).
            - `"probabilities"`: `torch.FloatTensor` (H, W), the sigmoid of the logits resized bilinearly to (H, W).
            - `"uncertainty"`: `torch.FloatTensor` (H, W) in [0, 1], the sigmoid of the uncertainty logits resized
              bilinearly to (H, W); `None` without uncertainty logits.
            - `"score"`: `float`, the mean probability inside the mask (a confidence for it); 0.0 for an empty mask.
            - `"reliability"`: `float` in [0, 1], the IoU the uncertainty map expects the mask to have (see
              [`mask_reliability`]; higher = more reliable); `None` without uncertainty logits.
        """
        logits = outputs.logits
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"Expected logits of shape (B, 1, H, W); got {tuple(logits.shape)}.")
        uncertainty_logits = getattr(outputs, "uncertainty_logits", None)
        if target_sizes is None:
            target_sizes = [tuple(logits.shape[-2:])] * len(logits)
        elif len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)}.")
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()

        results = []
        for index, (height, width) in enumerate(target_sizes):
            size = (int(height), int(width))
            probabilities = resize_logits(logits[index].detach().float(), size)[0].sigmoid()
            mask = probabilities > threshold
            uncertainty = reliability = None
            if uncertainty_logits is not None:
                uncertainty = resize_logits(uncertainty_logits[index].detach().float(), size)[0].sigmoid()
                reliability = mask_reliability(mask, uncertainty)
            results.append(
                {
                    "mask": mask,
                    "probabilities": probabilities,
                    "uncertainty": uncertainty,
                    "score": probabilities[mask].mean().item() if mask.any() else 0.0,
                    "reliability": reliability,
                }
            )
        return results


__all__ = [
    "DEFAULT_THRESHOLD", "REDUCING_GAP", "CrobimUImageProcessor", "image_to_rgb", "mask_reliability", "resize_logits",
]
