"""Loading a CroBIM-U checkpoint for the command line: its config checked first, its weights from safetensors only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig

from ..configuration_crobim_u import CrobimUConfig
from ..modeling_crobim_u import CrobimUForReferringSegmentation
from ..processing_crobim_u import CrobimUProcessor


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _safetensors_problem(path: Path) -> str | None:
    try:
        # Parses the header and checks that the file holds every byte it announces: a truncated file fails here.
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        return f"{path.name} is not a valid, complete safetensors file ({error})"
    return None


def weights_problem(folder: str | os.PathLike) -> str | None:
    """Says why the safetensors weights of `folder` (one file, or an index and its shards) are missing or incomplete."""
    folder = Path(folder)
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            return f"{SAFE_WEIGHTS_INDEX_NAME} is not valid JSON ({error})"
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            return f"{SAFE_WEIGHTS_INDEX_NAME} has no weight_map"
        shards = sorted(set(weight_map.values()))
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        shards = [SAFE_WEIGHTS_NAME]
    else:
        return f"{SAFE_WEIGHTS_NAME} is missing"
    for shard in shards:
        if not (folder / shard).is_file():
            return f"weight shard {shard} (listed in {SAFE_WEIGHTS_INDEX_NAME}) is missing"
        problem = _safetensors_problem(folder / shard)
        if problem is not None:
            return problem
    return None


def check_model_location(path: str | os.PathLike) -> None:
    """
    Raises an `OSError` naming `path` when it can be neither a checkpoint folder nor a Hub model id: a file, or a
    path that does not exist and is not spelled like a Hub id (`namespace/name`).
    """
    if os.path.isdir(path):
        return
    expected = "expected a checkpoint folder (with config.json and model.safetensors) or a Hub model id (user/model)"
    if os.path.exists(path):
        raise NotADirectoryError(f"{path} is a file; {expected}.")
    try:
        validate_repo_id(os.fspath(path))
    except HFValidationError:
        raise FileNotFoundError(f"{path} does not exist; {expected}.") from None


def check_crobim_u_checkpoint(path: str | os.PathLike) -> None:
    """
    Raises a `ValueError` unless the `config.json` of `path` (a folder or Hub id) is a CroBIM-U config.

    `CrobimUConfig.from_pretrained` only warns about another `model_type`, and `AutoModel` builds that other
    architecture, so a wrong folder would otherwise fail later with an unrelated error, or not at all.
    """
    check_model_location(path)
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path)
    except OSError as error:
        if os.path.isdir(path):
            raise
        raise OSError(f"{path} is not a local folder, and loading it as a Hub model id failed: {error}") from error
    model_type = config_dict.get("model_type")
    if model_type != CrobimUConfig.model_type:
        raise ValueError(
            f"{path}: config.json has model_type {model_type!r}; expected {CrobimUConfig.model_type!r} (a CroBIM-U "
            "checkpoint)."
        )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CrobimUForReferringSegmentation, CrobimUProcessor]:
    """
    Loads a CroBIM-U model (in eval mode, on `device`) and its processor from a checkpoint folder or Hub id.

    Weights load from safetensors only (`use_safetensors=True`): a folder with only `pytorch_model.bin`, a pickle,
    is refused. A local folder's weights are checked first, so a missing, truncated or malformed safetensors file
    raises an `OSError` that names it. A `config.json` of another model type raises a `ValueError`.
    """
    check_crobim_u_checkpoint(path)
    if os.path.isdir(path):
        problem = weights_problem(path)
        if problem is not None:
            raise OSError(f"{path}: {problem}")
    model = CrobimUForReferringSegmentation.from_pretrained(path, use_safetensors=True).to(device).eval()
    return model, CrobimUProcessor.from_pretrained(path)


def load_checkpoint_or_exit(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CrobimUForReferringSegmentation, CrobimUProcessor]:
    """[`load_checkpoint`] for the command line: a checkpoint that cannot be loaded exits with its message alone."""
    try:
        return load_checkpoint(path, device)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


__all__ = ["check_crobim_u_checkpoint", "check_model_location", "load_checkpoint", "load_checkpoint_or_exit",
           "weights_problem"]
