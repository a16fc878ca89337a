"""The command line's conventions: underscore flags, hidden deprecated spellings that still work, shared defaults."""

from __future__ import annotations

import argparse
import re

import pytest

from crobim_u.cli import build_parser
from crobim_u.image_processing_crobim_u import DEFAULT_THRESHOLD
from crobim_u.inference.evaluation import DEFAULT_BATCH_SIZE
from crobim_u.inference.geo import DEFAULT_PERCENTILES
from crobim_u.inference.tiling import DEFAULT_OVERLAP, DEFAULT_WINDOW_BATCH_SIZE


# `train` is left out: everything after it goes to transformers' HfArgumentParser, which lists both spellings.
HAND_BUILT = ("evaluate", "predict", "demo", "check-data")

PREDICT = ["predict", "--model", "m", "--expression", "the car", "x.png"]
EVALUATE = ["evaluate", "--model", "m", "--dataset", "synthetic"]
# (arguments every run needs, old spelling, new spelling): each old spelling the command line ever had.
RENAMED = [
    (PREDICT, ["--output", "out"], ["--output_dir", "out"]),
    ([*PREDICT, "--output_dir", "out"], ["--min-area", "5"], ["--min_area", "5"]),
    ([*PREDICT, "--output_dir", "out"], ["--dst-crs", "EPSG:3857"], ["--dst_crs", "EPSG:3857"]),
    ([*PREDICT, "--output_dir", "out"], ["--vector-format", "gpkg"], ["--vector_format", "gpkg"]),
    ([*PREDICT, "--output_dir", "out"], ["--no-progress"], ["--no_progress"]),
    (EVALUATE, ["--output", "eval.json"], ["--output_file", "eval.json"]),
    (EVALUATE, ["--uncertainty-metrics"], ["--uncertainty_metrics"]),
    (EVALUATE, ["--no-progress"], ["--no_progress"]),
    (["demo"], ["--no-progress"], ["--no_progress"]),
    (["check-data", "--dataset", "synthetic"], ["--no-progress"], ["--no_progress"]),
]


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return subparsers.choices


def test_every_subcommand_is_there_and_train_keeps_its_own_parser():
    parsers = subcommand_parsers()
    assert set(parsers) == {"train", *HAND_BUILT}
    assert parsers["train"].prefix_chars == "+"  # HfArgumentParser reads the rest untouched


@pytest.mark.parametrize("command", HAND_BUILT)
def test_help_shows_underscore_spellings_only(command):
    text = subcommand_parsers()[command].format_help()
    long_flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
    assert "--help" in long_flags
    assert [flag for flag in long_flags - {"--help"} if "-" in flag[2:]] == []
    assert "--output " not in text and "--output\n" not in text  # a bare --output is never offered


IDS = [f"{needed[0]} {old[0]}" for needed, old, _ in RENAMED]


@pytest.mark.parametrize(("needed", "old", "new"), RENAMED, ids=IDS)
def test_an_old_spelling_works_and_says_what_replaces_it(needed, old, new, capsys):
    parser = build_parser()
    with_new = parser.parse_args([*needed, *new])
    assert capsys.readouterr().err == ""
    with_old = parser.parse_args([*needed, *old])
    message = f"{old[0]} is deprecated and will be removed in the next release; use {new[0]}\n"
    assert capsys.readouterr().err == message
    assert vars(with_old) == vars(with_new)


def test_old_spellings_are_hidden_but_listed_as_aliases():
    for needed, old, new in RENAMED:
        text = subcommand_parsers()[needed[0]].format_help()
        assert new[0] in text
        assert re.search(rf"(?<![\w-]){re.escape(old[0])}(?![\w-])", text) is None, old[0]


def test_predict_needs_an_output_folder_in_either_spelling(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(PREDICT)
    assert "--output_dir is required" in capsys.readouterr().err


def test_the_argparse_defaults_read_the_shared_constants():
    predict = build_parser().parse_args([*PREDICT, "--output_dir", "out"])
    assert (predict.overlap, predict.batch_size, predict.threshold) == (
        DEFAULT_OVERLAP, DEFAULT_WINDOW_BATCH_SIZE, DEFAULT_THRESHOLD
    )
    assert predict.stretch == DEFAULT_PERCENTILES
    assert build_parser().parse_args(EVALUATE).batch_size == DEFAULT_BATCH_SIZE


def test_train_help_shows_underscore_spellings_only_and_dash_twins_still_parse(tmp_path):
    # HfArgumentParser accepts `--max-steps` beside `--max_steps`; help lists the underscore spelling alone.
    from crobim_u.training.arguments import build_argument_parser, parse_arguments

    text = build_argument_parser("crobim-u train").format_help()
    long_flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
    assert {"--output_dir", "--max_steps", "--group_by_image"} <= long_flags
    assert [flag for flag in long_flags - {"--help"} if "-" in flag[2:]] == []
    _, _, training_args = parse_arguments(["--output_dir", str(tmp_path), "--max-steps", "3"])
    assert training_args.max_steps == 3
