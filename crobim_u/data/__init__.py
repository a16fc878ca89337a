"""Referring-segmentation data sets as `datasets.DatasetDict`s of canonical records.

Every loader returns rows with `image`, `mask` (mode "L", values 0/1), `expression`, `image_id`, `split` and
`category`, decoded when a row is read (see `crobim_u.data.features`).
"""

import os
from typing import Any

from datasets import DatasetDict

from .errors import DatasetFormatError, MissingDataFileError
from .features import CANONICAL_FEATURES, decode_referring_batch
from .folder import export_folder, load_folder
from .hub import HUB_BUILDERS, export_parquet, load_hub_dataset, push_referring_dataset
from .refsegrs import load_refsegrs
from .risbench import load_risbench
from .rrsisd import load_rrsisd
from .safe_pickle import load_pickle_safely


DATASET_NAMES = ("refsegrs", "rrsisd", "risbench", "folder", "synthetic")
_FILE_LOADERS = {"refsegrs": load_refsegrs, "rrsisd": load_rrsisd, "risbench": load_risbench, "folder": load_folder}

__all__ = [
    "CANONICAL_FEATURES",
    "DATASET_NAMES",
    "DatasetFormatError",
    "MissingDataFileError",
    "decode_referring_batch",
    "export_folder",
    "export_parquet",
    "load_folder",
    "load_hub_dataset",
    "load_pickle_safely",
    "load_referring_dataset",
    "load_refsegrs",
    "load_risbench",
    "load_rrsisd",
    "load_synthetic",
    "push_referring_dataset",
]


def load_referring_dataset(name: str, data_dir: str | None = None, **kwargs: Any) -> DatasetDict:
    """Loads a referring-segmentation data set by name, as used by training and the command line.

    Args:
        name (`str`):
            One of `"refsegrs"`, `"rrsisd"`, `"risbench"`, `"folder"` (files in `data_dir`) or `"synthetic"`
            (generated; takes no `data_dir`); `"parquet"` or `"imagefolder"` (a folder in that format in
            `data_dir`); or a Hub dataset id (`owner/name`) or a local folder that `datasets.load_dataset` reads,
            without `data_dir` (see [`load_hub_dataset`]).
        data_dir (`str`, *optional*):
            The data set folder; required for the file formats and the builder names.
        **kwargs:
            Passed to the loader, e.g. `splits` and `skip_invalid`, the generator options of
            `crobim_u.data.synthetic.load_synthetic`, or `columns` and the `datasets.load_dataset` options of
            [`load_hub_dataset`].

    Returns:
        `datasets.DatasetDict`: the splits of canonical records.
    """
    if name == "synthetic":
        if data_dir is not None:
            raise ValueError(f"The synthetic data set is generated and takes no data_dir (got {data_dir!r}).")
        from .synthetic import load_synthetic

        return load_synthetic(**kwargs)
    if name not in _FILE_LOADERS and name not in HUB_BUILDERS:
        if "/" in name or os.path.isdir(name):
            if data_dir is not None:
                raise ValueError(f"A Hub dataset id or folder ({name!r}) takes no data_dir (got {data_dir!r}).")
            return load_hub_dataset(name, **kwargs)
        raise ValueError(
            f"Unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES + HUB_BUILDERS)}, a Hub dataset id "
            "(owner/name) or a folder that datasets.load_dataset reads."
        )
    if data_dir is None:
        raise ValueError(f"The {name} data set needs data_dir, the folder that holds it.")
    if name in HUB_BUILDERS:
        return load_hub_dataset(name, data_dir, **kwargs)
    return _FILE_LOADERS[name](data_dir, **kwargs)


def __getattr__(name: str) -> Any:
    # The synthetic generator is imported on first use only: loading real data never needs it.
    if name == "load_synthetic":
        from .synthetic import load_synthetic

        return load_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
