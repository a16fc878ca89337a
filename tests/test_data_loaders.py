"""
What each file-based data set loader has of its own, on small data sets written in each official layout: malformed
entries, segmentation decoding, the pickle check, the metadata layouts, export round trips. What every loader shares
(splits, canonical columns, rows, masks, missing files, the dispatcher) is in `test_loader_contract.py`.
"""

import json
import logging
import os
import pickle
import sys
import types

import numpy as np
import PIL.Image
import pytest
from helpers import (
    HEIGHT,
    REFSEGRS_MASKS,
    RRSISD_HEIGHT,
    RRSISD_WIDTH,
    WIDTH,
    box_mask,
    compressed_rle,
    random_rgb,
    rrsisd_instances,
    rrsisd_masks,
    rrsisd_refs,
    sentence,
    uncompressed_rle,
    write_folder_images,
    write_jsonl,
    write_refsegrs,
    write_rrsisd,
)

from crobim_u.data import (
    DATASET_NAMES,
    DatasetFormatError,
    MissingDataFileError,
    decode_referring_batch,
    export_folder,
    load_folder,
    load_pickle_safely,
    load_referring_dataset,
    load_refsegrs,
    load_rrsisd,
)


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image)


def assert_canonical_mask(mask: PIL.Image.Image, expected: np.ndarray) -> None:
    assert mask.mode == "L"
    assert np.array_equal(np.asarray(mask), expected)


# --- RefSegRS ---------------------------------------------------------------------------------------------------
# The small data set: `helpers.write_refsegrs` (masks `REFSEGRS_MASKS`).


def test_refsegrs_splits_are_its_phrase_files(tmp_path):
    write_refsegrs(tmp_path)
    os.remove(tmp_path / "output_phrase_test.txt")
    assert list(load_refsegrs(str(tmp_path))) == ["train", "validation"]
    with pytest.raises(FileNotFoundError, match="output_phrase_test.txt"):
        load_refsegrs(str(tmp_path), splits=["test"])


def test_refsegrs_invalid_lines_raise_or_are_skipped(tmp_path, caplog):
    write_refsegrs(tmp_path)
    phrase_file = tmp_path / "output_phrase_train.txt"
    phrase_file.write_text("0 road along the river\n7 a missing image\n1\n1 the white building\n")

    with pytest.raises(MissingDataFileError) as missing:
        load_refsegrs(str(tmp_path))
    assert f"{phrase_file}, line 2: image file {tmp_path / 'images' / '7.tif'} does not exist" == str(missing.value)

    os.remove(tmp_path / "masks" / "2.tif")
    with caplog.at_level(logging.WARNING, logger="crobim_u.data"):
        dataset = load_refsegrs(str(tmp_path), skip_invalid=True)
    assert [row["expression"] for row in dataset["train"]] == ["road along the river", "the white building"]
    assert dataset["validation"].num_rows == 0
    assert "Skipped 3 invalid items" in caplog.text
    assert "1 x missing image file" in caplog.text and "1 x missing mask file" in caplog.text
    assert "1 x expected '<id> <expression>'" in caplog.text

    phrase_file.write_text("0 road along the river\n1\n")
    expected = r"output_phrase_train.txt, line 2: expected '<id> <expression>', got '1'"
    with pytest.raises(DatasetFormatError, match=expected):
        load_refsegrs(str(tmp_path), splits=["train"])


def test_mask_size_must_match_image(tmp_path):
    write_refsegrs(tmp_path)
    PIL.Image.fromarray(np.zeros((HEIGHT, WIDTH + 1), dtype=np.uint8)).save(tmp_path / "masks" / "1.tif")
    dataset = load_refsegrs(str(tmp_path), splits=["test"])
    with pytest.raises(DatasetFormatError, match=r"1.tif, mask size: expected the size of .*1.tif, 12x10, got 13x10"):
        dataset["test"][0]


# --- RRSIS-D ----------------------------------------------------------------------------------------------------
# The small data set: `helpers.write_rrsisd` (refs `rrsisd_refs`, annotations `rrsisd_instances`, masks `rrsisd_masks`).


def test_rrsisd_stores_segmentations_not_masks(tmp_path):
    write_rrsisd(tmp_path)
    table = load_rrsisd(str(tmp_path), splits=["val"])["validation"].data.to_pydict()
    assert table["mask"] == [None]
    stored = json.loads(table["mask_segmentation"][0])
    assert stored["segmentation"] == [[2, 1, 6, 1, 6, 4, 2, 4]]
    assert (stored["height"], stored["width"]) == (RRSISD_HEIGHT, RRSISD_WIDTH)


def test_rrsisd_multi_part_segmentations_are_unions(tmp_path):
    instances = rrsisd_instances()
    left = box_mask(0, 0, 5, 4, RRSISD_HEIGHT, RRSISD_WIDTH)
    overlapping = box_mask(3, 2, 8, 7, RRSISD_HEIGHT, RRSISD_WIDTH)
    instances["annotations"][0]["segmentation"] = [compressed_rle(left), uncompressed_rle(overlapping)]
    instances["annotations"][1]["segmentation"] = [[2, 1, 6, 1, 6, 4, 2, 4], [0, 5, 2, 5, 2, 8, 0, 8]]
    write_rrsisd(tmp_path, instances=instances)
    dataset = load_rrsisd(str(tmp_path))
    assert_canonical_mask(dataset["train"][0]["mask"], left | overlapping)
    two_polygons = rrsisd_masks()[2] | box_mask(5, 0, 8, 2, RRSISD_HEIGHT, RRSISD_WIDTH)
    assert_canonical_mask(dataset["validation"][0]["mask"], two_polygons)


def test_rrsisd_random_compressed_rles_decode_exactly(tmp_path):
    # Load-time RLE checking parses COCO's compressed strings itself: it must accept every valid one.
    rng = np.random.default_rng(0)
    height, width = 23, 31
    masks = [(rng.random((height, width)) < density).astype(np.uint8) for density in (0.0, 0.02, 0.5, 0.98, 1.0)]
    instances = {
        "images": [{"id": 10, "file_name": "00010.jpg", "height": height, "width": width}],
        "annotations": [
            {"id": i, "image_id": 10, "category_id": 5, "segmentation": compressed_rle(mask)}
            for i, mask in enumerate(masks)
        ],
        "categories": [{"id": 5, "name": "vehicle"}],
    }
    refs = [
        {"ref_id": i, "ann_id": i, "image_id": 10, "category_id": 5, "split": "train",
         "sentences": [sentence(i, f"object {i}")]}
        for i in range(len(masks))
    ]
    write_rrsisd(tmp_path, refs, instances)
    PIL.Image.fromarray(random_rgb(0, height, width)).save(tmp_path / "images" / "rrsisd" / "JPEGImages" / "00010.jpg")
    train = load_rrsisd(str(tmp_path))["train"]
    for i, mask in enumerate(masks):
        assert_canonical_mask(train[i]["mask"], mask)


def test_rrsisd_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class RunsCommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_rrsisd(tmp_path, refs=[RunsCommand()])
    expected = r"refs\(unc\)\.p: refusing to load the global (posix|os)\.system"
    with pytest.raises(pickle.UnpicklingError, match=expected):
        load_rrsisd(str(tmp_path))
    assert not marker.exists()
    # The same file is harmful when unpickled normally: the test would prove nothing otherwise.
    with open(tmp_path / "rrsisd" / "refs(unc).p", "rb") as file:
        pickle.load(file)
    assert marker.exists()


def test_safe_pickle_loads_builtin_structures(tmp_path):
    refs = rrsisd_refs() + [{"tuple": (1, 2.5), "big": 2**80, "none": None, "flag": True, "text": "öl"}]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert load_pickle_safely(path) == refs


def case(break_data, error, message, skipped, kept, id):
    return pytest.param(break_data, error, message, skipped, kept, id=id)


@pytest.mark.parametrize(
    ("break_data", "error", "message", "skipped", "kept"),
    [
        case(
            lambda refs, instances: refs[1].update(ann_id=99),
            DatasetFormatError,
            r"refs\(unc\)\.p, refs\[1\]\.ann_id: expected an id defined once in .*instances\.json annotations, "
            r"got unknown id 99",
            1, 3, "unknown-ann",
        ),
        case(
            lambda refs, instances: refs[0].update(image_id=11),
            DatasetFormatError,
            r"refs\[0\]\.image_id: expected image 10 \(the image of annotation 1\), got 11",
            1, 2, "image-mismatch",
        ),
        case(
            lambda refs, instances: refs[2].pop("sentences"),
            DatasetFormatError,
            r"refs\[2\]\.sentences: expected a field 'sentences', got no such field",
            1, 3, "missing-field",
        ),
        case(
            lambda refs, instances: refs[0]["sentences"][1].update(sent=""),
            DatasetFormatError,
            r"refs\[0\]\.sentences\[1\]\.sent: expected a non-empty string, got ''",
            1, 3, "empty-sentence",
        ),
        case(
            lambda refs, instances: refs.append(dict(refs[0])),
            DatasetFormatError,
            r"refs\[3\]\.ref_id: expected unique ref ids, got 0 again \(first at refs\[0\]\)",
            1, 4, "duplicate-ref",
        ),
        case(  # both copies of a duplicated id are dropped, and so is the ref that uses it
            lambda refs, instances: instances["annotations"].append(dict(instances["annotations"][1])),
            DatasetFormatError,
            r"instances\.json, annotations\[3\]\.id: expected unique annotations ids, got 2 again "
            r"\(first at annotations\[1\]\)",
            2, 3, "duplicate-ann",
        ),
        case(
            lambda refs, instances: instances["annotations"][2]["segmentation"]["counts"].append(1),
            DatasetFormatError,
            r"instances\.json, annotations\[2\]\.segmentation: expected RLE run lengths adding up to 8 x 9 = 72, "
            r"got a sum of 73",
            1, 3, "uncompressed-rle-sum",
        ),
        case(
            lambda refs, instances: instances["annotations"][0]["segmentation"].update(counts="0"),
            DatasetFormatError,
            r"annotations\[0\]\.segmentation: expected RLE run lengths adding up to 8 x 9 = 72, got a sum of 0",
            1, 2, "compressed-rle-sum",
        ),
        case(
            lambda refs, instances: instances["annotations"][0]["segmentation"].update(size=[9, 8]),
            DatasetFormatError,
            r"annotations\[0\]\.segmentation: expected an RLE of the image's size \[8, 9\], got \[9, 8\]",
            1, 2, "rle-size",
        ),
        case(
            lambda refs, instances: instances["annotations"][1].update(segmentation=[[2, 1, 6, 1]]),
            DatasetFormatError,
            r"annotations\[1\]\.segmentation: expected polygons of at least 3 \(x, y\) points, got \[2, 1, 6, 1\]",
            1, 3, "short-polygon",
        ),
        case(
            lambda refs, instances: instances["images"][2].update(file_name="missing.jpg"),
            MissingDataFileError,
            r"instances\.json, images\[2\]\.file_name: image file .*missing\.jpg does not exist",
            1, 3, "missing-image",
        ),
        case(  # the malformed image entry is dropped, and so is the ref that uses it
            lambda refs, instances: instances["images"][0].pop("height"),
            DatasetFormatError,
            r"instances\.json, images\[0\]\.height: expected a field 'height', got no such field",
            2, 2, "image-field",
        ),
    ],
)
def test_rrsisd_invalid_entries_raise_or_are_skipped(tmp_path, caplog, break_data, error, message, skipped, kept):
    refs, instances = rrsisd_refs(), rrsisd_instances()
    break_data(refs, instances)
    write_rrsisd(tmp_path, refs, instances)
    with pytest.raises(error, match=message):
        load_rrsisd(str(tmp_path))

    with caplog.at_level(logging.WARNING, logger="crobim_u.data"):
        dataset = load_rrsisd(str(tmp_path), skip_invalid=True)
    assert f"Skipped {skipped} invalid items" in caplog.text
    assert sum(dataset[split].num_rows for split in dataset) == kept
    masks = rrsisd_masks()
    for split in dataset:
        for row in dataset[split]:  # the rows kept are intact
            assert row["expression"]
            assert_canonical_mask(row["mask"], masks[{"10": 1, "11": 2, "12": 3}[row["image_id"]]])


def test_rrsisd_malformed_instances_json(tmp_path):
    write_rrsisd(tmp_path)
    (tmp_path / "rrsisd" / "instances.json").write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(DatasetFormatError, match=r"instances\.json, line 2 column 18: expected valid JSON"):
        load_rrsisd(str(tmp_path), skip_invalid=True)
    (tmp_path / "rrsisd" / "instances.json").write_text('{"images": [], "annotations": {}, "categories": []}')
    expected = r"instances\.json, annotations: expected a list of annotations, got \{\}"
    with pytest.raises(DatasetFormatError, match=expected):
        load_rrsisd(str(tmp_path), skip_invalid=True)


# --- Folder (metadata.jsonl) ------------------------------------------------------------------------------------


def test_folder_single_metadata_with_split_field(tmp_path):
    write_folder_images(tmp_path, ["x", "y"])
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "x.png", "mask_file_name": "x_mask.png", "expression": "the pond", "category": "water"},
        {"file_name": "y.png", "mask_file_name": "y_mask.png", "expression": "a road", "split": "val",
         "image_id": "scene-7"},
    ])
    dataset = load_folder(str(tmp_path))
    assert list(dataset) == ["train", "validation"]
    x, y = dataset["train"][0], dataset["validation"][0]
    assert (x["expression"], x["image_id"], x["category"], x["split"]) == ("the pond", "x", "water", "train")
    assert (y["expression"], y["image_id"], y["category"], y["split"]) == ("a road", "scene-7", "", "validation")
    assert_canonical_mask(y["mask"], box_mask(1, 1, 4, 5))
    assert list(load_folder(str(tmp_path), splits=["val"])) == ["validation"]
    with pytest.raises(ValueError, match=r"has no rows for split\(s\) \['test'\]; found \['train', 'validation'\]"):
        load_folder(str(tmp_path), splits=["train", "test"])


def test_folder_per_split_layout_and_errors(tmp_path, caplog):
    write_folder_images(tmp_path / "train", ["x"])
    write_folder_images(tmp_path / "test", ["y"])
    write_jsonl(tmp_path / "train" / "metadata.jsonl", [
        {"file_name": "x.png", "mask_file_name": "x_mask.png", "expression": "the pond"},
        '{"file_name": "x.png", "mask_file_name": ',
        {"file_name": "x.png", "mask_file_name": "x_mask.png", "expression": " "},
        {"file_name": "x.png", "mask_file_name": "x_mask.png", "expression": "a pond", "split": "test"},
        {"file_name": "gone.png", "mask_file_name": "x_mask.png", "expression": "a pond"},
    ])
    write_jsonl(tmp_path / "test" / "metadata.jsonl", [
        {"file_name": "y.png", "mask_file_name": "y_mask.png", "expression": "the road"},
    ])
    metadata = tmp_path / "train" / "metadata.jsonl"
    with pytest.raises(DatasetFormatError, match=rf"{metadata}, line 2: expected a JSON object, got Expecting value"):
        load_folder(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="crobim_u.data"):
        dataset = load_folder(str(tmp_path), skip_invalid=True)
    assert list(dataset) == ["train", "test"]
    assert [row["expression"] for row in dataset["train"]] == ["the pond"]
    assert dataset["test"][0]["expression"] == "the road"
    assert "Skipped 4 invalid items" in caplog.text
    assert "line 3, field 'expression': expected a non-empty string, got ' '" in caplog.text
    assert "line 4, field 'split': expected 'train' (the split of its folder), got 'test'" in caplog.text
    assert "1 x missing image file" in caplog.text

    write_jsonl(tmp_path / "metadata.jsonl", [])
    with pytest.raises(DatasetFormatError, match="expected either metadata.jsonl or <split>/metadata.jsonl"):
        load_folder(str(tmp_path))


def test_export_then_load_folder_round_trip(tmp_path):
    write_refsegrs(tmp_path / "refsegrs")
    write_rrsisd(tmp_path / "rrsisd")
    sources = {"refsegrs": load_refsegrs(str(tmp_path / "refsegrs")), "rrsisd": load_rrsisd(str(tmp_path / "rrsisd"))}
    for name, source in sources.items():
        export_root = tmp_path / f"{name}-export"
        export_folder(source, str(export_root))
        reloaded = load_folder(str(export_root))
        assert sorted(reloaded) == sorted(source)
        for split in source:
            assert reloaded[split].num_rows == source[split].num_rows
            for original, copy in zip(source[split], reloaded[split]):
                for key in ("expression", "image_id", "split", "category"):
                    assert copy[key] == original[key]
                assert np.array_equal(pixels(copy["image"]), pixels(original["image"]))
                assert_canonical_mask(copy["mask"], pixels(original["mask"]))
        # Rows that share an image share its file; masks are files of 0/1.
        image_ids = set(source["train"].with_format(None)["image_id"])
        assert len(os.listdir(export_root / "train" / "images")) == len(image_ids)
        mask_file = export_root / "train" / "masks" / sorted(os.listdir(export_root / "train" / "masks"))[0]
        assert set(np.unique(pixels(PIL.Image.open(mask_file)))) <= {0, 1}
    with pytest.raises(FileExistsError, match="is not empty"):
        export_folder(sources["refsegrs"], str(tmp_path / "refsegrs-export"))


def test_exported_folder_loads_with_datasets_imagefolder(tmp_path):
    import datasets

    write_refsegrs(tmp_path / "refsegrs")
    export_folder(load_refsegrs(str(tmp_path / "refsegrs")), str(tmp_path / "export"))
    export_root, cache = str(tmp_path / "export"), str(tmp_path / "cache")
    hub_style = datasets.load_dataset("imagefolder", data_dir=export_root, cache_dir=cache)
    assert sorted(hub_style) == ["test", "train", "validation"]
    row = hub_style["validation"][0]
    assert row["expression"] == "a car in the top right"
    assert np.array_equal(pixels(row["mask"]), REFSEGRS_MASKS["2"])


def test_own_transform_composes_with_mask_decoding(tmp_path):
    write_refsegrs(tmp_path)
    dataset = load_refsegrs(str(tmp_path), splits=["test"])["test"]
    dataset.set_transform(lambda batch: {"labels": [np.asarray(m) for m in decode_referring_batch(batch)["mask"]]})
    assert np.array_equal(dataset[0]["labels"], REFSEGRS_MASKS["1"])


# --- Dispatcher -------------------------------------------------------------------------------------------------


def test_dispatcher_rejects_bad_arguments():
    expected = "Unknown data set 'refcoco'; valid names: refsegrs, rrsisd, risbench, folder, synthetic"
    with pytest.raises(ValueError, match=expected):
        load_referring_dataset("refcoco", "/data")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_referring_dataset("rrsisd")
    with pytest.raises(ValueError, match="takes no data_dir"):
        load_referring_dataset("synthetic", "/data")
    assert DATASET_NAMES == ("refsegrs", "rrsisd", "risbench", "folder", "synthetic")


def test_dispatcher_forwards_to_synthetic(monkeypatch):
    calls = []
    fake = types.ModuleType("crobim_u.data.synthetic")
    fake.load_synthetic = lambda **kwargs: calls.append(kwargs) or "generated"
    monkeypatch.setitem(sys.modules, "crobim_u.data.synthetic", fake)
    assert load_referring_dataset("synthetic", num_samples=8, seed=3) == "generated"
    assert calls == [{"num_samples": 8, "seed": 3}]
