"""`crobim-u predict` and `crobim-u evaluate` on two CPU processes (`accelerate launch`): the outputs of one process,
a share of the work each, and a run killed under two processes resumed under one; in one process, the records that the
processes of a killed run left."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import DatasetDict
from helpers import (
    assert_close_across_processes,
    count_segmented_inputs,
    free_port,
    random_image,
    read_results,
    save_checkpoint,
    small_dataset,
)
from PIL import Image

from crobim_u.cli import main
from crobim_u.data import export_folder
from crobim_u.inference.predict import PROCESS_RESULTS_GLOB, RESULTS_FILE


REPOSITORY = Path(__file__).resolve().parents[1]
NUM_INPUTS = 7  # odd: the two shares differ (4 and 3 inputs)
EXPRESSIONS = ["the red car", "the large building"]

# `crobim-u predict` with a log of the inputs each process starts (argv[1]: the log's path prefix). With argv[2] = k >= 0,
# each process stops as it starts its input number k + 1, its first k inputs written: process 0 waits there, and
# process 1, once process 0 is there, SIGKILLs itself, upon which the launcher stops process 0. What the killed run
# finished is then known: the first k inputs of each share.
PREDICT_CHILD = """
import os, signal, sys, time
import torch
torch.set_num_threads(1)
from crobim_u.inference import predict
log, kill_after, rank = sys.argv[1], int(sys.argv[2]), int(os.environ.get("RANK", "0"))
predict_input, started = predict._predict_input, []
def started_by(process):
    return open(f"{log}.rank-{process}").read().splitlines() if os.path.exists(f"{log}.rank-{process}") else []
def logged_predict_input(path, *args, **kwargs):
    with open(f"{log}.rank-{rank}", "a") as file:
        file.write(path + "\\n")
    started.append(path)
    if len(started) == kill_after + 1:
        if rank == 0:
            time.sleep(120)
        deadline = time.monotonic() + 60
        while len(started_by(0)) <= kill_after and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return predict_input(path, *args, **kwargs)
predict._predict_input = logged_predict_input
from crobim_u.cli import main
sys.exit(main(sys.argv[3:]))
"""


def tails(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-2000:] + result.stderr[-4000:]


def launch(*arguments: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`accelerate launch` of two CPU processes: the torchrun launcher (`--multi_gpu`; `--cpu` starts one process),
    whose processes find no GPU and join over gloo."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *arguments]
    # One thread per process, as in this process: the outputs are then computed the same way (conftest).
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": str(REPOSITORY), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("processes")
    images = folder / "images"
    images.mkdir()
    for index in range(NUM_INPUTS):  # sizes differ, so outputs written under the wrong name would not match
        random_image(40 + 3 * index, 36 + 2 * index, seed=index).save(images / f"scene{index}.png")
    child = folder / "predict_child.py"
    child.write_text(PREDICT_CHILD)
    return {"folder": folder, "model": save_checkpoint(folder / "model"), "images": str(images), "child": str(child)}


def predict_flags(workspace: dict, output) -> list[str]:
    expressions = [flag for expression in EXPRESSIONS for flag in ("--expression", expression)]
    return ["predict", "--model", workspace["model"], "--output_dir", str(output), *expressions, "--device", "cpu",
            "--no_progress", workspace["images"]]


@pytest.fixture(scope="module")
def one_process(workspace) -> Path:
    output = workspace["folder"] / "one"
    assert main(predict_flags(workspace, output)) == 0
    return output


def assert_same_outputs(output: Path, expected: Path) -> None:
    """`output` holds the files and records of `expected` (another process's run; see helpers.py for the floats)."""
    assert sorted(path.name for path in output.iterdir()) == sorted(path.name for path in expected.iterdir())
    records, expected_records = read_results(output), read_results(expected)
    assert [(r["input"], r["expression"]) for r in records] == [
        (r["input"], r["expression"]) for r in expected_records
    ]
    for record, expected_record in zip(records, expected_records):
        assert record["status"] == "ok", record
        for key, value in expected_record.items():
            if key in ("mask", "uncertainty", "overlay"):
                assert Path(record[key]) == output / Path(value).name
                with Image.open(record[key]) as image, Image.open(value) as expected_image:
                    difference = np.abs(np.asarray(image, np.int16) - np.asarray(expected_image, np.int16))
                # Masks are exact; an 8-bit picture made from another process's floats may differ by one level.
                assert difference.max() <= (0 if key == "mask" else 1), (key, record["input"])
            elif key == "score":
                assert_close_across_processes(record[key], value)
            elif key != "seconds":
                assert record[key] == value, (key, record["input"])


def logged_inputs(log_prefix: Path) -> dict[int, list[str]]:
    logs = {}
    for rank in (0, 1):
        log = Path(f"{log_prefix}.rank-{rank}")
        logs[rank] = log.read_text().splitlines() if log.exists() else []
    return logs


@pytest.mark.slow  # multi-process, as the DDP training tests
def test_two_processes_write_what_one_process_writes(workspace, one_process, tmp_path):
    output = tmp_path / "two"
    log = tmp_path / "segmented"
    result = launch(workspace["child"], str(log), "-1", *predict_flags(workspace, output))
    assert result.returncode == 0, tails(result)
    assert result.stdout.count("inputs done") == 1, tails(result)  # one main process prints the summary
    # Each process segmented its own contiguous share, and no input twice.
    inputs = sorted(str(path) for path in Path(workspace["images"]).iterdir())
    assert logged_inputs(log) == {0: inputs[:4], 1: inputs[4:]}
    assert not list(output.glob(PROCESS_RESULTS_GLOB))  # merged into results.jsonl, then removed
    assert_same_outputs(output, one_process)


@pytest.mark.slow  # multi-process, as the DDP training tests
def test_a_run_killed_under_two_processes_resumes_under_one(workspace, one_process, tmp_path, monkeypatch):
    output = tmp_path / "killed"
    log = tmp_path / "segmented"
    result = launch(workspace["child"], str(log), "1", *predict_flags(workspace, output))
    assert result.returncode != 0, "process 1 should have killed itself\n" + tails(result)
    inputs = sorted(str(path) for path in Path(workspace["images"]).iterdir())
    assert logged_inputs(log) == {0: inputs[:2], 1: inputs[4:6]}  # each stopped as it started its second input
    # Each process wrote its first input to its own results file; nothing was merged. Input 4 is done and inputs 1-3
    # are not, so the merged file's order must be restored, not appended to.
    process_files = sorted(output.glob(PROCESS_RESULTS_GLOB))
    assert process_files == [output / "results.rank-0.jsonl", output / "results.rank-1.jsonl"]
    done_before = [
        record["input"] for file in process_files for record in map(json.loads, file.read_text().splitlines())
    ]
    assert done_before == [inputs[0]] * len(EXPRESSIONS) + [inputs[4]] * len(EXPRESSIONS)
    assert read_results(output) == []

    segmented = count_segmented_inputs(monkeypatch)
    assert main([*predict_flags(workspace, output), "--resume"]) == 0
    assert len(segmented) == NUM_INPUTS - 2  # what either process finished is not done again
    assert not list(output.glob(PROCESS_RESULTS_GLOB))
    assert not [path for path in output.iterdir() if path.name.startswith(".")]
    assert_same_outputs(output, one_process)


@pytest.mark.slow  # multi-process, as the DDP training tests
def assert_same_metrics(actual, expected, path: str = "results") -> None:
    """The same keys and structure, integers and strings exactly, floats within 1e-3."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_metrics(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_metrics(a, e, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-3), path
    else:
        assert actual == expected, path


def test_evaluate_on_two_processes_gives_the_metrics_of_one(workspace, tmp_path):
    model = workspace["model"]
    # 7 samples in batches of 2: the processes take 2 batches each, the last one short.
    export_folder(DatasetDict({"test": small_dataset(NUM_INPUTS).remove_columns("class_mask")}), tmp_path / "data")
    flags = ["evaluate", "--model", model, "--dataset", "folder", "--data_dir", str(tmp_path / "data"),
             "--batch_size", "2", "--uncertainty_metrics", "--device", "cpu", "--no_progress"]
    assert main([*flags, "--output_file", str(tmp_path / "one.json")]) == 0
    result = launch("-m", "crobim_u.cli", *flags, "--output_file", str(tmp_path / "two.json"))
    assert result.returncode == 0, tails(result)
    # One main process writes the results; two processes that each believed to be alone would both write them.
    assert result.stdout.count("wrote ") == 1, tails(result)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_samples"] == NUM_INPUTS  # every sample once: not twice, not only one process's share
    # The counts are integers, added in data set order as one process adds them, so on one host the JSON is the same
    # to the bit. Across processes a float may differ in its last bit (tests/helpers.py), which can move a pixel
    # whose probability sits on the threshold: 1e-3 allows that, and a lost or doubled sample out of 7 moves the
    # metrics by far more.
    assert_same_metrics(two, one)
    assert 0 < one["oIoU"] < 1 and 0 < one["auroc"] < 1


def test_resume_reads_the_records_every_process_left_and_restores_input_order(workspace, one_process, tmp_path,
                                                                              monkeypatch):
    # What a run on three processes killed early leaves: processes 0 and 2 each wrote their first input to their own
    # results file, process 1 none; nothing was merged into results.jsonl.
    output = tmp_path / "out"
    assert main(predict_flags(workspace, output)) == 0
    records = read_results(output)
    inputs = sorted(str(path) for path in Path(workspace["images"]).iterdir())
    for rank, done in ((0, inputs[0]), (2, inputs[5])):
        lines = [json.dumps(record) + "\n" for record in records if record["input"] == done]
        (output / f"results.rank-{rank}.jsonl").write_text("".join(lines))
    (output / RESULTS_FILE).write_text("")
    segmented = count_segmented_inputs(monkeypatch)
    assert main([*predict_flags(workspace, output), "--resume"]) == 0
    assert len(segmented) == NUM_INPUTS - 2
    assert not list(output.glob(PROCESS_RESULTS_GLOB))
    assert_same_outputs(output, one_process)  # input 5's records back in place, not first or last


def test_release_process_group_tears_down_a_launchers_group(tmp_path):
    import torch.distributed as dist

    from crobim_u.inference.parallel import release_process_group

    # What `accelerate launch` leaves in each process: an initialised gloo group (here of one process).
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        release_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    release_process_group()  # nothing left to release: a no-op
