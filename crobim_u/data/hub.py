"""Referring-segmentation data sets in the Hub's formats: parquet repositories and `imagefolder` folders.

[`load_hub_dataset`] reads whatever `datasets.load_dataset` reads (a Hub dataset id, a local folder of parquet files,
an `imagefolder` folder) and maps its columns to the canonical record. [`export_parquet`] writes canonical records
as a Hub-layout folder (`data/<split>-00000-of-00001.parquet` and a dataset card), and [`push_referring_dataset`]
uploads that folder to a Hub dataset repository, so that `load_hub_dataset("<owner>/<name>")` reads it back.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
from datasets import Dataset, DatasetDict
from datasets.table import embed_table_storage
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from .errors import DatasetFormatError
from .features import (
    CANONICAL_FEATURES,
    STORAGE_FEATURES,
    STORAGE_ONLY_COLUMNS,
    canonical_split_name,
    decode_referring_batch,
)


REQUIRED_COLUMNS = ("image", "mask", "expression")
HUB_BUILDERS = ("parquet", "imagefolder")
DATA_FOLDER = "data"
_CARD_TAGS = ["referring-segmentation", "referring-image-segmentation", "remote-sensing", "crobim-u"]


def load_hub_dataset(
    path: str,
    data_dir: str | None = None,
    columns: Mapping[str, str] | None = None,
    splits: Sequence[str] | None = None,
    **load_kwargs: Any,
) -> DatasetDict:
    """
    Loads a data set through `datasets.load_dataset` as canonical referring-segmentation records.

    The rows read as every loader's do (see `crobim_u.data.features`): `image`, `mask` (mode "L", values 0/1, with
    the "auto" rule: a mask with values in {0, 1} is taken as is, any other has foreground `value > 127`),
    `expression`, `image_id`, `split` and `category`. A data set without `image_id` gets `<split>-<row number>`,
    without `split` the name of its split, without `category` `""`.

    Args:
        path (`str`):
            A Hub dataset id (`owner/name`), a local folder that `datasets.load_dataset` reads (parquet files, an
            `imagefolder` layout such as [`~crobim_u.data.export_folder`] writes, a folder [`export_parquet`]
            wrote), or the builder name `"parquet"` or `"imagefolder"` with `data_dir`.
        data_dir (`str`, *optional*):
            The folder of the builder named by `path`.
        columns (`Mapping[str, str]`, *optional*):
            Canonical column name -> the data set's column, for the columns named otherwise, e.g.
            `{"expression": "sentence", "mask": "segmentation"}`.
        splits (`Sequence[str]`, *optional*):
            Splits to keep (`val` means `validation`). Defaults to all.
        **load_kwargs:
            Passed to `datasets.load_dataset`, e.g. `revision`, `name` (the configuration) or `cache_dir`.

    Returns:
        `datasets.DatasetDict`: the splits of canonical records.

    Raises:
        [`~crobim_u.data.DatasetFormatError`]: a split lacks one of the columns `image`, `mask`, `expression` (after
        the mapping); the message names the missing columns and the columns found.
    """
    unknown = sorted(set(columns or {}) - set(CANONICAL_FEATURES))
    if unknown:
        raise ValueError(
            f"columns maps unknown canonical names {unknown}; the canonical columns are {list(CANONICAL_FEATURES)}."
        )
    if data_dir is not None:
        load_kwargs["data_dir"] = data_dir
    loaded = datasets.load_dataset(path, **load_kwargs)
    mapping = {**{name: name for name in CANONICAL_FEATURES}, **(columns or {})}
    requested = None if splits is None else {canonical_split_name(split) for split in splits}
    found = {canonical_split_name(split): dataset for split, dataset in loaded.items()}
    if requested is not None and not requested <= found.keys():
        raise ValueError(f"{path} has no split(s) {sorted(requested - found.keys())}; found {sorted(found)}")
    source = path if data_dir is None else f"{path} {data_dir}"
    return DatasetDict(
        {
            split: _storage_dataset(dataset, mapping, split, source)
            for split, dataset in found.items()
            if requested is None or split in requested
        }
    ).with_transform(decode_referring_batch)


def _storage_dataset(dataset: Dataset, mapping: dict[str, str], split: str, source: str) -> Dataset:
    """The split's mapped columns plus the defaults and storage columns of [`STORAGE_FEATURES`]."""
    missing = [name for name in REQUIRED_COLUMNS if mapping[name] not in dataset.column_names]
    if missing:
        wanted = ", ".join(
            repr(name) if mapping[name] == name else f"{name!r} (from {mapping[name]!r})" for name in missing
        )
        raise DatasetFormatError(
            source, f"split {split!r}", f"the column(s) {wanted}",
            f"columns {dataset.column_names}; map yours with columns={{'<canonical name>': '<column>'}}",
        )
    present = {name: column for name, column in mapping.items() if column in dataset.column_names}
    dataset = dataset.select_columns(list(present.values()))
    dataset = dataset.rename_columns({column: name for name, column in present.items() if column != name})
    defaults = {
        "image_id": lambda count: [f"{split}-{index:06d}" for index in range(count)],
        "split": lambda count: [split] * count,
        "category": lambda count: [""] * count,
        **{name: (lambda count: [None] * count) for name in STORAGE_ONLY_COLUMNS},
    }
    for name, values in defaults.items():
        if name not in dataset.column_names:
            dataset = dataset.add_column(name, values(len(dataset)), feature=STORAGE_FEATURES[name])
    for name, feature in STORAGE_FEATURES.items():
        if dataset.features[name] != feature:
            dataset = dataset.cast_column(name, feature)
    return dataset


def export_parquet(
    dataset_dict: DatasetDict,
    root: str | os.PathLike,
    pretty_name: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> None:
    """
    Writes canonical referring-segmentation records as a Hub dataset folder: `data/<split>-00000-of-00001.parquet`
    (images and masks embedded as bytes, so the files stand alone) and a dataset card, `README.md`, whose `configs`
    name the split files. `datasets.load_dataset(root)` and [`load_hub_dataset`] read it back with equal records.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            Splits of canonical records (`image`, `mask` with values 0/1, `expression`, `image_id`, optionally
            `split` and `category`), e.g. the output of any loader of this package. Other columns are not written,
            nor are empty splits.
        root (`str` or `os.PathLike`):
            The output folder; it must not exist or be empty.
        pretty_name (`str`, *optional*):
            The card's title.
        license (`str`, *optional*):
            The data's license identifier for the card (e.g. `"cc-by-4.0"`); the data keep their own terms.
        repo_id (`str`, *optional*):
            The Hub id the folder is meant for, used in the card's loading snippet.
    """
    root = os.fspath(root)
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"Export folder {root} is not empty")
    os.makedirs(os.path.join(root, DATA_FOLDER), exist_ok=True)
    counts = {}
    for split, dataset in dataset_dict.items():
        if len(dataset) == 0:
            continue  # datasets cannot load a split from a parquet file without rows
        canonical = dataset.map(
            _canonical_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
            fn_kwargs={"split": split, "stored": dataset.with_format("arrow")}, features=CANONICAL_FEATURES,
            desc=f"canonical records ({split})",
        )
        # Images read from files are stored as paths until their bytes are embedded, as push_to_hub does.
        embedded = canonical.with_format("arrow").map(embed_table_storage, batched=True, desc=f"embedding ({split})")
        embedded.with_format(None).to_parquet(os.path.join(root, DATA_FOLDER, f"{split}-00000-of-00001.parquet"))
        counts[split] = len(dataset)
    _dataset_card(counts, pretty_name, license, repo_id).save(os.path.join(root, "README.md"))


def _canonical_batch(batch: dict[str, list], indices: list[int], split: str, stored: Dataset) -> dict[str, list]:
    """
    The canonical columns of a batch of records; rows without `split` or `category` get their defaults. Images are
    taken as stored (the file's or the data set's bytes), since a decoded JPEG would be encoded again, with losses.
    """
    count = len(batch["image"])
    return {
        "image": stored[indices]["image"].to_pylist(),
        **{name: batch[name] for name in ("mask", "expression", "image_id")},
        "split": batch.get("split", [split] * count),
        "category": [category or "" for category in batch.get("category", [""] * count)],
    }


def _dataset_card(
    counts: dict[str, int], pretty_name: str | None, license: str | None, repo_id: str | None
) -> DatasetCard:
    data = DatasetCardData(
        pretty_name=pretty_name,
        license=license,
        task_categories=["image-segmentation"],
        tags=_CARD_TAGS,
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{DATA_FOLDER}/{split}-*.parquet"} for split in counts],
            }
        ],
    )
    name = repo_id or "path/to/this/folder"
    rows = "\n".join(f"| {split} | {count} |" for split, count in counts.items())
    text = f"""# {pretty_name or name.rstrip("/").split("/")[-1]}

Referring-segmentation records of remote-sensing images: one row per image-expression pair, in the canonical record
of the `crobim-u` package.

| column | content |
|---|---|
| `image` | the image |
| `mask` | the referred object: a single-band image, 1 inside, 0 outside |
| `expression` | the referring expression |
| `image_id` | the image's id (rows about one image share it) |
| `split` | the split |
| `category` | the object's category, `""` where the data set has none |

| split | rows |
|---|---:|
{rows}

```python
from crobim_u.data import load_referring_dataset

dataset = load_referring_dataset("{name}")  # or datasets.load_dataset("{name}")
```
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def push_referring_dataset(
    dataset_dict: DatasetDict,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    pretty_name: str | None = None,
    license: str | None = None,
) -> str:
    """
    Uploads canonical referring-segmentation records to a Hub dataset repository, as [`export_parquet`] writes them
    (parquet files and a dataset card), creating the repository if needed.

    Args:
        dataset_dict (`datasets.DatasetDict`): Splits of canonical records, e.g. the output of any loader.
        repo_id (`str`): The dataset repository, `owner/name`.
        private (`bool`, *optional*): Whether a repository created here is private (the Hub's default otherwise).
        token (`str`, *optional*): A Hub token; defaults to the saved login.
        pretty_name (`str`, *optional*): The card's title.
        license (`str`, *optional*): The data's license identifier for the card.

    Returns:
        `str`: the URL of the commit.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        export_parquet(dataset_dict, folder, pretty_name=pretty_name, license=license, repo_id=repo_id)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="dataset", folder_path=folder,
            commit_message="Referring-segmentation records (crobim_u.data.push_referring_dataset)",
        )
    return commit.commit_url


__all__ = ["HUB_BUILDERS", "export_parquet", "load_hub_dataset", "push_referring_dataset"]
