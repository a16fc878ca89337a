"""Lower precision: bfloat16 autocast on the CPU (`--dtype bfloat16`, a training step, the Trainer's `--bf16 true`)
stays finite and agrees with float32 within stated tolerances; outputs stay float32 / uint8; float16 is refused off
CUDA, naming the flag."""

import json

import numpy as np
import pytest
import torch
from helpers import run_flags, save_checkpoint, tiny_model
from safetensors.torch import load_file

from crobim_u import CrobimUForReferringSegmentation
from crobim_u.cli import main
from crobim_u.inference import loading
from crobim_u.inference import predict as predict_module
from crobim_u.inference.parallel import AutocastModel, autocast_model, check_dtype
from crobim_u.training.run import main as train_main

# bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 (0.2 %) of the value, and the errors of the
# model's chain of matmuls, convolutions and normalisations add up. The logits and uncertainty logits of the tiny model
# measured 0.4-1.5 % of their largest magnitude off float32 (seeds 0-2 here); 5 % of it leaves room for other seeds
# and hosts, while a module skipped or run on wrongly cast values is off by the logits' own scale.
FORWARD_TOLERANCE = 0.05
# The loss is a mean over every pixel, where rounding errors average out: measured 0.5-1.3e-4 relative (and 5e-5 for the
# Trainer's first step). 1e-3 leaves a margin of ~8.
LOSS_TOLERANCE = 1e-3
# Gradients pass the rounding twice (forward and backward): measured 0.5-0.7 % (relative L2 norm of the difference).
GRADIENT_TOLERANCE = 0.05


def test_check_dtype_refuses_float16_off_cuda_and_unknown_names():
    assert check_dtype("bfloat16", "cpu") is torch.bfloat16
    assert check_dtype("float32", "cpu") is torch.float32
    with pytest.raises(ValueError, match=r"^--dtype float16 needs a CUDA GPU; got device 'cpu'\. On the CPU use "
                                         r"--dtype bfloat16"):
        check_dtype("float16", "cpu")
    with pytest.raises(ValueError, match=r"--dtype must be one of float32, bfloat16, float16; got 'half'"):
        check_dtype("half", "cpu")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_float16_on_the_cpu_is_refused_before_the_model_loads(command, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(predict_module, "load_checkpoint_or_exit", no_loading)
    monkeypatch.setattr(loading, "load_checkpoint_or_exit", no_loading)
    flags = {
        "predict": ["predict", "--expression", "the red car", "--output_dir", str(tmp_path / "out"), str(tmp_path)],
        "evaluate": ["evaluate", "--dataset", "folder", "--data_dir", str(tmp_path / "nothing")],
    }[command]
    with pytest.raises(SystemExit, match=r"^error: --dtype float16 needs a CUDA GPU; got device 'cpu'"):
        main([*flags, "--model", str(tmp_path), "--device", "cpu", "--dtype", "float16"])


def test_a_bf16_autocast_forward_is_finite_float32_and_agrees_with_fp32(model, inputs):
    inputs.pop("labels")
    with torch.no_grad():
        expected = model(**inputs)
        wrapped = autocast_model(model, torch.bfloat16)
        actual = wrapped(**inputs)
        words, word_mask = wrapped.encode_text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert isinstance(wrapped, AutocastModel) and autocast_model(model, torch.float32) is model
    assert words.dtype == torch.float32 and word_mask.dtype == torch.bool
    for name in ("logits", "uncertainty_logits"):
        value, reference = getattr(actual, name), getattr(expected, name)
        assert value.dtype == torch.float32, name  # cast back: what follows the model computes in float32
        assert torch.isfinite(value).all(), name
        scale = reference.abs().max().item()
        difference = (value - reference).abs().max().item()
        # Above 0: the forward pass did run in bfloat16 (an autocast that did nothing would match exactly).
        assert 0 < difference <= FORWARD_TOLERANCE * scale, (name, difference, scale)
    # Masks agree wherever float32 is clear of the threshold by more than the tolerance.
    clear = expected.logits.abs() > FORWARD_TOLERANCE * expected.logits.abs().max()
    assert clear.float().mean() > 0.5
    assert torch.equal((actual.logits > 0)[clear], (expected.logits > 0)[clear])


def test_a_bf16_training_step_is_finite_and_its_loss_agrees_with_fp32(inputs):
    losses, gradients = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1)  # the same dropout and drop-path draws in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        gradients[dtype] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        optimizer.step()
        losses[dtype] = loss.item()
        assert loss.dtype == torch.float32 and np.isfinite(losses[dtype])
        assert torch.isfinite(gradients[dtype]).all()
        assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    relative = abs(losses[torch.bfloat16] - losses[torch.float32]) / losses[torch.float32]
    assert 0 < relative <= LOSS_TOLERANCE, losses
    difference = (gradients[torch.bfloat16] - gradients[torch.float32]).norm() / gradients[torch.float32].norm()
    assert difference <= GRADIENT_TOLERANCE


def test_the_trainer_entry_point_with_bf16_trains_under_bf16_autocast_like_fp32(tmp_path, cache_dir, monkeypatch):
    autocast_seen = []
    forward = CrobimUForReferringSegmentation.forward

    def recording_forward(self, *args, **kwargs):
        if self.training:
            autocast_seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CrobimUForReferringSegmentation, "forward", recording_forward)
    losses = {}
    # transformers refuses --bf16 on a machine without a bf16 GPU unless --use_cpu true says the run is on the CPU.
    for name, flags in {"fp32": [], "bf16": ["--bf16", "true"]}.items():
        autocast_seen.clear()
        output_dir = tmp_path / name
        train_main(run_flags(output_dir, cache_dir, "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
                             "--seed", "0", *flags))
        assert autocast_seen == ([torch.bfloat16] if name == "bf16" else [False])
        state = json.loads((output_dir / "trainer_state.json").read_text())
        (losses[name],) = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        weights = load_file(output_dir / "model.safetensors")
        assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in weights.values())
    assert np.isfinite(losses["bf16"])
    assert 0 < abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] <= LOSS_TOLERANCE, losses


def test_predict_in_bfloat16_writes_float32_and_uint8_rasters_close_to_float32(tmp_path):
    rasterio = pytest.importorskip("rasterio", reason='the geo extra is not installed: pip install "crobim-u[geo]"')
    pytest.importorskip("geopandas", reason='the geo extra is not installed: pip install "crobim-u[geo]"')
    from affine import Affine

    scene = tmp_path / "scene.tif"
    data = np.random.default_rng(0).integers(0, 256, (3, 100, 140), dtype=np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", height=100, width=140, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000)) as destination:
        destination.write(data)
    checkpoint = save_checkpoint(tmp_path / "model")
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        output = tmp_path / dtype
        assert main(["predict", "--model", checkpoint, "--output_dir", str(output), "--expression", "the red car",
                     "--tile", "--device", "cpu", "--dtype", dtype, "--no_progress", str(scene)]) == 0
        (record,) = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
        with rasterio.open(record["mask"]) as mask, rasterio.open(record["uncertainty"]) as uncertainty:
            assert mask.dtypes == ("uint8",) and uncertainty.dtypes == ("float32",)
            outputs[dtype] = record, mask.read(1), uncertainty.read(1)
        assert set(np.unique(outputs[dtype][1])) <= {0, 1} and record["num_windows"] > 1
    (record, mask, uncertainty), (expected_record, expected_mask, expected_uncertainty) = (
        outputs["bfloat16"], outputs["float32"]
    )
    # The random model's uncertainty map spans only ~0.006 around 0.5, where the scene's map is held in float16 (steps
    # of 2^-11 = 0.0005) before it is written: bfloat16 moved it by one such step (measured). A quarter of the map's
    # spread allows three, and still fails a map of another scene or expression, which differs by the spread.
    spread = expected_uncertainty.max() - expected_uncertainty.min()
    assert spread > 0 and np.abs(uncertainty - expected_uncertainty).max() <= 0.25 * spread
    # The tiny random model's probabilities sit close to 0.5, where bfloat16 flips the pixels nearest to it: 99.98 %
    # agreed (measured).
    assert (mask == expected_mask).mean() > 0.99
    # The score, a mean of probabilities inside the mask: measured 2e-5 off; 5e-4 leaves a margin of 25. Above 0: the
    # command did run the model in bfloat16.
    assert 0 < abs(record["score"] - expected_record["score"]) <= 5e-4
