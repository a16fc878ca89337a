import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crobim_u.data import synthetic
from crobim_u.data.synthetic import (
    CLASSES,
    FAMILIES,
    RELATIONS,
    _Describer,
    _Object,
    generate_sample,
    generate_scene,
    load_synthetic,
    synthetic_vocabulary,
)


IMAGES = ("image", "mask", "class_mask")


def digest(sample: dict) -> str:
    """Hash of the pixels of image, mask and class mask."""
    return hashlib.sha256(b"".join(np.asarray(sample[key]).tobytes() for key in IMAGES)).hexdigest()


def arrays(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(sample["mask"]), np.asarray(sample["class_mask"])


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [generate_sample(seed) for seed in range(300)]


@pytest.fixture(scope="module")
def by_difficulty() -> dict[str, list[dict]]:
    return {level: [generate_sample(seed, difficulty=level) for seed in range(60)] for level in ("easy", 1.0)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_synthetic(num_train=8, num_validation=8, num_test=100, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_same_seed_same_bytes_in_another_process():
    here = [digest(generate_sample(seed)) for seed in (3, 11)]
    # The module alone, loaded from its file: importing the package would import torch, for seconds.
    code = (
        "import hashlib, importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('synthetic', {str(Path(synthetic.__file__))!r})\n"
        "module = sys.modules['synthetic'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "for seed in (3, 11):\n"
        "    s = module.generate_sample(seed)\n"
        f"    print(hashlib.sha256(b''.join(np.asarray(s[k]).tobytes() for k in {IMAGES!r})).hexdigest())\n"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert there == here
    assert here[0] != here[1]
    assert digest(generate_sample(np.random.default_rng(3))) == here[0]


def test_load_is_deterministic_and_seeded(tmp_path, dataset):
    kwargs = {"num_train": 3, "num_validation": 0, "num_test": 3}
    first = load_synthetic(**kwargs, cache_dir=str(tmp_path / "a"))
    again = load_synthetic(**kwargs, cache_dir=str(tmp_path / "b"))
    other_seed = load_synthetic(**kwargs, seed=1, cache_dir=str(tmp_path / "c"))
    for split in ("train", "test"):
        rows = [digest(row) for row in first[split]]
        assert rows == [digest(row) for row in again[split]]
        assert set(rows).isdisjoint(digest(row) for row in other_seed[split])
    # A split's rows depend on (seed, split, index) only: the fixture asked for other split sizes.
    assert [digest(row) for row in first["test"]] == [digest(dataset["test"][i]) for i in range(3)]
    assert len(first["validation"]) == 0


def test_a_scene_with_several_expressions_starts_with_the_sample_of_its_stream():
    for seed in range(20):
        scene = generate_scene(seed, 128, "easy", num_expressions=3)
        assert len(scene) == 3
        assert digest(scene[0]) == digest(generate_sample(seed, 128, "easy"))
        assert scene[0]["expression"] == generate_sample(seed, 128, "easy")["expression"]
        assert len({id(sample["image"]) for sample in scene}) == 1
        for sample in scene:
            mask, class_mask = arrays(sample)
            assert mask.any() and np.all(class_mask >= mask)
    # Distinct (target, wording) pairs wherever the scene allows: most of 40 scenes allow three.
    distinct = [
        len({(np.asarray(s["mask"]).tobytes(), s["expression"]) for s in generate_scene(seed, 128, "easy", 3)})
        for seed in range(40)
    ]
    assert sum(count == 3 for count in distinct) >= 30
    with pytest.raises(ValueError, match="num_expressions must be a positive int, got 0"):
        generate_scene(0, num_expressions=0)


def test_load_with_several_expressions_per_image(tmp_path):
    kwargs = {"num_validation": 0, "num_test": 0, "image_size": 96, "difficulty": "easy"}
    scenes = load_synthetic(num_train=5, expressions_per_image=2, cache_dir=str(tmp_path), **kwargs)["train"]
    single = load_synthetic(num_train=3, cache_dir=str(tmp_path), **kwargs)["train"]
    assert len(scenes) == 5  # rows, the last scene giving one
    ids = scenes["image_id"]
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4]
    assert ids[::2] == single["image_id"]
    for row in range(0, 5, 2):  # each scene's first row is the single-expression row of the same index
        assert digest(scenes[row]) == digest(single[row // 2])
        assert scenes[row]["expression"] == single[row // 2]["expression"]
    assert np.array_equal(np.asarray(scenes[0]["image"]), np.asarray(scenes[1]["image"]))
    assert (scenes[0]["expression"], arrays(scenes[0])[0].tobytes()) != (
        scenes[1]["expression"], arrays(scenes[1])[0].tobytes()
    )
    with pytest.raises(ValueError, match="expressions_per_image must be a positive int, got 0"):
        load_synthetic(expressions_per_image=0)


def test_splits_are_disjoint(dataset):
    ids = {split: set(dataset[split]["image_id"]) for split in dataset}
    pixels = {split: {digest(row) for row in dataset[split]} for split in dataset}
    assert len(ids["test"]) == len(pixels["test"]) == 100
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert ids[a].isdisjoint(ids[b])
        assert pixels[a].isdisjoint(pixels[b])
    assert set(dataset["test"]["split"]) == {"test"}


def test_record_types(dataset):
    row = dataset["test"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (256, 256)
    assert row["mask"].mode == row["class_mask"].mode == "L"
    assert row["category"] in CLASSES
    assert isinstance(row["has_distractor"], bool) and isinstance(row["expression"], str)


def test_masks_are_binary_nested_and_non_empty(samples):
    for sample in samples:
        mask, class_mask = arrays(sample)
        assert set(np.unique(mask)) == {0, 1} and set(np.unique(class_mask)) == {0, 1}
        assert not (mask & ~class_mask).any()
        if sample["has_distractor"]:
            assert class_mask.sum() > mask.sum()
        else:
            assert np.array_equal(mask, class_mask)


def test_distractor_share(samples, by_difficulty):
    assert np.mean([s["has_distractor"] for s in samples]) >= 0.6
    for level in by_difficulty.values():
        assert np.mean([s["has_distractor"] for s in level]) >= 0.6


def test_classes_and_sizes(samples):
    sizes: dict[str, list[float]] = {}
    for sample in samples:
        sizes.setdefault(sample["category"], []).append(float(np.sqrt(arrays(sample)[0].sum())))
    assert len(sizes) >= 8
    medians = [np.median(values) for values in sizes.values()]
    assert max(medians) / min(medians) >= 8


def test_vocabulary_covers_every_expression(samples):
    vocabulary = set(synthetic_vocabulary())
    assert all(word.islower() and word.isalpha() for word in vocabulary)
    words = {word for sample in samples for word in sample["expression"].split()}
    assert words <= vocabulary
    # Attributes, extremes, regions and relations all occur.
    assert {"red", "leftmost", "left", "of", "closest"} <= words


def test_class_only_reference_is_clearly_imperfect(dataset):
    test = dataset["test"]
    inter, union = [], []
    for row in test:
        mask, class_mask = arrays(row)
        inter.append(int((mask & class_mask).sum()))
        union.append(int((mask | class_mask).sum()))
    inter, union, distractor = np.array(inter), np.array(union), np.array(test["has_distractor"])
    assert distractor.mean() >= 0.6
    assert inter[distractor].sum() / union[distractor].sum() < 0.6  # oIoU
    assert (inter[distractor] / union[distractor]).mean() < 0.6  # mIoU
    assert (inter[~distractor] == union[~distractor]).all()


def test_difficulty_knob(by_difficulty):
    easy, hard = by_difficulty["easy"], by_difficulty[1.0]  # a float level is accepted
    # Hard draws smaller objects and prefers small targets.
    assert np.median([arrays(s)[0].sum() for s in hard]) < 0.5 * np.median([arrays(s)[0].sum() for s in easy])
    with pytest.raises(ValueError):
        generate_sample(0, difficulty="extreme")
    with pytest.raises(ValueError):
        generate_sample(0, difficulty=1.5)
    with pytest.raises(ValueError):
        load_synthetic(image_size=16)


def make_object(label: int, category: str, adjective: str, x: float, y: float, w: float, h: float) -> _Object:
    obj = _Object(label, category, adjective, (x, y, x + w, y + h), area=int(w * h), cx=x + w / 2, cy=y + h / 2)
    ys, xs = np.mgrid[int(y) : int(y + h), int(x) : int(x + w)]
    obj.pixels = (ys * 256 + xs).ravel()
    return obj


def expressions_of(target: _Object, objects: list[_Object]) -> set[str]:
    """Every expression the generator may emit for `target`, synonyms folded."""
    options = _Describer(objects, 256, np.random.default_rng(0)).options(target)
    expressions = {" ".join(words) for family in options.values() for words in family}
    return {e.replace("to the left of", "left of").replace("nearest to", "closest to") for e in expressions}


def test_expressions_identify_one_object():
    left = make_object(1, "car", "red", 20, 100, 8, 4)
    right = make_object(2, "car", "red", 200, 104, 8, 4)
    building = make_object(3, "building", "grey", 40, 90, 40, 30)
    expressions = expressions_of(left, [left, right, building])
    assert {
        "the leftmost car",
        "the car on the left",
        "the car left of the building",
        "the car closest to the building",
    } <= expressions
    assert not expressions & {"the car", "the red car", "the rightmost car", "the largest car", "the small car"}
    # Two cars side by side, both left of the building: neither extremes nor that relation are unique.
    near = make_object(2, "car", "red", 24, 112, 8, 4)
    expressions = expressions_of(left, [left, near, building])
    assert not expressions & {"the leftmost car", "the car left of the building", "the car on the left"}
    assert not any(e.startswith(("the large", "the big", "the small")) for e in expressions)  # equal sizes


def test_records_name_their_template_family_and_relational_references(samples):
    for sample in samples:
        assert sample["family"] in FAMILIES
        mask, reference = np.asarray(sample["mask"]), np.asarray(sample["reference_mask"])
        assert reference.shape == mask.shape and set(np.unique(reference)) <= {0, 1}
        if sample["family"] == "relation":
            assert reference.any() and not (reference & mask).any()  # the named object is another object
        else:
            assert not reference.any()
    counts = {family: sum(sample["family"] == family for sample in samples) for family in FAMILIES}
    assert all(counts.values()), counts  # medium scenes draw every family


def test_families_keep_only_the_chosen_template_families(tmp_path):
    splits = load_synthetic(
        num_train=12, num_validation=0, num_test=12, image_size=128, difficulty="easy", seed=2,
        cache_dir=str(tmp_path), families=("relation", "size"), expressions_per_image=2,
    )
    for split in ("train", "test"):
        assert set(splits[split]["family"]) <= {"relation", "size"}
        assert "relation" in splits[split]["family"]
    for expression, family in zip(splits["test"]["expression"], splits["test"]["family"]):
        words = expression.split()
        if family == "size":
            assert {"largest", "biggest", "smallest", "large", "big", "small"} & set(words), expression
        else:
            assert any(phrase in expression for phrases in RELATIONS.values() for phrase in phrases), expression
    # Without a filter the streams are unchanged: the same scenes as before families existed.
    scene = generate_scene(5, 128, "easy")[0]
    assert scene["expression"] == generate_sample(5, 128, "easy")["expression"]
    with pytest.raises(ValueError, match="families must be a non-empty selection of"):
        load_synthetic(num_train=2, families=("relations",))
