import math
import itertools
import json
import os
import textwrap

import pytest
import torch
from helpers import (
    TINY_VOCAB_SIZE,
    assert_close_across_processes,
    run_without_crobim_u,
    tiny_config,
    tiny_inputs,
    tiny_model,
)
from transformers import AutoModel, BertConfig, BertModel, ConvNextConfig, ConvNextModel, SwinConfig, SwinModel

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation
from crobim_u import modeling_crobim_u as modeling
from crobim_u.modeling_crobim_u import dice_loss, error_consistency_target, sine_position_encoding


SWITCHES = list(itertools.product([False, True], repeat=3))


def valid_switches():
    # UGF and UDLR read the RUS map, so they need RUS; the other combinations are config errors (tested there).
    return [(rus, ugf, udlr) for rus, ugf, udlr in SWITCHES if rus or not (ugf or udlr)]


@pytest.mark.parametrize("use_rus, use_ugf, use_udlr", SWITCHES)
def test_every_switch_combination_runs_forward_and_backward(use_rus, use_ugf, use_udlr, inputs):
    if (use_ugf or use_udlr) and not use_rus:
        with pytest.raises(ValueError, match="needs use_rus=True"):
            tiny_config(use_rus=use_rus, use_ugf=use_ugf, use_udlr=use_udlr)
        return
    model = tiny_model(use_rus=use_rus, use_ugf=use_ugf, use_udlr=use_udlr).train()
    outputs = model(**inputs)
    assert outputs.logits.shape == (2, 1, 64, 64)
    assert outputs.coarse_logits.shape == (2, 1, 16, 16)
    if use_rus:
        assert outputs.uncertainty_logits.shape == (2, 1, 2, 2)
        assert outputs.uncertainty_target.shape == (2, 1, 2, 2)
        assert outputs.uncertainty_loss.ndim == 0
    else:
        assert outputs.uncertainty_logits is None and outputs.uncertainty_loss is None
    assert (outputs.coarse_loss is not None) == use_udlr
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    for module in ("capm", "lgfa", "mid", "text_encoder", "visual_proj"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(module)), module
    if use_rus:
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("rus."))


@pytest.mark.parametrize("mask_stride", [4, 2, 1])
def test_mask_stride_sets_the_resolution_of_the_mask_head(mask_stride, inputs):
    model = tiny_model(mask_stride=mask_stride).train()
    outputs = model(**inputs)
    side = 64 // mask_stride
    assert outputs.coarse_logits.shape == (2, 1, side, side)
    assert outputs.logits.shape == (2, 1, 64, 64)
    has_stem = any(name.startswith("detail_stem.") for name, _ in model.named_parameters())
    assert has_stem == (mask_stride < 4)
    outputs.loss.backward()
    if has_stem:
        assert model.detail_stem[0][0].weight.grad.abs().sum() > 0


def test_several_expressions_share_the_detail_stem_of_their_image():
    model = tiny_model(mask_stride=2)
    batch = tiny_inputs(batch_size=3)
    with torch.no_grad():
        separate = model(pixel_values=batch["pixel_values"][[0, 0, 1]], input_ids=batch["input_ids"])
        shared = model(
            pixel_values=batch["pixel_values"][:2], input_ids=batch["input_ids"], image_indices=torch.tensor([0, 0, 1])
        )
    torch.testing.assert_close(shared.logits, separate.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("indices", [[2, 0, 0, 1, 2], [0, 0, 0, 0, 0]], ids=["three images", "one image"])
def test_selecting_images_gives_indexing_s_values_and_gradient_in_the_images_layout(layout, indices):
    from crobim_u.modeling_crobim_u import select_images

    indices = torch.tensor(indices)
    images = torch.randn(int(indices.max()) + 1, 4, 5, 6).contiguous(memory_format=layout).requires_grad_()
    upstream = torch.randn(5, 4, 5, 6)
    selected = select_images(images, indices)
    assert torch.equal(selected, images[indices])
    (selected * upstream).sum().backward()
    expected = torch.zeros(images.shape).index_add_(0, indices, upstream)
    torch.testing.assert_close(images.grad, expected)
    assert images.grad.is_contiguous(memory_format=layout)
    assert select_images(images, None) is images


def test_one_image_is_shared_by_its_expressions_without_a_copy():
    from crobim_u.modeling_crobim_u import select_images

    image = torch.randn(1, 4, 5, 6)
    selected = select_images(image, torch.zeros(3, dtype=torch.long))
    assert selected.shape == (3, 4, 5, 6) and selected.stride(0) == 0
    assert selected.data_ptr() == image.data_ptr()
    with pytest.raises(RuntimeError):  # a consumer writing into the shared image fails instead of corrupting it
        selected.add_(1.0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_udlr_refines_the_concatenated_maps_in_the_pixel_embedding_s_layout(layout):
    config = tiny_config()
    udlr = modeling.CrobimULocalRefiner(config).eval()
    torch.nn.init.normal_(udlr.residual.weight)  # zero at initialisation: UDLR starts as the identity
    pixel_embedding = torch.randn(2, config.mask_head_dim, 16, 16).contiguous(memory_format=layout)
    coarse_logits, uncertainty = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 4, 4)
    refiner_inputs = []
    hook = udlr.refiner.register_forward_pre_hook(lambda module, args: refiner_inputs.append(args[0]))
    with torch.no_grad():
        refined = udlr(pixel_embedding, coarse_logits, uncertainty)
    hook.remove()
    upsampled = torch.nn.functional.interpolate(uncertainty, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(refiner_inputs[0], torch.cat([pixel_embedding, coarse_logits, upsampled], dim=1))
    assert refiner_inputs[0].is_contiguous(memory_format=layout)
    assert refined.shape == coarse_logits.shape and not torch.equal(refined, coarse_logits)


def test_all_off_model_is_the_crobim_base_without_uncertainty_parameters():
    base = tiny_model(use_rus=False, use_ugf=False, use_udlr=False)
    names = [name for name, _ in base.named_parameters()]
    assert not [n for n in names if n.startswith(("rus.", "ugf.", "udlr."))]
    full = tiny_model()
    extra = {n for n, _ in full.named_parameters()} - set(names)
    assert extra and all(n.startswith(("rus.", "ugf.", "udlr.")) for n in extra)


def test_ugf_is_built_only_at_the_configured_strides():
    model = tiny_model(ugf_levels=[16, 32])
    assert sorted(int(stride) for stride in model.ugf.keys()) == [16, 32]


def test_detached_uncertainty_reaches_rus_only_through_its_own_loss(inputs):
    model = tiny_model(detach_uncertainty=True).train()
    outputs = model(**inputs)
    (outputs.segmentation_loss + outputs.coarse_loss).backward()
    rus_grads = [p.grad for n, p in model.named_parameters() if n.startswith("rus.")]
    assert all(g is None or g.abs().sum() == 0 for g in rus_grads)
    # The other losses do train the rest of the model.
    assert model.udlr.residual.weight.grad.abs().sum() > 0

    model.zero_grad()
    model(**inputs).uncertainty_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("rus.scorer"))


def test_attached_uncertainty_lets_the_segmentation_loss_train_rus(inputs):
    model = tiny_model(detach_uncertainty=False).train()
    model(**inputs).segmentation_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("rus."))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_model().train()
    batch = tiny_inputs(batch_size=2, size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_loss_terms_add_up_with_their_weights(inputs):
    model = tiny_model(coarse_loss_weight=0.3, uncertainty_loss_weight=2.0, uncertainty_warmup_steps=10)
    outputs = model(**inputs, global_step=4)
    expected = outputs.segmentation_loss + 0.3 * outputs.coarse_loss + 2.0 * 0.5 * outputs.uncertainty_loss
    torch.testing.assert_close(outputs.loss, expected)
    assert model.uncertainty_warmup(None) == 1.0
    assert model.uncertainty_warmup(0) == pytest.approx(0.1)
    assert model.uncertainty_warmup(500) == 1.0


def test_position_encoding_gives_one_place_one_code_at_every_grid_size():
    def code(height: int, width: int, row: int, column: int) -> torch.Tensor:
        return sine_position_encoding(height, width, 64, torch.device("cpu"), torch.float32)[row * width + column]

    # The centre of cell (0, 1) of a 2x2 grid is at (1/4, 3/4) of the sides, as is cell (1, 4) of a 6x6 grid:
    # the same place at stride 3x finer, or in an image 3x larger.
    assert torch.allclose(code(2, 2, 0, 1), code(6, 6, 1, 4), atol=1e-5)
    # Rows change only the y half and columns only the x half.
    place, other_row, other_column = code(6, 6, 1, 4), code(6, 6, 3, 4), code(6, 6, 1, 0)
    assert torch.equal(place[32:], other_row[32:]) and not torch.equal(place[:32], other_row[:32])
    assert torch.equal(place[:32], other_column[:32]) and not torch.equal(place[32:], other_column[32:])
    # Every place of a fine grid has its own code.
    grid = sine_position_encoding(20, 20, 64, torch.device("cpu"), torch.float32)
    assert torch.cdist(grid, grid).add(torch.eye(400) * 10).min() > 0.1
    # Odd widths are zero-padded.
    assert sine_position_encoding(3, 5, 10, torch.device("cpu"), torch.float32).shape == (15, 10)


def test_error_consistency_target_by_hand():
    logits = torch.full((1, 1, 4, 4), -10.0)
    logits[..., :2, :2] = 10.0  # predicted foreground: the top-left quarter
    targets = torch.zeros(1, 1, 4, 4)
    targets[..., :2, :] = 1.0  # true foreground: the top half
    soft_avg = error_consistency_target(logits, targets, (2, 2), "soft", "avg")
    torch.testing.assert_close(soft_avg, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]), atol=1e-4, rtol=0)
    hard_max = error_consistency_target(logits, targets, (1, 1), "hard", "max")
    assert hard_max.item() == 1.0
    hard_avg = error_consistency_target(logits, targets, (1, 1), "hard", "avg")
    assert hard_avg.item() == pytest.approx(4 / 16)
    assert not error_consistency_target(logits.requires_grad_(), targets, (2, 2), "soft", "avg").requires_grad


def test_dice_loss_is_zero_for_a_perfect_prediction_and_high_for_the_opposite():
    targets = torch.zeros(1, 1, 8, 8)
    targets[..., 2:6, 2:6] = 1
    assert dice_loss(targets * 40 - 20, targets).item() < 1e-3
    assert dice_loss(20 - targets * 40, targets).item() > 0.9


def test_save_and_reload_gives_identical_logits_from_safetensors_only(model, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert {"configuration_crobim_u.py", "modeling_crobim_u.py"} <= set(files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_crobim_u.CrobimUForReferringSegmentation"
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CrobimUForReferringSegmentation)
    inputs.pop("labels")
    with torch.no_grad():
        expected, got = model(**inputs), reloaded(**inputs)
    assert torch.equal(expected.logits, got.logits)
    assert torch.equal(expected.uncertainty_logits, got.uncertainty_logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


# Runs in a fresh interpreter in which `import crobim_u` fails, so only the code shipped in the folder can load it.
REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc

    class BlockCrobimU(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "crobim_u" or name.startswith("crobim_u."):
                raise ImportError("crobim_u is blocked in this process")

    sys.meta_path.insert(0, BlockCrobimU())
    import torch
    from transformers import AutoModel
    try:
        import crobim_u
        raise SystemExit("crobim_u should not be importable here")
    except ImportError:
        pass
    folder, inputs_file, output_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(inputs_file, weights_only=True)
    with torch.no_grad():
        outputs = model(**inputs)
    torch.save({"logits": outputs.logits, "uncertainty": outputs.uncertainty_logits}, output_file)
    """
)


def test_folder_loads_with_trust_remote_code_where_crobim_u_cannot_be_imported(model, inputs, tmp_path):
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    inputs.pop("labels")
    torch.save(inputs, tmp_path / "inputs.pt")
    result = run_without_crobim_u(
        REMOTE_CODE_SCRIPT, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = model(**inputs)
    assert_close_across_processes(remote["logits"], local.logits)  # another process: to a few float32 steps
    assert_close_across_processes(remote["uncertainty"], local.uncertainty_logits)


SWIN_TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4, "image_size": 64}
CONVNEXT_TINY = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
BERT_TINY = {"vocab_size": TINY_VOCAB_SIZE, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}


@pytest.mark.parametrize(
    "vision_class, vision_config",
    [(SwinModel, SwinConfig(**SWIN_TINY)), (ConvNextModel, ConvNextConfig(**CONVNEXT_TINY))],
    ids=["swin", "convnext"],
)
def test_from_pretrained_components_loads_the_component_weights_exactly(vision_class, vision_config, tmp_path):
    torch.manual_seed(0)
    vision, text = vision_class(vision_config), BertModel(BertConfig(**BERT_TINY))
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "text")

    model = CrobimUForReferringSegmentation.from_pretrained_components(
        str(tmp_path / "vision"), str(tmp_path / "text"), config=tiny_config(), use_udlr=False
    )
    assert model.config.use_udlr is False
    assert model.config.d_model == tiny_config().d_model
    assert model.config.backbone_config.model_type == vision_config.model_type
    assert model.config.text_config.hidden_size == 32

    # The backbone wraps the vision model (Swin nests it under `swin.`): compare every tensor it shares.
    backbone_state = model.backbone.state_dict()
    compared = 0
    for name, tensor in vision.state_dict().items():
        for candidate in (name, f"swin.{name}"):
            if candidate in backbone_state:
                assert torch.equal(backbone_state[candidate], tensor), name
                compared += 1
    assert compared >= len(vision.state_dict()) - 2  # all but the classification-only final norm
    text_state = model.text_encoder.state_dict()
    for name, tensor in text.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(text_state[name], tensor), name

    inputs = tiny_inputs(batch_size=1, size=64)
    assert model(**inputs).logits.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("switches", valid_switches())
def test_sdpa_and_eager_attention_give_the_same_outputs(switches, inputs):
    use_rus, use_ugf, use_udlr = switches
    config = tiny_config(use_rus=use_rus, use_ugf=use_ugf, use_udlr=use_udlr)
    torch.manual_seed(0)
    sdpa = CrobimUForReferringSegmentation._from_config(config, attn_implementation="sdpa").eval()
    eager = CrobimUForReferringSegmentation._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert eager.text_encoder.config._attn_implementation == "eager"
    with torch.no_grad():
        a, b = sdpa(**inputs), eager(**inputs)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(inputs):
    plain = tiny_model().train()
    checkpointed = tiny_model().train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.capm.layers[0].gradient_checkpointing
    assert checkpointed.mid.levels["32"][0].gradient_checkpointing
    # Swin's stochastic depth draws random numbers in training mode: give both runs the same draws.
    torch.manual_seed(1)
    loss_a = plain(**inputs).loss
    torch.manual_seed(1)
    loss_b = checkpointed(**inputs).loss
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_one_image_with_several_expressions_is_encoded_once(model):
    inputs = tiny_inputs(batch_size=3, size=64)
    image = inputs["pixel_values"][:1]
    calls = []
    handle = model.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        shared = model(
            pixel_values=image,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_indices=torch.zeros(3, dtype=torch.long),
        )
        assert calls == [1]
        separate = model(
            pixel_values=image.expand(3, -1, -1, -1),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )
    handle.remove()
    torch.testing.assert_close(shared.logits, separate.logits, atol=1e-5, rtol=1e-5)
    assert shared.logits.shape == (3, 1, 64, 64)


def test_padding_does_not_change_the_prediction(model):
    inputs = tiny_inputs(batch_size=1, size=64, length=5)
    inputs.pop("labels")
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    padded_ids = torch.cat([inputs["input_ids"], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([inputs["attention_mask"], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(**inputs).logits
        padded = model(inputs["pixel_values"], padded_ids, padded_mask).logits
    torch.testing.assert_close(plain, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(pixel_values=b["pixel_values"][0]), r"pixel_values must have shape \(batch_size, 3"),
        (lambda b: b.update(pixel_values=b["pixel_values"][:, :1]), r"got \(2, 1, 64, 64\)"),
        (lambda b: b.update(pixel_values=b["pixel_values"][..., :50, :50]), "multiples of 32"),
        (lambda b: b.update(input_ids=b["input_ids"][:1], attention_mask=b["attention_mask"][:1], labels=None),
         "2 images for 1 expressions"),
        (lambda b: b.update(labels=b["labels"][:, :32]), r"labels must have shape .* \(2, 64, 64\).* got \(2, 32, 64\)"),
        (lambda b: b.update(labels=b["labels"][:1]), r"got \(1, 64, 64\)"),
        (lambda b: b.update(labels=b["labels"] * 255), r"binary masks in \{0, 1\}"),
        (lambda b: b.update(labels=b["labels"] * float("nan")), "NaN or Inf"),
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :3]), "does not match input_ids"),
        (lambda b: b.update(attention_mask=torch.zeros_like(b["attention_mask"])), "at least one attended token"),
        (lambda b: b.update(image_indices=torch.tensor([0, 5])), r"image_indices must lie in \[0, 1\]"),
        (lambda b: b.update(image_indices=torch.tensor([0])), r"image_indices must have shape \(2,\)"),
    ],
)
def test_bad_inputs_raise_value_errors_that_name_the_shapes(model, inputs, change, message):
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_labels_in_other_dtypes_are_accepted(model, inputs):
    with torch.no_grad():
        expected = model(**inputs).loss
        for labels in (inputs["labels"].long(), inputs["labels"].bool(), inputs["labels"].unsqueeze(1)):
            torch.testing.assert_close(model(**{**inputs, "labels": labels}).loss, expected)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["swin-base", "convnext-base"])
def test_full_size_presets_build_and_run_one_forward_at_480(preset):
    torch.manual_seed(0)
    model = CrobimUForReferringSegmentation(CrobimUConfig.from_preset(preset)).eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {parameters / 1e6:.1f} M parameters")
    assert parameters > 100e6
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 480, 480), input_ids=torch.randint(0, 30522, (1, 20)))
    assert outputs.logits.shape == (1, 1, 480, 480)
    assert outputs.uncertainty_logits.shape == (1, 1, 15, 15)
    assert torch.isfinite(outputs.logits).all()


def test_precomputed_text_embeddings_give_the_same_prediction(model, inputs):
    inputs.pop("labels")
    with torch.no_grad():
        expected = model(**inputs).logits
        words, word_mask = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        got = model(pixel_values=inputs["pixel_values"], text_embeddings=(words, word_mask)).logits
    torch.testing.assert_close(got, expected)
    message = "exactly one of input_ids, text_embeddings and text_hidden_states, got input_ids, text_embeddings"
    with pytest.raises(ValueError, match=message):
        model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], text_embeddings=(words, word_mask))
    with pytest.raises(ValueError, match="text_embeddings must be words"):
        model(pixel_values=inputs["pixel_values"], text_embeddings=(words[..., :5], word_mask))


def test_precomputed_text_hidden_states_give_the_same_loss_and_gradients(model, inputs):
    model.eval()  # no dropout: the two passes must see the same features
    with torch.no_grad():
        hidden = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = model(**inputs, global_step=10)
    expected.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    cached = {key: value for key, value in inputs.items() if key != "input_ids"}
    got = model(**cached, text_hidden_states=hidden.last_hidden_state, global_step=10)
    got.loss.backward()
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    for name, p in model.named_parameters():
        if name.startswith("text_encoder."):
            assert p.grad is None  # the encoder was skipped
        elif name in expected_grads:
            torch.testing.assert_close(p.grad, expected_grads[name], msg=name)
    model.zero_grad()
    with pytest.raises(ValueError, match="got input_ids, text_hidden_states"):
        model(**inputs, text_hidden_states=hidden.last_hidden_state)
    with pytest.raises(ValueError, match=r"text_hidden_states must have shape \(batch_size, sequence_length, "):
        model(**cached, text_hidden_states=hidden.last_hidden_state[..., :3])
    with pytest.raises(ValueError, match="attention_mask shape .* does not match text_hidden_states"):
        short_mask = inputs["attention_mask"][:, :2]
        model(**{**cached, "attention_mask": short_mask}, text_hidden_states=hidden.last_hidden_state)
    with pytest.raises(ValueError, match="Pass exactly one of .* got none"):
        model(pixel_values=inputs["pixel_values"])


def test_all_padding_text_embeddings_raise_the_input_ids_error(inputs):
    model = tiny_model(num_prompts=0)  # no prompt tokens: an all-padding row would attend to nothing (NaN)
    with torch.no_grad():
        words, word_mask = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    word_mask = word_mask.clone()
    word_mask[1] = False
    with pytest.raises(ValueError, match="at least one attended token"):
        model(pixel_values=inputs["pixel_values"], text_embeddings=(words, word_mask))


def test_gate_scale_init_at_or_below_zero_is_refused_before_weights_are_built():
    for scale in (0.0, -2.0):
        with pytest.raises(ValueError, match="ugf_gate_scale_init must be > 0"):
            tiny_model(ugf_gate_scale_init=scale)
    gate = tiny_model(ugf_gate_scale_init=0.5).ugf["8"]
    torch.testing.assert_close(torch.nn.functional.softplus(gate.gate_scale), torch.full_like(gate.gate_scale, 0.5))


def test_cell_centres_follow_the_token_order_of_flattened_maps():
    grid = modeling.cell_centres(2, 3, torch.device("cpu"), torch.float32)
    feature_map = torch.arange(6.0).view(1, 1, 2, 3)
    assert modeling.flatten_map(feature_map)[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(grid[1], torch.tensor([0.5, 0.25]))  # row 0, column 1: x = 1.5 / 3, y = 0.5 / 2
    torch.testing.assert_close(grid[5], torch.tensor([5 / 6, 0.75]))


def test_pointer_loss_is_the_cross_entropy_towards_the_pooled_mask():
    logits = torch.zeros(2, 4, 4)
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, 0, :4, :4] = 1  # one grid cell: uniform logits cost log(16)
    assert modeling.pointer_loss(logits, masks).item() == pytest.approx(math.log(16), rel=1e-6)  # empty mask skipped
    peaked = logits.clone()
    peaked[0, 0, 0] = 30.0
    assert modeling.pointer_loss(peaked, masks).item() < 1e-6
    assert modeling.pointer_loss(logits, torch.zeros_like(masks)).item() == 0.0


def test_spatial_pointers_point_train_and_tell_pixels_where_they_point(inputs):
    model = tiny_model(num_pointers=2).train()
    reference = torch.zeros_like(inputs["labels"])
    reference[:, 40:56, 4:20] = 1
    outputs = model(**inputs, reference_labels=reference)
    assert outputs.pointer_logits.shape == (2, 2, 8, 8)  # (batch, pointers, 64 / 8, 64 / 8)
    target_only = model.forward(**inputs).pointer_loss
    assert outputs.pointer_loss > target_only  # the first pointer's reference term adds to the target term
    outputs.loss.backward()
    pointers = model.mid.pointers
    for parameter in (pointers.word_queries, pointers.key_proj[0].weight, pointers.head_geometry.out_proj.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    # The mask head reads the geometry: pointing elsewhere changes its channels.
    with torch.no_grad():
        _, pointed = pointers(torch.randn(2, 64, 64), 8, 8, torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool))
        corner = torch.full_like(pointed.centres, 0.1)
        pointed = modeling.CrobimUPointers(pointed.logits, corner, pointed.spreads, pointed.sentence)
        elsewhere = modeling.CrobimUPointers(pointed.logits, 1.0 - corner, pointed.spreads, pointed.sentence)
        here, there = pointers.pixel_geometry(pointed, (16, 16)), pointers.pixel_geometry(elsewhere, (16, 16))
    assert here.shape == (2, model.config.mask_head_dim, 16, 16)
    assert (here - there).abs().max() > 1e-3 * here.abs().max()
    with pytest.raises(ValueError, match="reference_labels are a training target"):
        model(**{k: v for k, v in inputs.items() if k != "labels"}, reference_labels=reference)


def test_without_pointers_the_model_and_its_outputs_are_unchanged(inputs):
    model = tiny_model()
    assert model.mid.pointers is None
    assert not any("pointers" in name for name in model.state_dict())
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.pointer_logits is None and outputs.pointer_loss is None


def test_position_blind_control_has_no_positions(inputs):
    blind = tiny_model(position_encoding="none")
    assert torch.count_nonzero(modeling.position_encoding(blind.config, 3, 4, torch.device("cpu"), torch.float32)) == 0
    sine = tiny_model()
    sine.load_state_dict(blind.state_dict())
    inputs.pop("labels")
    with torch.no_grad():
        assert not torch.allclose(blind(**inputs).logits, sine(**inputs).logits)


def test_image_only_work_runs_once_per_image_and_matches_copies(model):
    # CAPM's context keys and values and LGFA's pixel norm, queries and vision projections depend on the image only.
    inputs = tiny_inputs(batch_size=4, size=64)
    images = inputs["pixel_values"][:2]
    indices = torch.tensor([0, 1, 1, 0])
    rows = {"capm keys": [], "lgfa stride-4 queries": []}
    hooks = [
        model.capm.layers[0].cross_attn.k_proj.register_forward_hook(
            lambda module, args, output: rows["capm keys"].append(args[0].shape[0])
        ),
        model.lgfa.pixel_word_attention["4"].attention.q_proj.register_forward_hook(
            lambda module, args, output: rows["lgfa stride-4 queries"].append(args[0].shape[0])
        ),
    ]
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        shared = model(pixel_values=images, image_indices=indices, **text)
        assert rows == {"capm keys": [2], "lgfa stride-4 queries": [2]}
        copies = model(pixel_values=images[indices], **text)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(shared.logits, copies.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.uncertainty_logits, copies.uncertainty_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("indices", [[0, 1, 1, 0], [0, 0, 0, 0]], ids=["two images", "one image"])
def test_shared_image_work_gets_the_gradient_of_every_expression(indices):
    # Eval mode: Swin's stochastic depth would draw per image, so two images and four copies would draw differently.
    model = tiny_model().eval()
    inputs = tiny_inputs(batch_size=4, size=64)
    indices = torch.tensor(indices)
    images = inputs["pixel_values"][: int(indices.max()) + 1]
    shared = dict(inputs, pixel_values=images, image_indices=indices)
    copies = dict(inputs, pixel_values=images[indices])
    grads = []
    for batch in (shared, copies):
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


LIGHTER_PATH = {
    "lgfa_fine_attention": "upsampled",
    "lgfa_fine_smoothing": "depthwise",
    "mask_head_conv": "separable",
}


@pytest.mark.parametrize("field, value", list(LIGHTER_PATH.items()))
def test_each_lighter_stride_4_setting_drops_work_and_trains(field, value, inputs):
    default, lighter = tiny_model(), tiny_model(**{field: value})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(lighter) < count(default)
    if field == "lgfa_fine_attention":
        assert lighter.lgfa.pixel_word_attention["4"].attention is None
        assert lighter.lgfa.pixel_word_attention["8"].attention is not None
    lighter.train()
    outputs = lighter(**inputs)
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss)
    trained = [name for name, p in lighter.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(name.startswith("lgfa.pixel_word_attention.4.fuse_proj") for name in trained)
    # The papers' path stays the default: a saved config without the field loads the old model.
    assert getattr(CrobimUConfig(), field) == CrobimUConfig.__dataclass_fields__[field].default != value


def test_lighter_path_with_shared_images_and_reentrant_checkpointing_matches_plain():
    inputs = tiny_inputs(batch_size=4, size=64)
    batch = dict(inputs, pixel_values=inputs["pixel_values"][:2], image_indices=torch.tensor([0, 1, 1, 0]))
    plain, checkpointed = tiny_model(**LIGHTER_PATH).train(), tiny_model(**LIGHTER_PATH).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("field", list(LIGHTER_PATH))
def test_unknown_stride_4_setting_is_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        tiny_config(**{field: "lighter"})


def test_full_size_presets_keep_the_papers_stride_4_path():
    # No lighter setting passed the one-point rule on the demo's model (BENCHMARKS.md, "A lighter stride-4 path").
    defaults = CrobimUConfig()
    for preset in ("swin-base", "convnext-base"):
        config = CrobimUConfig.from_preset(preset)
        for field in (*LIGHTER_PATH, "udlr_hidden_dim"):
            assert getattr(config, field) == getattr(defaults, field), (preset, field)
        assert config.mask_head_conv == "full" and config.lgfa_fine_smoothing == "separable", preset
