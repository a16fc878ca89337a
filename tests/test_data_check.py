"""The data check before training: a corrupt image is listed by `crobim-u check-data`, and training stops before its
first step naming it, or with `--skip_invalid_rows` trains without it and counts it in the log and the model card.
An expression the tokenizer reduces to nothing is found where the rows are prepared as training does."""

import json

import pytest

from crobim_u import CrobimUImageProcessor, CrobimUProcessor
from crobim_u.cli import main as cli_main
from crobim_u.data import export_folder, load_referring_dataset
from crobim_u.data.check import InvalidRowsError, find_invalid_rows
from crobim_u.training.run import build_synthetic_tokenizer, main as train_main


SIZE = 64
CORRUPT_ROW = 5
UNREADABLE_EXPRESSION_ROW = 2


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    """
    A `folder` data set of 12 training and 2 validation rows: training row 5 has a text file as image, row 2 an
    expression of zero-width spaces (no token), and a processor to prepare them as training does.
    """
    root = tmp_path_factory.mktemp("data") / "folder"
    synthetic = load_referring_dataset(
        "synthetic", num_train=12, num_validation=2, num_test=0, image_size=SIZE,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    export_folder(synthetic, str(root))
    rows = [json.loads(line) for line in (root / "train" / "metadata.jsonl").read_text().splitlines()]
    corrupt = root / "train" / rows[CORRUPT_ROW]["file_name"]
    corrupt.write_text("not an image")
    rows[UNREADABLE_EXPRESSION_ROW]["expression"] = "\u200b\u200b"
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = root.parent / "tokenizer"
    build_synthetic_tokenizer().save_pretrained(tokenizer)
    processor = root.parent / "processor"
    CrobimUProcessor(CrobimUImageProcessor(size={"height": SIZE, "width": SIZE}),
                     build_synthetic_tokenizer()).save_pretrained(processor)
    return {"root": root, "corrupt": corrupt, "tokenizer": tokenizer, "processor": processor}


def test_check_lists_exactly_the_corrupt_row(corrupt_folder):
    dataset = load_referring_dataset("folder", str(corrupt_folder["root"]))
    (row,) = find_invalid_rows(dataset["train"], "train")
    assert (row.split, row.index, row.image) == ("train", CORRUPT_ROW, str(corrupt_folder["corrupt"]))
    assert row.error.startswith("UnidentifiedImageError: cannot identify image file")
    assert find_invalid_rows(dataset["validation"], "validation") == []


def test_check_data_command_names_the_file(corrupt_folder, capsys):
    command = ["check-data", "--dataset", "folder", "--data_dir", str(corrupt_folder["root"]), "--no_progress"]
    assert cli_main(command) == 1
    output = capsys.readouterr().out
    assert "train: 12 rows, 1 invalid" in output and "validation: 2 rows, 0 invalid" in output
    assert f"INVALID train row {CORRUPT_ROW} ({corrupt_folder['corrupt']})" in output
    # Prepared by the checkpoint's processor, as training does: the expression without tokens is found too.
    assert cli_main([*command, "--model", str(corrupt_folder["processor"]), "--split", "train"]) == 1
    output = capsys.readouterr().out
    assert "train: 12 rows, 2 invalid" in output and "validation" not in output
    assert f"INVALID train row {UNREADABLE_EXPRESSION_ROW} (" in output and "ValueError: Expression 0" in output


def training_flags(corrupt_folder, output_dir, *extra) -> list[str]:
    return [
        "--preset", "tiny", "--image_size", str(SIZE), "--dataset_name", "folder",
        "--data_dir", str(corrupt_folder["root"]), "--tokenizer_name_or_path", str(corrupt_folder["tokenizer"]),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--report_to", "none", *extra,
    ]


def test_training_stops_before_its_first_step_naming_the_file(corrupt_folder, tmp_path):
    with pytest.raises(SystemExit) as raised:
        train_main(training_flags(corrupt_folder, tmp_path / "run"))
    message = str(raised.value.code)
    assert message.startswith("error: ") and "2 invalid row(s) found before training" in message
    assert f"train row {CORRUPT_ROW} ({corrupt_folder['corrupt']})" in message
    assert f"train row {UNREADABLE_EXPRESSION_ROW} (" in message
    assert "--skip_invalid_rows true" in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # no step, no checkpoint
    assert issubclass(InvalidRowsError, ValueError)


def test_training_with_skip_invalid_rows_counts_them(corrupt_folder, tmp_path, caplog):
    output_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="crobim_u.training.run"):
        train_main(training_flags(corrupt_folder, output_dir, "--skip_invalid_rows", "true"))
    assert f"Skipped 2 invalid row(s) of {corrupt_folder['root']} train" in caplog.text
    assert str(corrupt_folder["corrupt"]) in caplog.text
    card = (output_dir / "README.md").read_text()
    assert "| invalid train rows skipped | 2 |" in card
    assert "(10 samples)" in card
    assert (output_dir / "model.safetensors").is_file()
