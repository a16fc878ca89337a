"""
Running `crobim-u predict` and `crobim-u evaluate` on several processes, and in lower precision (`--dtype`).

Processes are started by a launcher (`accelerate launch`, `torchrun`) and coordinated through accelerate's
[`~accelerate.PartialState`]: each process takes a contiguous share of the work
([`~accelerate.PartialState.split_between_processes`]) and the shares are put back together in input order
([`~accelerate.utils.gather_object`]). Without a launcher the state has one process and nothing is split.

Lower precision runs the model's forward passes under `torch.autocast` (the weights stay float32); what leaves the
model is cast back to float32, so masks, probabilities and metrics are computed as in a float32 run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers.utils import ModelOutput


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Item = TypeVar("Item")


def process_state(device: str | torch.device | None = None) -> tuple[PartialState, torch.device]:
    """
    The accelerate state of this process and the device it runs the model on.

    Args:
        device (`str` or `torch.device`, *optional*): The device asked for (`--device`); by default the process's
            accelerate device: `cuda:<local rank>` where CUDA is available, else the CPU.

    Returns:
        `tuple(PartialState, torch.device)`: the state (one process without a launcher) and the device.
    """
    requested = None if device is None else torch.device(device)
    # accelerate sets up CPU processes (gloo) only when told they are CPU processes; otherwise a process launched by
    # `accelerate launch` or `torchrun` on a machine without GPUs would believe it is alone and do all the work.
    cpu = requested.type == "cpu" if requested is not None else not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return state, requested if requested is not None else state.device


def release_process_group() -> None:
    """
    Tears down this process's process group, if a launcher made one, before the interpreter exits.

    Left to the interpreter's exit, gloo's threads can be destroyed while still joinable, and a rank whose work
    finished aborts ("terminate called without an active exception"), failing the launch.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """
    The torch dtype of a `--dtype` value, checked against the device it will run on.

    Args:
        dtype (`str`): `"float32"`, `"bfloat16"` or `"float16"`.
        device (`str` or `torch.device`): The device the model runs on.

    Returns:
        `torch.dtype`: the autocast dtype (`torch.float32` means no autocast).

    Raises:
        `ValueError`: an unknown dtype; `float16` on a device other than a CUDA GPU (CPU autocast in float16 is slow
            and float16's range is narrow: bfloat16 is the CPU's half precision); `bfloat16` on a GPU without it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    device = torch.device(device)
    if dtype == "float16" and device.type != "cuda":
        raise ValueError(
            f"--dtype float16 needs a CUDA GPU; got device {str(device)!r}. On the CPU use --dtype bfloat16 (autocast) "
            "or float32."
        )
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16: the GPU of device {str(device)!r} does not support bfloat16; use float16.")
    return DTYPES[dtype]


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, ModelOutput):
        for key, item in value.items():
            value[key] = _to_float32(item)
        return value
    if isinstance(value, tuple):
        return tuple(_to_float32(item) for item in value)
    return value


class AutocastModel:
    """
    A model whose forward passes (`model(...)` and `encode_text`) run under `torch.autocast(device, dtype)`, with
    floating outputs cast to float32. Every other attribute (`config`, `parameters`, ...) is the model's own.

    Args:
        model ([`CrobimUForReferringSegmentation`]): The model, on its device.
        dtype (`torch.dtype`): `torch.bfloat16` or `torch.float16`.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.device_type = next(model.parameters()).device.type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return _to_float32(self.model(*args, **kwargs))

    def encode_text(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return _to_float32(self.model.encode_text(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def autocast_model(model: torch.nn.Module, dtype: torch.dtype) -> Any:
    """`model` itself for float32, else an [`AutocastModel`] running it in `dtype`."""
    return model if dtype == torch.float32 else AutocastModel(model, dtype)


def own_share(items: Sequence[Item], state: PartialState | None) -> list[Item]:
    """
    This process's contiguous share of `items`: the first `len(items) % n` processes take one item more, and the
    shares of processes 0, 1, ... follow each other in `items` order (all of them without a state or with one process).
    """
    if state is None or state.num_processes == 1:
        return list(items)
    with state.split_between_processes(list(items)) as share:
        return list(share)


def gather_shares(share: list[Item], state: PartialState | None) -> list[Item]:
    """Every process's `share`, concatenated in process order, on every process (`share` itself in one process)."""
    if state is None or state.num_processes == 1:
        return share
    return gather_object(share)


def from_main_process(objects: list[Any], state: PartialState | None) -> list[Any]:
    """The main process's `objects` on every process (`objects` itself in one process)."""
    if state is None or state.num_processes == 1:
        return objects
    return broadcast_object_list(list(objects))


__all__ = [
    "DTYPES", "AutocastModel", "autocast_model", "check_dtype", "from_main_process", "gather_shares", "own_share",
    "process_state",
]
