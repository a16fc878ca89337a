"""Telling complete Trainer checkpoints from ones a killed run left half-written.

The Trainer writes a checkpoint file by file into its final `checkpoint-<step>` folder, `trainer_state.json` last
(after the weights, optimizer, scheduler and RNG states), and transformers' `get_last_checkpoint` picks the folder
with the highest step whatever it holds. A run killed during a save (SIGKILL, out of memory, a pre-empted node)
leaves a folder that resume would pick and then fail on, or load half of. [`checkpoint_problem`] checks a folder
without loading it; [`last_complete_checkpoint`] picks the newest folder that passes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..inference.loading import weights_problem


logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """
    Says why `folder` is not a complete Trainer checkpoint, without loading it; `None` when it is complete.

    A complete checkpoint has a `trainer_state.json` (written last) whose `global_step` matches the folder's
    `checkpoint-<step>` name, every JSON file parses, the safetensors weights hold every byte their header announces,
    and every `torch.save` archive (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`) ends with its zip directory.

    Args:
        folder (`str` or `os.PathLike`): The checkpoint folder.

    Returns:
        `str` or `None`: The first problem found, naming the file, or `None`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not (folder / TRAINER_STATE_NAME).is_file():
        return f"{TRAINER_STATE_NAME} is missing (the Trainer writes it last, so the save did not finish)"
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            return f"{path.name} is not valid JSON ({error})"
        except OSError as error:  # deleted or unreadable while we look
            return f"{path.name} cannot be read ({error})"
        if path.name == TRAINER_STATE_NAME:
            match = CHECKPOINT_FOLDER.match(folder.name)
            step = content.get("global_step") if isinstance(content, dict) else None
            if match is not None and step != int(match[1]):
                return f"{TRAINER_STATE_NAME} has global_step {step!r}, expected {int(match[1])} for {folder.name}"
    problem = weights_problem(folder)
    if problem is not None:
        return problem
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        # torch.save writes a zip archive whose directory comes last: a truncated archive has none.
        if not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or not a torch.save archive"
    return None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The `checkpoint-<step>` folders of `output_dir` as `(step, path)`, newest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_FOLDER.match(path.name)
        if match is not None and path.is_dir():
            folders.append((int(match[1]), path))
    return sorted(folders, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """
    The newest complete checkpoint folder of `output_dir` (see [`checkpoint_problem`]), or `None`.

    Incomplete folders on the way are logged with their problem and skipped, so a checkpoint half-written by a killed
    run is never picked.
    """
    for _, folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning(f"Skipping incomplete checkpoint {folder}: {problem}.")
    return None


__all__ = ["checkpoint_folders", "checkpoint_problem", "last_complete_checkpoint"]
