"""Data sets in the Hub's formats, offline: parquet folders and `imagefolder` folders the tests write, a Hub id served
by a stand-in for `datasets.load_dataset`, and the upload of `push_referring_dataset` caught before the network."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
from huggingface_hub import DatasetCard, HfApi

from crobim_u.data import (
    DatasetFormatError,
    export_folder,
    export_parquet,
    load_referring_dataset,
    load_refsegrs,
    load_rrsisd,
    push_referring_dataset,
)
from crobim_u.data.synthetic import load_synthetic
from helpers import write_refsegrs, write_rrsisd


def records(dataset_dict) -> dict[str, list[dict]]:
    """Every row of every split, images and masks as arrays: what equality of two data sets means here."""
    return {
        split: [
            {key: np.asarray(value) if isinstance(value, PIL.Image.Image) else value for key, value in row.items()}
            for row in dataset
        ]
        for split, dataset in dataset_dict.items()
    }


def assert_same_records(actual, expected) -> None:
    assert list(actual) == list(expected)
    for split in expected:
        assert len(actual[split]) == len(expected[split]), split
        for got, want in zip(actual[split], expected[split]):
            assert sorted(got) == sorted(want) == ["category", "expression", "image", "image_id", "mask", "split"]
            for key in want:
                if isinstance(want[key], np.ndarray):
                    assert np.array_equal(got[key], want[key]), key
                else:
                    assert got[key] == want[key], key


def test_parquet_export_is_a_hub_folder_that_loads_back_equal_without_the_source_files(tmp_path):
    write_refsegrs(tmp_path / "refsegrs")
    expected = records(load_refsegrs(str(tmp_path / "refsegrs")))
    export_parquet(load_refsegrs(str(tmp_path / "refsegrs")), tmp_path / "parquet", repo_id="me/refsegrs-mini")
    shutil.rmtree(tmp_path / "refsegrs")  # the parquet files hold the image bytes, not paths

    assert sorted(path.name for path in (tmp_path / "parquet" / "data").iterdir()) == [
        f"{split}-00000-of-00001.parquet" for split in ("test", "train", "validation")
    ]
    card = DatasetCard.load(tmp_path / "parquet" / "README.md")
    assert card.data.task_categories == ["image-segmentation"] and "referring-segmentation" in card.data.tags
    assert card.data.configs[0]["data_files"][0] == {"split": "train", "path": "data/train-*.parquet"}
    assert 'load_referring_dataset("me/refsegrs-mini")' in card.text
    loaded = load_referring_dataset(str(tmp_path / "parquet"), cache_dir=str(tmp_path / "cache"))
    assert_same_records(records(loaded), expected)
    assert set(np.unique(records(loaded)["train"][0]["mask"])) <= {0, 1}
    by_builder = load_referring_dataset("parquet", str(tmp_path / "parquet"), cache_dir=str(tmp_path / "cache"))
    assert_same_records(records(by_builder), expected)
    with pytest.raises(FileExistsError, match="is not empty"):
        export_parquet(loaded, tmp_path / "parquet")


def test_parquet_export_of_coco_segmentation_masks_loads_back_equal(tmp_path):
    write_rrsisd(tmp_path / "rrsisd")
    source = load_rrsisd(str(tmp_path / "rrsisd"))
    export_parquet(source, tmp_path / "parquet")
    loaded = load_referring_dataset(str(tmp_path / "parquet"), cache_dir=str(tmp_path / "cache"))
    assert_same_records(records(loaded), records(source))


def test_imagefolder_export_loads_back_equal_through_datasets(tmp_path):
    write_refsegrs(tmp_path / "refsegrs")
    source = load_refsegrs(str(tmp_path / "refsegrs"))
    export_folder(source, str(tmp_path / "imagefolder"))
    loaded = load_referring_dataset("imagefolder", str(tmp_path / "imagefolder"), cache_dir=str(tmp_path / "cache"))
    assert_same_records(records(loaded), records(source))
    only_test = load_referring_dataset(
        "imagefolder", str(tmp_path / "imagefolder"), splits=["test"], cache_dir=str(tmp_path / "cache")
    )
    assert list(only_test) == ["test"]


def write_other_columns(folder: Path) -> None:
    """A parquet data set as others publish them: other column names, 0/255 masks, no ids, splits or categories."""
    rng = np.random.default_rng(0)
    masks = [np.zeros((6, 8), np.uint8) for _ in range(2)]
    masks[0][1:3, 2:5] = 255
    masks[1][4:, :3] = 255
    table = datasets.Dataset.from_dict(
        {
            "img": [PIL.Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)) for _ in range(2)],
            "segmentation": [PIL.Image.fromarray(mask) for mask in masks],
            "sentence": ["the red roof", "the pond in the corner"],
        },
        features=datasets.Features(
            {"img": datasets.Image(), "segmentation": datasets.Image(), "sentence": datasets.Value("string")}
        ),
    )
    (folder / "data").mkdir(parents=True)
    table.to_parquet(folder / "data" / "train-00000-of-00001.parquet")


def test_columns_map_to_the_canonical_record_and_missing_ones_are_named(tmp_path):
    write_other_columns(tmp_path / "other")
    folder, cache = str(tmp_path / "other"), str(tmp_path / "cache")
    with pytest.raises(
        DatasetFormatError,
        match=r"split 'train': expected the column\(s\) 'image', 'mask', 'expression', got columns "
        r"\['img', 'segmentation', 'sentence'\]",
    ):
        load_referring_dataset(folder, cache_dir=cache)
    with pytest.raises(DatasetFormatError, match=r"expected the column\(s\) 'mask' \(from 'seg'\), 'expression', got"):
        load_referring_dataset(folder, columns={"image": "img", "mask": "seg"}, cache_dir=cache)
    with pytest.raises(ValueError, match=r"columns maps unknown canonical names \['sentence'\]"):
        load_referring_dataset(folder, columns={"sentence": "sentence"}, cache_dir=cache)

    loaded = load_referring_dataset(
        folder, columns={"image": "img", "mask": "segmentation", "expression": "sentence"}, cache_dir=cache
    )
    rows = records(loaded)["train"]
    assert [row["expression"] for row in rows] == ["the red roof", "the pond in the corner"]
    assert [(row["image_id"], row["split"], row["category"]) for row in rows] == [
        ("train-000000", "train", ""), ("train-000001", "train", "")
    ]
    assert rows[0]["mask"].sum() == 6 and set(np.unique(rows[0]["mask"])) == {0, 1}  # 0/255 read as 0/1


def test_hub_id_goes_to_datasets_load_dataset_with_its_options(monkeypatch, tmp_path):
    write_other_columns(tmp_path / "other")
    calls, load_local_folder = [], datasets.load_dataset

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return load_local_folder(str(tmp_path / "other"), cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    loaded = load_referring_dataset(
        "someone/aerial-phrases", columns={"image": "img", "mask": "segmentation", "expression": "sentence"},
        revision="v1",
    )
    assert calls == [("someone/aerial-phrases", {"revision": "v1"})]
    assert loaded["train"][1]["expression"] == "the pond in the corner"
    with pytest.raises(ValueError, match=r"A Hub dataset id or folder \('someone/aerial-phrases'\) takes no data_dir"):
        load_referring_dataset("someone/aerial-phrases", "/data")


def test_push_uploads_the_parquet_folder_which_loads_back_equal(monkeypatch, tmp_path):
    source = load_synthetic(num_train=3, num_validation=0, num_test=2, image_size=32, cache_dir=str(tmp_path / "gen"))
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, repo_type, **kwargs):
        calls.append(("upload_folder", repo_id, repo_type))
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_referring_dataset(source, "me/synthetic-mini", private=True, license="apache-2.0")
    assert url == "https://huggingface.co/datasets/me/synthetic-mini/commit/0"
    assert calls == [
        ("create_repo", "me/synthetic-mini", {"repo_type": "dataset", "private": True, "exist_ok": True}),
        ("upload_folder", "me/synthetic-mini", "dataset"),
    ]
    assert DatasetCard.load(tmp_path / "uploaded" / "README.md").data.license == "apache-2.0"
    canonical = ("image", "mask", "expression", "image_id", "split", "category")
    expected = {
        split: [{key: row[key] for key in canonical} for row in rows]
        for split, rows in records(source).items()
        if rows  # the empty validation split is not written
    }
    loaded = load_referring_dataset(str(tmp_path / "uploaded"), cache_dir=str(tmp_path / "cache"))
    assert_same_records(records(loaded), expected)


def test_training_arguments_hand_the_column_mapping_to_the_loader():
    from crobim_u.training.arguments import DataArguments

    arguments = DataArguments(dataset_name="someone/aerial-phrases", dataset_columns='{"expression": "sentence"}')
    assert arguments.loader_kwargs() == {"columns": {"expression": "sentence"}}
    with pytest.raises(ValueError, match=r"dataset_columns must be a JSON object, got '\[\"sentence\"\]'"):
        DataArguments(dataset_name="someone/aerial-phrases", dataset_columns='["sentence"]').loader_kwargs()
