"""Training data processed once (`crobim_u.training.preprocessed`): scenes, frozen text features, collation."""

import numpy as np
import pytest
import torch
from helpers import tiny_model

from crobim_u import CrobimUImageProcessor, CrobimUProcessor
from crobim_u.data.synthetic import load_synthetic
from crobim_u.training.preprocessed import (
    collate_preprocessed_scenes,
    encode_distinct_expressions,
    frozen_text_encoder,
    preprocess_scenes,
)
from crobim_u.training.run import build_synthetic_tokenizer


SIZE = 64


@pytest.fixture(scope="module")
def processor():
    """A 64x64 processor around the synthetic data's word-level tokenizer."""
    return CrobimUProcessor(
        CrobimUImageProcessor(size={"height": SIZE, "width": SIZE}), build_synthetic_tokenizer(), max_length=20
    )


@pytest.fixture
def model(processor):
    """A seeded tiny random model over the processor's vocabulary, in eval mode."""
    return tiny_model(text_config={"vocab_size": len(processor.tokenizer)})


def test_preprocess_stores_a_frozen_text_encoder_s_features_in_place_of_token_ids(model, processor):
    rows = load_synthetic(num_train=6, num_validation=0, num_test=0, image_size=SIZE, seed=0)["train"]
    # Chunks of 4 and 2 rows: their token lengths differ, so the stored features are padded across chunks.
    plain = preprocess_scenes(rows, processor, chunk_size=4, progress=False)
    cached = preprocess_scenes(rows, processor, chunk_size=4, progress=False, frozen_text_encoder=model.text_encoder)
    assert "input_ids" not in cached.columns
    length = plain.columns["input_ids"].shape[-1]
    assert cached.columns["text_hidden_states"].shape == (6, 1, length, model.config.text_config.hidden_size)
    torch.testing.assert_close(cached.columns["attention_mask"], plain.columns["attention_mask"])
    with torch.no_grad():
        expected = model(**collate_preprocessed_scenes([plain[i] for i in range(6)]))
        got = model(**collate_preprocessed_scenes([cached[i] for i in range(6)]))
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_scenes_with_several_expressions_share_one_image_encoding(model, processor):
    rows = load_synthetic(num_train=6, num_validation=0, num_test=0, image_size=SIZE, seed=0, expressions_per_image=2)
    rows = rows["train"]
    scenes = preprocess_scenes(rows, processor, chunk_size=4, progress=False, expressions_per_image=2)
    alone = preprocess_scenes(rows, processor, chunk_size=4, progress=False)  # the same rows, one per item
    assert len(scenes) == 3 and len(alone) == 6
    assert scenes.columns["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert scenes.columns["labels"].shape == (3, 2, SIZE, SIZE)
    grouped = collate_preprocessed_scenes([scenes[i] for i in range(3)])
    assert grouped["image_indices"].tolist() == [0, 0, 1, 1, 2, 2]
    separate = collate_preprocessed_scenes([alone[i] for i in range(6)])
    assert "image_indices" not in separate
    for name in ("labels", "input_ids", "attention_mask"):
        torch.testing.assert_close(grouped[name], separate[name])
    with torch.no_grad():
        expected = model(**separate)
        got = model(**grouped)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_collated_scenes_are_float32_channels_last_images_and_flat_expressions(processor):
    rows = load_synthetic(num_train=4, num_validation=0, num_test=0, image_size=SIZE, seed=0, expressions_per_image=2)
    scenes = preprocess_scenes(rows["train"], processor, progress=False, expressions_per_image=2)
    assert scenes.columns["pixel_values"].dtype == torch.float16 and scenes.columns["labels"].dtype == torch.uint8
    batch = collate_preprocessed_scenes([scenes[1], scenes[0]])
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch["pixel_values"][0], scenes.columns["pixel_values"][1].float())
    assert batch["labels"].shape == (4, SIZE, SIZE)
    torch.testing.assert_close(batch["labels"][:2], scenes.columns["labels"][1])
    assert batch["image_indices"].tolist() == [0, 0, 1, 1]


def test_preprocess_rejects_rows_that_do_not_form_scenes(processor):
    rows = load_synthetic(num_train=4, num_validation=0, num_test=0, image_size=SIZE, seed=0)["train"]
    with pytest.raises(ValueError, match="Row 1 has image_id 'synthetic-medium-0-train-000001'"):
        preprocess_scenes(rows, processor, progress=False, expressions_per_image=2)
    with pytest.raises(ValueError, match="4 rows do not split into scenes of 3"):
        preprocess_scenes(rows, processor, progress=False, expressions_per_image=3)


def test_frozen_text_features_are_computed_once_per_distinct_expression(model, processor):
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
        got = encode_distinct_expressions(encoder, expressions, text, attention_mask, encoded)
        first_two = {key: value[:2] for key, value in text.items()}
        again = encode_distinct_expressions(encoder, expressions[:2], first_two, attention_mask[:2], encoded)
    finally:
        hook.remove()
    assert calls == [3]  # three distinct expressions, then nothing new
    with torch.no_grad():
        expected = encoder(**text, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real])
    assert torch.all(got[~real] == 0)
    torch.testing.assert_close(again, got[:2])


def test_frozen_text_encoder_is_returned_in_eval_mode_only_where_frozen(model):
    model.train()
    assert frozen_text_encoder(model) is None  # trainable: its features change at every step
    model.text_encoder.requires_grad_(False)
    encoder = frozen_text_encoder(model)
    assert encoder is model.text_encoder and not encoder.training


def test_preprocess_keeps_reference_masks_for_the_first_pointer(processor):
    rows = load_synthetic(
        num_train=4, num_validation=0, num_test=0, image_size=SIZE, seed=0, families=("relation",)
    )["train"]
    dataset = preprocess_scenes(rows, processor, progress=False, reference_masks=True)
    references = dataset.columns["reference_labels"][:, 0]
    assert references.shape == (4, SIZE, SIZE) and references.dtype == torch.uint8
    for reference, row in zip(references, rows):
        assert torch.equal(reference, torch.from_numpy(np.array(row["reference_mask"])))
        assert reference.sum() > 0 and not (reference.bool() & torch.from_numpy(np.array(row["mask"]) > 0)).any()
    batch = collate_preprocessed_scenes([dataset[i] for i in range(4)])
    assert batch["reference_labels"].shape == (4, SIZE, SIZE)
