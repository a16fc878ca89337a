"""
The contract every file-based data set loader keeps, tested once for all of them.

`LoaderContract` holds the tests; each `Test<Loader>` class below only says how to write a small data set in its
layout, what the loader must read from it, and which file to take away (as `ModelTesterMixin` does for the models of
segmentation_models_pytorch). A new loader gets the whole contract by adding one such class. What only one format
has (RLE decoding, the pickle check, the metadata layouts, malformed lines, round trips) is in `test_data_loaders.py`.
"""

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import DatasetDict
from helpers import (
    FOLDER_IMAGES,
    HEIGHT,
    REFSEGRS_MASKS,
    RISBENCH_MASKS,
    RRSISD_HEIGHT,
    RRSISD_WIDTH,
    WIDTH,
    folder_mask,
    random_rgb,
    rrsisd_masks,
    write_folder,
    write_refsegrs,
    write_risbench,
    write_rrsisd,
)

from crobim_u.data import (
    CANONICAL_FEATURES,
    DATASET_NAMES,
    MissingDataFileError,
    load_folder,
    load_referring_dataset,
    load_refsegrs,
    load_risbench,
    load_rrsisd,
)


def rows_of(dataset: DatasetDict):
    """`(split, row)` for every row, decoded."""
    for split in dataset:
        for row in dataset[split]:
            yield split, row


def records(dataset: DatasetDict) -> dict[str, list[tuple]]:
    """Every decoded row as a comparable tuple (images and masks by mode, size and pixels), by split."""
    return {
        split: [
            (row["expression"], row["image_id"], row["split"], row["category"], row["image"].mode, row["image"].size,
             row["image"].tobytes(), row["mask"].mode, row["mask"].tobytes())
            for row in dataset[split]
        ]
        for split in dataset
    }


class LoaderContract:
    """
    The tests every loader passes. Not collected by itself (no `Test` prefix): a `Test...` subclass sets the
    attributes and hooks below, and pytest runs each test once per subclass.
    """

    # --- what a subclass sets -----------------------------------------------------------------------------------
    load: Callable[..., DatasetDict]  # the loader, as `staticmethod(load_...)`
    name: str  # its name for `load_referring_dataset`
    write: Callable[[Path], None]  # writes the small data set into a folder, as `staticmethod(write_...)`
    # What the loader must read from that data set: `(expression, image_id, category)` of each row, by split in the
    # order the `DatasetDict` has them. The expected splits and row counts are this dict's keys and lengths.
    rows: dict[str, list[tuple[str, str, str]]]
    masks: dict[str, np.ndarray]  # the 0/1 mask of each image id (each small data set has one object per image)
    image_seeds: dict[str, int]  # the `random_rgb` seed of each image id
    image_size: tuple[int, int] = (HEIGHT, WIDTH)  # (height, width) of the images
    # The image whose files the missing-file tests remove; where the loader finds the reference to them, relative to
    # the data set folder (what the error message starts with); the rows kept by split with `skip_invalid=True`, and
    # how many items the loader reports as skipped.
    missing_image_id: str
    missing_file_reference: str
    rows_kept_without_missing_image: dict[str, int]
    skipped_items_for_missing_image: int
    unknown_split_error: str  # the message (a regex) for `splits=["dev"]`
    # Contract tests that do not apply to this loader, by the name pytest shows (with parameters), each with the
    # reason; the test is reported as skipped with it.
    opt_outs: dict[str, str] = {}

    def image_file(self, root: Path, image_id: str) -> Path:
        """The file of an image id in the data set written under `root`."""
        raise NotImplementedError

    def mask_file(self, root: Path, image_id: str) -> Path | None:
        """The mask file of an image id; `None` where masks are not files."""
        raise NotImplementedError

    def file_of(self, kind: str, root: Path, image_id: str) -> Path | None:
        return self.image_file(root, image_id) if kind == "image" else self.mask_file(root, image_id)

    def expected_image(self, root: Path, image_id: str) -> np.ndarray:
        """The pixels an image must decode to: by default the noise it was written from (lossless formats)."""
        return random_rgb(self.image_seeds[image_id], *self.image_size)

    # --- fixtures -------------------------------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _opt_out(self, request):
        reason = self.opt_outs.get(request.node.name)
        if reason is not None:
            pytest.skip(reason)

    @pytest.fixture
    def data_dir(self, tmp_path) -> Path:
        self.write(tmp_path)
        return tmp_path

    # --- the contract ---------------------------------------------------------------------------------------------

    def test_opt_outs_name_contract_tests(self):
        tests = {name for name in dir(LoaderContract) if name.startswith("test_")}
        assert {name.split("[")[0] for name in self.opt_outs} <= tests

    def test_returns_a_dataset_dict_of_the_expected_splits(self, data_dir):
        dataset = self.load(str(data_dir))
        assert isinstance(dataset, DatasetDict)
        assert list(dataset) == list(self.rows)  # train, validation, test order; `val` is returned as `validation`
        assert {split: dataset[split].num_rows for split in dataset} == {s: len(r) for s, r in self.rows.items()}

    def test_splits_have_the_canonical_columns_and_features(self, data_dir):
        dataset = self.load(str(data_dir))
        for split in dataset:
            features = dataset[split].features  # the stored columns: the canonical ones and how to make the mask
            assert {name: features[name] for name in CANONICAL_FEATURES} == CANONICAL_FEATURES
        for split, row in rows_of(dataset):
            assert set(row) == set(CANONICAL_FEATURES)  # the storage-only columns are not in a decoded row
            assert isinstance(row["image"], PIL.Image.Image) and isinstance(row["mask"], PIL.Image.Image)
            assert all(isinstance(row[name], str) for name in ("expression", "image_id", "split", "category"))

    def test_rows_are_the_written_data(self, data_dir):
        dataset = self.load(str(data_dir))
        for split, expected in self.rows.items():
            rows = list(dataset[split])
            assert [(row["expression"], row["image_id"], row["category"]) for row in rows] == expected
            assert [row["split"] for row in rows] == [split] * len(expected)
            for row in rows:
                assert row["mask"].mode == "L"
                assert np.array_equal(np.asarray(row["mask"]), self.masks[row["image_id"]])
                assert np.array_equal(np.asarray(row["image"]), self.expected_image(data_dir, row["image_id"]))

    def test_masks_decode_to_0_and_1_with_the_image_size(self, data_dir):
        for _, row in rows_of(self.load(str(data_dir))):
            assert row["mask"].mode == "L"
            assert row["mask"].size == row["image"].size
            assert set(np.unique(np.asarray(row["mask"])).tolist()) <= {0, 1}

    def test_images_decode_as_rgb(self, data_dir):
        # The files written are RGB: a loader keeps them so (it converts no mode; the processor does).
        for _, row in rows_of(self.load(str(data_dir))):
            assert row["image"].mode == "RGB"
            assert np.asarray(row["image"]).shape == (*self.image_size, 3)

    def test_stores_file_paths_and_reads_them_when_a_row_is_read(self, data_dir):
        dataset = self.load(str(data_dir))
        for split, expected in self.rows.items():
            table = dataset[split].data.to_pydict()
            image_files = [self.image_file(data_dir, image_id) for _, image_id, _ in expected]
            assert table["image"] == [{"bytes": None, "path": str(path)} for path in image_files]
            mask_files = [self.mask_file(data_dir, image_id) for _, image_id, _ in expected]
            assert table["mask"] == [
                None if path is None else {"bytes": None, "path": str(path)} for path in mask_files
            ]  # `None` where the mask is made from a stored segmentation (RRSIS-D)
        # Nothing was read at load time: a file removed afterwards fails only when its row is read.
        os.remove(self.image_file(data_dir, self.missing_image_id))
        split, index = next(
            (split, index) for split, rows in self.rows.items()
            for index, (_, image_id, _) in enumerate(rows) if image_id == self.missing_image_id
        )
        with pytest.raises(FileNotFoundError):
            dataset[split][index]

    def test_splits_argument_keeps_only_those_splits(self, data_dir):
        for split, expected in self.rows.items():
            dataset = self.load(str(data_dir), splits=[split])
            assert list(dataset) == [split] and dataset[split].num_rows == len(expected)
        # Every split but the first, asked for in reverse order and as the files spell them (`val`): the splits come
        # in the order train, validation, test.
        later = list(self.rows)[1:]
        asked = ["val" if split == "validation" else split for split in reversed(later)]
        assert list(self.load(str(data_dir), splits=asked)) == later

    def test_unknown_split_is_an_error(self, data_dir):
        with pytest.raises(ValueError, match=self.unknown_split_error):
            self.load(str(data_dir), splits=["dev"])

    @pytest.mark.parametrize("kind", ["image", "mask"])
    def test_missing_file_raises_naming_it(self, data_dir, kind):
        path = self.file_of(kind, data_dir, self.missing_image_id)
        os.remove(path)
        with pytest.raises(MissingDataFileError) as error:
            self.load(str(data_dir))
        assert error.value.path == str(path)
        reference = os.path.join(data_dir, self.missing_file_reference)
        assert str(error.value) == f"{reference}: {kind} file {path} does not exist"

    @pytest.mark.parametrize("kind", ["image", "mask"])
    def test_missing_file_is_skipped_with_skip_invalid(self, data_dir, kind, caplog):
        os.remove(self.file_of(kind, data_dir, self.missing_image_id))
        with caplog.at_level(logging.WARNING, logger="crobim_u.data"):
            dataset = self.load(str(data_dir), skip_invalid=True)
        assert {split: dataset[split].num_rows for split in dataset} == self.rows_kept_without_missing_image
        assert list(dataset) == list(self.rows_kept_without_missing_image)
        for split in dataset:  # the rest are kept, in their order
            kept = [row for row in self.rows[split] if row[1] != self.missing_image_id]
            assert [(row["expression"], row["image_id"], row["category"]) for row in dataset[split]] == kept
        skipped = self.skipped_items_for_missing_image
        assert f"Skipped {skipped} invalid items" in caplog.text
        assert f"{skipped} x missing {kind} file" in caplog.text

    def test_dispatcher_gives_the_loaders_rows(self, data_dir):
        assert self.name in DATASET_NAMES
        direct = records(self.load(str(data_dir)))
        assert records(load_referring_dataset(self.name, str(data_dir))) == direct
        last = list(self.rows)[-1]  # keyword arguments reach the loader
        assert records(load_referring_dataset(self.name, data_dir=str(data_dir), splits=[last])) == {last: direct[last]}


# --- the loaders --------------------------------------------------------------------------------------------------


class TestRefSegRSLoader(LoaderContract):
    load = staticmethod(load_refsegrs)
    name = "refsegrs"
    write = staticmethod(write_refsegrs)
    rows = {
        "train": [("road along the river", "0", ""), ("the  white building", "1", ""), ("road left", "0", "")],
        "validation": [("a car in the top right", "2", "")],  # the val file's trailing blank line is no row
        "test": [("building on the left", "1", "")],
    }
    masks = REFSEGRS_MASKS  # written as 200 (and a faint 30) over 0: foreground is above 50
    image_seeds = {"0": 0, "1": 1, "2": 2}
    missing_image_id = "1"
    missing_file_reference = "output_phrase_train.txt, line 2"
    rows_kept_without_missing_image = {"train": 2, "validation": 1, "test": 0}  # a split's phrase file makes it
    skipped_items_for_missing_image = 2  # one per phrase line
    unknown_split_error = r"Unknown RefSegRS split 'dev'"

    def image_file(self, root, image_id):
        return root / "images" / f"{image_id}.tif"

    def mask_file(self, root, image_id):
        return root / "masks" / f"{image_id}.tif"


RRSISD_MASKS = rrsisd_masks()


class TestRRSISDLoader(LoaderContract):
    load = staticmethod(load_rrsisd)
    name = "rrsisd"
    write = staticmethod(write_rrsisd)
    rows = {  # one row per sentence: the train ref has two
        "train": [("the vehicle on the left", "10", "vehicle"), ("a small car", "10", "vehicle")],
        "validation": [("the storage tank", "11", "storage tank")],
        "test": [("scattered vehicles", "12", "vehicle")],
    }
    masks = {"10": RRSISD_MASKS[1], "11": RRSISD_MASKS[2], "12": RRSISD_MASKS[3]}  # compressed RLE, polygon, RLE
    image_size = (RRSISD_HEIGHT, RRSISD_WIDTH)
    missing_image_id = "10"
    missing_file_reference = "rrsisd/instances.json, images[0].file_name"
    rows_kept_without_missing_image = {"validation": 1, "test": 1}  # a split is there when a ref of it is kept
    skipped_items_for_missing_image = 1  # one per ref: both sentences of the train ref go with it
    unknown_split_error = r"has no rows for split\(s\) \['dev'\]; found \['test', 'train'(, 'validation')?\]"
    opt_outs = {
        f"{test}[mask]": "RRSIS-D has no mask files: masks are COCO segmentations in instances.json (their checks are "
        "in test_data_loaders.py)"
        for test in ("test_missing_file_raises_naming_it", "test_missing_file_is_skipped_with_skip_invalid")
    }

    def image_file(self, root, image_id):
        return root / "images" / "rrsisd" / "JPEGImages" / f"{int(image_id):05d}.jpg"

    def mask_file(self, root, image_id):
        return None

    def expected_image(self, root, image_id):
        # JPEG is lossy: the pixels are the file's as PIL decodes it, not the noise it was written from.
        return np.asarray(PIL.Image.open(self.image_file(root, image_id)))


class TestRISBenchLoader(LoaderContract):
    load = staticmethod(load_risbench)
    name = "risbench"
    image_dir, mask_dir, mask_foreground = "img_rgb", "mask", 255  # the layout of its release
    rows = {  # no output_phrase_val.txt: no validation split
        "train": [("the field at the top left", "a_1", ""), ("a large ship", "b_2", "")],
        "test": [("the ship at the bottom right", "b_2", "")],
    }
    masks = RISBENCH_MASKS
    image_seeds = {"a_1": 0, "b_2": 1}
    missing_image_id = "b_2"
    missing_file_reference = "output_phrase_train.txt, line 2"
    rows_kept_without_missing_image = {"train": 1, "test": 0}  # a split's phrase file makes it
    skipped_items_for_missing_image = 2  # one per phrase line
    unknown_split_error = r"Unknown RISBench split 'dev'"

    def write(self, root):
        write_risbench(root, self.image_dir, self.mask_dir, self.mask_foreground)

    def image_file(self, root, image_id):
        return root / self.image_dir / f"{image_id}.png"

    def mask_file(self, root, image_id):
        return root / self.mask_dir / f"{image_id}.png"


class TestRISBenchOtherLayoutLoader(TestRISBenchLoader):
    # RISBench's other folder names, with 0/1 masks: the "auto" mask rule reads them as it reads 0/255 ones.
    image_dir, mask_dir, mask_foreground = "images", "masks", 1


class TestFolderLoader(LoaderContract):
    load = staticmethod(load_folder)
    name = "folder"
    write = staticmethod(write_folder)  # one metadata.jsonl whose rows name their split
    rows = {
        "train": [("the pond", "x", "water"), ("a road", "y", "road"), ("the pond on the left", "x", "water")],
        "validation": [("a field", "z", "")],
        "test": [("the road at the top", "y", "road")],
    }
    masks = {name: folder_mask(seed) for seed, name in enumerate(FOLDER_IMAGES)}
    image_seeds = {name: seed for seed, name in enumerate(FOLDER_IMAGES)}
    missing_image_id = "y"
    missing_file_reference = "metadata.jsonl, line 2"
    rows_kept_without_missing_image = {"train": 2, "validation": 1}  # a split is there when a row of it is kept
    skipped_items_for_missing_image = 2  # one per metadata line
    unknown_split_error = r"has no rows for split\(s\) \['dev'\]; found \['test', 'train'(, 'validation')?\]"

    def image_file(self, root, image_id):
        return root / f"{image_id}.png"

    def mask_file(self, root, image_id):
        return root / f"{image_id}_mask.png"
