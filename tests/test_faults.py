"""Faults: training and prediction killed with SIGKILL (at a random moment, and while writing a file) resume and
finish; a half-written checkpoint is never picked."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import assert_close_across_processes, count_segmented_inputs, random_image, save_checkpoint
from transformers.trainer_utils import get_last_checkpoint

from crobim_u.cli import main as cli_main
from crobim_u.inference.predict import RESULTS_FILE
from crobim_u.training.checkpoints import checkpoint_folders, checkpoint_problem, last_complete_checkpoint
from crobim_u.training.run import main as train_main


MAX_STEPS = 12
REPOSITORY = Path(__file__).resolve().parents[1]

# Runs `crobim_u.training.run` in a child process; with KILL_AT_WEIGHTS_WRITE=k, the k-th write of model.safetensors
# stops halfway and the process SIGKILLs itself: a kill in the middle of a checkpoint save, at a chosen moment.
TRAIN_CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
kill_at = int(os.environ.get("KILL_AT_WEIGHTS_WRITE", "0"))
if kill_at:
    import transformers.modeling_utils as modeling_utils
    save_file, writes = modeling_utils.safe_save_file, []
    def save_then_die(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        writes.append(filename)
        if len(writes) == kill_at:
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    modeling_utils.safe_save_file = save_then_die
from crobim_u.training.run import main
main(sys.argv[1:])
"""

# Runs `crobim-u predict` in a child process; the k-th image written (argv[1]) stops halfway and the process
# SIGKILLs itself.
PREDICT_CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from PIL import Image
kill_at, save, writes = int(sys.argv[1]), Image.Image.save, []
def save_then_die(self, fp, *args, **kwargs):
    save(self, fp, *args, **kwargs)
    writes.append(fp)
    if len(writes) == kill_at:
        data = open(fp, "rb").read()
        open(fp, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
Image.Image.save = save_then_die
from crobim_u.cli import main
sys.exit(main(sys.argv[2:]))
"""


def child_environment() -> dict[str, str]:
    # One thread, as in this process: the resumed run must reproduce the uninterrupted one bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPOSITORY)}


def train_flags(output_dir: Path, cache_dir: str) -> list[str]:
    """A tiny run that saves a checkpoint at every step and keeps two (so rotation deletes folders as it goes)."""
    return [
        "--preset", "tiny", "--image_size", "64", "--dataset_name", "synthetic", "--synthetic_num_train", "16",
        "--synthetic_num_validation", "0", "--synthetic_num_test", "0", "--synthetic_image_size", "64",
        "--cache_dir", cache_dir, "--eval_split", "", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", str(MAX_STEPS),
        "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2", "--logging_steps", "1",
        "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--report_to", "none", "--seed", "0",
    ]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output_dir / "model.safetensors")


def assert_finished_like_the_reference(output_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    weights = final_weights(output_dir)
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-6, msg=name)
    # Every checkpoint left behind is complete: resume deleted the half-written one, the run saved it again.
    assert all(checkpoint_problem(folder) is None for _, folder in checkpoint_folders(output_dir))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted run (it also fills the data set cache the child processes read)."""
    output_dir = tmp_path_factory.mktemp("reference")
    train_main(train_flags(output_dir, cache_dir))
    return output_dir


def test_training_killed_at_a_random_moment_resumes_from_the_last_complete_checkpoint(
    reference_run, cache_dir, tmp_path
):
    output_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_CHILD, *train_flags(output_dir, cache_dir)], env=child_environment(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while last_complete_checkpoint(output_dir) is None:
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        # Anywhere in the next few steps (a step and its save take ~0.3 s here): inside a save, a rotation, a step.
        time.sleep(random.Random(9).uniform(0, 1.5))
        assert child.poll() is None, "the run finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    killed_at = last_complete_checkpoint(output_dir)
    print(f"killed with {[folder.name for _, folder in checkpoint_folders(output_dir)]}, resuming from {killed_at}")
    assert killed_at is not None and not (output_dir / "model.safetensors").exists()

    train_main([*train_flags(output_dir, cache_dir), "--resume_from_checkpoint", "true"])
    assert_finished_like_the_reference(output_dir, final_weights(reference_run))


def test_training_killed_while_writing_a_checkpoint_never_resumes_from_it(reference_run, cache_dir, tmp_path):
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_CHILD, *train_flags(output_dir, cache_dir)],
        env={**child_environment(), "KILL_AT_WEIGHTS_WRITE": "3"}, capture_output=True, timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-3000:]
    half_written = output_dir / "checkpoint-3"
    # Rotation (keep two) runs after a save completes: it never came for checkpoint-1.
    assert sorted(os.listdir(output_dir)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # transformers would pick the half-written folder; we pick the one before it, and say why.
    assert get_last_checkpoint(str(output_dir)) == str(half_written)
    assert "trainer_state.json is missing" in checkpoint_problem(half_written)
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-3: trainer_state\.json is missing.*"
                                         r"newest complete checkpoint beside it is .*checkpoint-2"):
        train_main([*train_flags(output_dir, cache_dir), "--resume_from_checkpoint", str(half_written)])

    train_main([*train_flags(output_dir, cache_dir), "--resume_from_checkpoint", "true"])
    assert_finished_like_the_reference(output_dir, final_weights(reference_run))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda folder: (folder / "trainer_state.json").unlink(), r"trainer_state\.json is missing"),
        (lambda folder: truncate(folder / "trainer_state.json"), r"trainer_state\.json is not valid JSON"),
        (lambda folder: truncate(folder / "config.json"), r"config\.json is not valid JSON"),
        (lambda folder: truncate(folder / "model.safetensors"), r"model\.safetensors is not a valid, complete"),
        (lambda folder: (folder / "model.safetensors").unlink(), r"model\.safetensors is missing"),
        (lambda folder: truncate(folder / "optimizer.pt"), r"optimizer\.pt is truncated"),
        (lambda folder: truncate(folder / "rng_state.pth"), r"rng_state\.pth is truncated"),
        (lambda folder: folder.rename(folder.with_name(f"checkpoint-{MAX_STEPS + 5}")),
         rf"global_step {MAX_STEPS}, expected {MAX_STEPS + 5}"),
    ],
    ids=["no-state", "truncated-state", "truncated-config", "truncated-weights", "no-weights", "truncated-optimizer",
         "truncated-rng", "wrong-step"],
)
def test_half_written_checkpoints_are_never_picked(reference_run, tmp_path, damage, problem):
    for name in (f"checkpoint-{MAX_STEPS - 1}", f"checkpoint-{MAX_STEPS}"):
        shutil.copytree(reference_run / name, tmp_path / name)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{MAX_STEPS}")
    damage(tmp_path / f"checkpoint-{MAX_STEPS}")
    (_, newest), (_, previous) = checkpoint_folders(tmp_path)
    assert re.search(problem, checkpoint_problem(newest) or ""), checkpoint_problem(newest)
    assert get_last_checkpoint(str(tmp_path)) == str(newest)  # what transformers alone would resume from
    assert last_complete_checkpoint(tmp_path) == str(previous)


def test_resume_without_a_complete_checkpoint_names_the_folders(cache_dir, tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ValueError, match=r"No complete checkpoint to resume from in .* \['checkpoint-4'\]"):
        train_main([*train_flags(tmp_path, cache_dir), "--resume_from_checkpoint", "true"])


# ---- Prediction ----


def test_predict_killed_while_writing_resumes_and_skips_what_is_done(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(6):
        random_image(40 + index, 36, seed=index).save(folder / f"scene{index}.png")
    expressions = ["--expression", "the red car", "--expression", "the large building"]
    output = tmp_path / "out"
    flags = ["predict", "--model", checkpoint, "--output_dir", str(output), *expressions, "--no_progress", str(folder)]

    # Three images per input and expression (mask, uncertainty, overlay): a seeded write among those of inputs 1-4.
    kill_at = random.Random(3).randint(7, 24)
    result = subprocess.run([sys.executable, "-c", PREDICT_CHILD, str(kill_at), *flags], env=child_environment(),
                            capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-3000:]
    done_before = {record["input"] for record in map(json.loads, (output / RESULTS_FILE).read_text().splitlines())}
    assert 1 <= len(done_before) < 6
    # The file being written when the process died is a hidden temporary; every file under a final name is whole.
    (partial,) = [path for path in output.iterdir() if path.name.endswith(".partial")]
    assert partial.name.startswith(".")
    finished = {path: path.stat().st_mtime_ns for path in output.glob("*.png")}
    for path in finished:
        with Image.open(path) as image:
            image.load()

    segmented = count_segmented_inputs(monkeypatch)
    assert cli_main([*flags, "--resume"]) == 0
    assert len(segmented) == 6 - len(done_before)  # only the inputs not done were segmented again
    records = [json.loads(line) for line in (output / RESULTS_FILE).read_text().splitlines()]
    inputs = sorted(str(path) for path in folder.iterdir())
    assert [(r["input"], r["expression"]) for r in records] == [
        (path, expression) for path in inputs for expression in ("the red car", "the large building")
    ]
    assert all(record["status"] == "ok" for record in records)
    assert not [path for path in output.iterdir() if path.name.startswith(".")]
    for path, mtime in finished.items():
        if any(path.name.startswith(Path(done).stem + "_") for done in done_before):
            assert path.stat().st_mtime_ns == mtime, f"{path.name} of a finished input was written again"

    # The resumed folder holds what an uninterrupted run writes. The records done before the kill came from another
    # process, whose floats may differ in their last bits (helpers.py): an 8-bit picture made from them may differ by
    # one level where a value sits on a rounding edge; masks and areas are exact (no probability lies within a float32
    # step of the threshold here).
    clean = tmp_path / "clean"
    assert cli_main([*flags[:4], str(clean), *flags[5:]]) == 0
    for record, expected in zip(records, map(json.loads, (clean / RESULTS_FILE).read_text().splitlines())):
        with Image.open(record["mask"]) as image, Image.open(expected["mask"]) as expected_image:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(expected_image))
        for field in ("uncertainty", "overlay"):
            with Image.open(record[field]) as image, Image.open(expected[field]) as expected_image:
                difference = np.abs(np.asarray(image, np.int16) - np.asarray(expected_image, np.int16))
                assert difference.max() <= 1, (field, record["input"])
        assert_close_across_processes(record["score"], expected["score"])
        assert record["mask_area"] == expected["mask_area"]
