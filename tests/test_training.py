import concurrent.futures
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TRAIN_IMAGE_SIZE, run_flags, tiny_config, tiny_model, write_rrsisd
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from crobim_u import CrobimUForReferringSegmentation, cli
from crobim_u.data import load_referring_dataset
from crobim_u.metrics import format_metric_table
from crobim_u.training import (
    CrobimUDataCollator,
    CrobimUTrainer,
    CrobimUTrainingArguments,
    ImageGroupedDataset,
    ModelCardInfo,
    parse_arguments,
    render_model_card,
)
from crobim_u.training.collator import consecutive_image_groups
from crobim_u.training.run import build_synthetic_tokenizer, freeze_unused_parameters, main
from crobim_u.training.trainer import load_weights_like_from_pretrained


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
SIZE = TRAIN_IMAGE_SIZE  # the image side of `run_flags`' runs, and of this module's own trainers
CODE_FILES = {
    "configuration_crobim_u.py", "modeling_crobim_u.py", "image_processing_crobim_u.py", "processing_crobim_u.py",
    "pipeline_crobim_u.py",
}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json"}


def state_dict_of(folder) -> dict[str, torch.Tensor]:
    return CrobimUForReferringSegmentation.from_pretrained(folder).state_dict()


def assert_same_weights(actual: dict, expected: dict, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """20 steps with evaluation and checkpoints at 10 and 20, the best checkpoint loaded at the end."""
    output_dir = tmp_path_factory.mktemp("run") / "crobim-u-tiny"
    # Best = highest eval loss: the loss falls, so the best checkpoint is step 10, not the last one, and loading it
    # must change the weights.
    flags = run_flags(
        output_dir, cache_dir, "--max_steps", "20", "--eval_strategy", "steps", "--eval_steps", "10",
        "--save_strategy", "steps", "--save_steps", "10", "--load_best_model_at_end", "true",
        "--metric_for_best_model", "loss", "--greater_is_better", "true",
    )
    metrics = main(flags)
    return {"output_dir": output_dir, "flags": flags, "metrics": metrics}


@pytest.fixture(scope="module")
def processor():
    from crobim_u import CrobimUImageProcessor, CrobimUProcessor

    return CrobimUProcessor(CrobimUImageProcessor(size={"height": SIZE, "width": SIZE}), build_synthetic_tokenizer())


def tiny_trainer(tmp_path, processor, cache_dir, **arguments) -> CrobimUTrainer:
    torch.manual_seed(0)
    model = CrobimUForReferringSegmentation(tiny_config(text_config={"vocab_size": len(processor.tokenizer)}))
    freeze_unused_parameters(model)
    dataset = load_referring_dataset(
        "synthetic", num_train=16, num_validation=4, num_test=0, image_size=SIZE, cache_dir=cache_dir
    )
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                    learning_rate=1e-3, logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False)
    return CrobimUTrainer(
        model=model, args=CrobimUTrainingArguments(**{**defaults, **arguments}), train_dataset=dataset["train"],
        eval_dataset=dataset["validation"], data_collator=CrobimUDataCollator(processor), processing_class=processor,
    )


# ---- Arguments ----


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_preset_config_parses_into_the_dataclasses(config):
    model_args, data_args, training_args = parse_arguments([str(config)])
    raw = json.loads(config.read_text())
    assert data_args.dataset_name == raw["dataset_name"]
    assert training_args.lr_scheduler_type.value == "polynomial"
    assert training_args.lr_scheduler_kwargs == {"power": 0.9}
    assert training_args.remove_unused_columns is False and training_args.label_names == ["labels"]
    assert training_args.batch_eval_metrics is True
    if config.stem != "synthetic-tiny":  # the field's recipe
        assert model_args.image_size == 480
        assert model_args.max_length == (40 if "risbench" in config.stem else 20)
        assert model_args.text_encoder == "google-bert/bert-base-uncased"
        assert model_args.backbone in (
            "microsoft/swin-base-patch4-window12-384-in22k", "facebook/convnext-base-224-22k"
        )
        assert training_args.num_train_epochs == 40 and training_args.weight_decay == 0.01
        assert 3e-5 <= training_args.learning_rate <= 5e-5


def test_flags_override_the_json_config_and_switches_reach_the_config_changes():
    model_args, data_args, training_args = parse_arguments(
        [str(CONFIGS[-1]), "--learning_rate", "1e-4", "--use_udlr", "false", "--synthetic_num_train", "8",
         "--synthetic_expressions_per_image", "2", "--config_overrides", '{"num_prompts": 2, "text_config": {"hidden_dropout_prob": 0.0}}',
         "--lr_scheduler_kwargs", '{"power": 2.0}']
    )
    assert CONFIGS[-1].stem == "synthetic-tiny"
    assert training_args.learning_rate == 1e-4 and training_args.lr_scheduler_kwargs == {"power": 2.0}
    assert data_args.synthetic_num_train == 8
    loader_kwargs = data_args.loader_kwargs()
    assert (loader_kwargs["num_train"], loader_kwargs["expressions_per_image"]) == (8, 2)
    assert model_args.config_changes() == {
        "num_prompts": 2, "text_config": {"hidden_dropout_prob": 0.0}, "use_udlr": False,
        "uncertainty_warmup_steps": 100,
    }
    # Flags alone, without a file.
    model_args, _, training_args = parse_arguments(["--preset", "tiny", "--use_rus", "false", "--use_ugf", "false",
                                                    "--use_udlr", "false", "--output_dir", "x"])
    assert model_args.config_changes() == {"use_rus": False, "use_ugf": False, "use_udlr": False}
    assert training_args.ddp_find_unused_parameters is False


def test_unknown_json_keys_and_half_component_pairs_are_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"preset": "tiny", "learning_rte": 1e-3}))
    with pytest.raises(ValueError, match="learning_rte"):
        parse_arguments([str(path)])
    with pytest.raises(ValueError, match="--backbone and --text_encoder"):
        parse_arguments(["--backbone", "microsoft/swin-base-patch4-window12-384-in22k"])


def test_crobim_u_train_forwards_every_argument():
    args = cli.build_parser().parse_args(["train", "configs/synthetic-tiny.json", "--max_steps", "3", "--help"])
    assert args.arguments == ["configs/synthetic-tiny.json", "--max_steps", "3", "--help"]


# ---- Collator, parameter groups, warm-up plumbing ----


def test_collator_returns_model_inputs_and_binary_labels(processor, cache_dir):
    records = [load_referring_dataset("synthetic", num_train=16, num_validation=4, num_test=0, image_size=SIZE,
                                      cache_dir=cache_dir)["train"][i] for i in range(3)]
    batch = CrobimUDataCollator(processor)(records)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, batch["input_ids"].shape[1])
    assert batch["labels"].shape == (3, SIZE, SIZE) and batch["labels"].dtype == torch.int64
    assert set(batch["labels"].unique().tolist()) <= {0, 1}
    without_masks = CrobimUDataCollator(processor, max_length=4)([{**r, "mask": None} for r in records])
    assert "labels" not in without_masks and without_masks["input_ids"].shape[1] <= 4


def test_consecutive_rows_of_one_image_form_a_group():
    assert consecutive_image_groups(["a", "a", "b", "a", "c", "c", "c"]) == [
        range(0, 2), range(2, 3), range(3, 4), range(4, 7)
    ]
    assert consecutive_image_groups([]) == []


def test_image_groups_collate_to_each_image_once_with_its_expressions(processor, cache_dir):
    rows = load_referring_dataset(
        "synthetic", num_train=6, num_validation=0, num_test=0, image_size=SIZE, expressions_per_image=2,
        cache_dir=cache_dir,
    )["train"]
    groups = ImageGroupedDataset(rows)
    assert len(groups) == 3
    assert groups[1]["image_id"] == rows[2]["image_id"] == rows[3]["image_id"]
    assert groups[1]["expression"] == [rows[2]["expression"], rows[3]["expression"]]
    collate = CrobimUDataCollator(processor)
    grouped = collate([groups[i] for i in range(3)])
    separate = collate([rows[i] for i in range(6)])
    assert grouped["image_indices"].tolist() == [0, 0, 1, 1, 2, 2] and "image_indices" not in separate
    assert grouped["pixel_values"].shape == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(grouped["pixel_values"], separate["pixel_values"][::2], rtol=0, atol=0)
    for name in ("labels", "input_ids", "attention_mask", "token_type_ids"):
        torch.testing.assert_close(grouped[name], separate[name], rtol=0, atol=0)
    model = tiny_model(text_config={"vocab_size": len(processor.tokenizer)})
    with torch.no_grad():
        expected, got = model(**separate), model(**grouped)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_image_groups_read_through_a_loader_s_decoding_transform(tmp_path, processor):
    write_rrsisd(tmp_path)
    train = load_referring_dataset("rrsisd", str(tmp_path))["train"]  # one ref with two sentences: one image
    groups = ImageGroupedDataset(train)
    assert len(train) == 2 and len(groups) == 1
    assert groups[0]["expression"] == ["the vehicle on the left", "a small car"]
    batch = CrobimUDataCollator(processor)([groups[0]])
    assert batch["pixel_values"].shape[0] == 1 and batch["labels"].shape[0] == 2
    assert batch["image_indices"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="needs an image_id column"):
        ImageGroupedDataset(train.remove_columns("image_id"))


def test_parameter_groups_give_encoders_their_learning_rate_and_spare_norms_biases_and_positions(
    tmp_path, processor, cache_dir
):
    trainer = tiny_trainer(tmp_path, processor, cache_dir, learning_rate=1e-3, weight_decay=0.05,
                           backbone_learning_rate_scale=0.1, text_encoder_learning_rate_scale=0.2)
    optimizer = trainer.create_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    trainable = [name for name, p in named.items() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable) == len(group_of)
    # The classification-only final norm of Swin gets no gradient: frozen, so neither optimized nor reduced by DDP.
    assert not named["backbone.swin.layernorm.weight"].requires_grad
    assert id(named["backbone.swin.layernorm.weight"]) not in group_of

    expected = {
        "backbone.swin.encoder.layers.0.blocks.0.attention.q_proj.weight": ("backbone/decay", 1e-4, 0.05),
        "backbone.swin.encoder.layers.0.blocks.0.attention.q_proj.bias": ("backbone/no_decay", 1e-4, 0.0),
        "backbone.swin.encoder.layers.0.blocks.0.layernorm_before.weight": ("backbone/no_decay", 1e-4, 0.0),
        "backbone.swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table":
            ("backbone/no_decay", 1e-4, 0.0),
        "backbone.swin.embeddings.patch_embeddings.projection.weight": ("backbone/decay", 1e-4, 0.05),
        "text_encoder.embeddings.word_embeddings.weight": ("text_encoder/decay", 2e-4, 0.05),
        "text_encoder.embeddings.position_embeddings.weight": ("text_encoder/no_decay", 2e-4, 0.0),
        "text_encoder.embeddings.LayerNorm.weight": ("text_encoder/no_decay", 2e-4, 0.0),
        "text_encoder.encoder.layer.0.attention.self.query.weight": ("text_encoder/decay", 2e-4, 0.05),
        "capm.prompts": ("heads/no_decay", 1e-3, 0.0),
        "capm.level_embeddings": ("heads/no_decay", 1e-3, 0.0),
        "ugf.8.gate_scale": ("heads/no_decay", 1e-3, 0.0),
        "mid.mask_bias": ("heads/no_decay", 1e-3, 0.0),
        "visual_proj.4.1.weight": ("heads/no_decay", 1e-3, 0.0),  # GroupNorm
        "visual_proj.4.0.weight": ("heads/decay", 1e-3, 0.05),  # 1x1 convolution
        "lgfa.pixel_word_attention.4.attention.q_proj.weight": ("heads/decay", 1e-3, 0.05),
        "rus.scorer.0.weight": ("heads/decay", 1e-3, 0.05),
        "udlr.residual.weight": ("heads/decay", 1e-3, 0.05),
    }
    for name, (group_name, lr, weight_decay) in expected.items():
        group = group_of[id(named[name])]
        assert group["name"] == group_name, name
        assert (group["lr"], group["weight_decay"]) == (pytest.approx(lr), weight_decay), name
    assert set(trainer.get_decay_parameter_names(trainer.model)) == {
        name for name in trainable if group_of[id(named[name])]["weight_decay"] > 0
    }

    # Polynomial decay with power 0.9 scales every group alike.
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = ((1e-3 - 1e-7) * 0.5**0.9 + 1e-7) / 1e-3
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor)


def test_global_step_reaches_the_model_in_training_only(tmp_path, processor, cache_dir):
    trainer = tiny_trainer(tmp_path, processor, cache_dir, max_steps=3, gradient_accumulation_steps=2,
                           save_strategy="no")
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((module.training, kwargs.get("global_step"))), with_kwargs=True
    )
    trainer.train()
    assert seen == [(True, 0), (True, 0), (True, 1), (True, 1), (True, 2), (True, 2)]
    seen.clear()
    metrics = trainer.evaluate()
    assert seen == [(False, None), (False, None)]
    assert {"eval_oIoU", "eval_mIoU", "eval_Pr@0.5", "eval_loss"} <= set(metrics)
    assert trainer.measured_metrics["eval"]["step"] == 3


def test_group_by_image_trains_on_each_image_once_with_all_of_its_expressions(tmp_path, cache_dir, monkeypatch):
    assert parse_arguments(["--output_dir", "x"])[1].group_by_image is False  # the default reads row by row
    train_batches = []
    collate = CrobimUDataCollator.__call__

    def recording_collate(self, records):
        batch = collate(self, records)
        if "image_indices" in batch:  # the data check and evaluation read single rows
            train_batches.append(batch)
        return batch

    monkeypatch.setattr(CrobimUDataCollator, "__call__", recording_collate)
    output_dir = tmp_path / "grouped"
    # 16 rows, two per scene: 8 images, 2 per step.
    metrics = main(run_flags(
        output_dir, cache_dir, "--synthetic_expressions_per_image", "2", "--group_by_image", "true",
        "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_strategy", "no",
    ))
    assert len(train_batches) == 4
    for batch in train_batches:
        assert batch["pixel_values"].shape[0] == 2 and batch["labels"].shape[0] == batch["input_ids"].shape[0] == 4
        assert batch["image_indices"].tolist() == [0, 0, 1, 1]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["eval_loss"])
    assert "grouped by image: 8 images carry the 16 expressions" in (output_dir / "README.md").read_text()


# ---- A training run: loss, checkpoints, best model, resume ----


def test_training_lowers_the_loss(trained_run):
    state = json.loads((trained_run["output_dir"] / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 20
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    print(f"training loss: first 4 steps {first:.3f}, last 4 steps {last:.3f}")
    assert last < 0.85 * first


@pytest.mark.parametrize("folder", ["checkpoint-10", "checkpoint-20", "."])
def test_every_checkpoint_and_the_final_folder_hold_safetensors_processor_card_and_code(trained_run, folder):
    path = trained_run["output_dir"] / folder
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "README.md"} | PROCESSOR_FILES | CODE_FILES <= files
    assert not {name for name in files if name.endswith(".bin") and name != "training_args.bin"}
    assert not {name for name in files if "pytorch_model" in name}
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert {"referring-segmentation", "remote-sensing", "crobim-u"} <= set(card.data.tags)
    assert "| initialisation | `tiny` preset" in card.text
    assert "$" not in card.text

    assert type(AutoModel.from_pretrained(path)) is CrobimUForReferringSegmentation
    assert AutoProcessor.from_pretrained(path).image_processor.size.height == SIZE


# A fresh interpreter in which `import crobim_u` fails: only the code shipped in each folder can load it.
REMOTE_CODE_SCRIPT = """
import importlib.abc, sys
class BlockCrobimU(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "crobim_u":
            raise ImportError("crobim_u is blocked in this process")
sys.meta_path.insert(0, BlockCrobimU())
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
for folder in sys.argv[1:]:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = processor(images=Image.new("RGB", (40, 30), (90, 120, 60)), text="the red building")
    inputs.pop("original_sizes")
    with torch.no_grad():
        print(repr(model(**inputs).logits.double().sum().item()))
"""


def test_checkpoints_load_with_trust_remote_code_where_crobim_u_cannot_be_imported(trained_run, tmp_path):
    folders = [str(trained_run["output_dir"] / name) for name in ("checkpoint-10", "checkpoint-20", ".")]
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, *folders], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, remote_sum in zip(folders, result.stdout.split()):
        processor, model = AutoProcessor.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
        inputs = processor(images=Image.new("RGB", (40, 30), (90, 120, 60)), text="the red building")
        inputs.pop("original_sizes")
        with torch.no_grad():
            assert float(remote_sum) == model(**inputs).logits.double().sum().item()


def test_final_card_reports_the_measured_metrics_and_its_snippets_run(trained_run, monkeypatch):
    output_dir = trained_run["output_dir"]
    card = ModelCard.load(output_dir / "README.md")
    measured = {key[5:]: value for key, value in trained_run["metrics"].items() if key.startswith("eval_")}
    assert format_metric_table(measured) in card.text
    assert "weights of step 10" in card.text and "best checkpoint by loss (step 10)" in card.text
    results = card.data.eval_results
    assert {result.metric_type for result in results} == {"oIoU", "mIoU"}
    assert results[0].metric_value == round(100 * measured[results[0].metric_type], 2)

    # The usage snippets of the card, run against the folder.
    monkeypatch.chdir(output_dir.parent)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save("scene.png")
    snippets = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert len(snippets) == 2 and all(output_dir.name in snippet for snippet in snippets)
    for snippet in snippets:
        namespace = {}
        exec(snippet, namespace)
        mask = np.asarray(namespace["result"]["mask"])
        assert mask.shape == (50, 70)


def test_best_model_at_end_equals_from_pretrained_of_the_best_checkpoint(trained_run):
    output_dir = trained_run["output_dir"]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-10"
    final, best, last = (state_dict_of(output_dir / name) for name in (".", "checkpoint-10", "checkpoint-20"))
    assert_same_weights(final, best)
    name = "backbone.swin.encoder.layers.0.blocks.0.attention.q_proj.weight"
    assert not torch.equal(best[name], last[name])  # loading the best checkpoint did change the backbone


def test_checkpoint_loading_equals_from_pretrained_where_a_raw_state_dict_load_does_not(
    trained_run, tmp_path, processor, cache_dir
):
    checkpoint = trained_run["output_dir"] / "checkpoint-10"
    trainer = tiny_trainer(tmp_path, processor, cache_dir)
    # What the Trainer itself does (transformers#43701): the Swin keys are saved in legacy names.
    raw = trainer.model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    assert any(key.startswith("backbone.swin.encoder") for key in raw.missing_keys)

    trainer._load_from_checkpoint(str(checkpoint))
    assert_same_weights(trainer.model.state_dict(), state_dict_of(checkpoint))
    trainer.state.best_model_checkpoint = str(trained_run["output_dir"] / "checkpoint-20")
    trainer._load_best_model()
    assert_same_weights(trainer.model.state_dict(), state_dict_of(trainer.state.best_model_checkpoint))
    model = CrobimUForReferringSegmentation(trainer.model.config)
    load_weights_like_from_pretrained(model, str(checkpoint))
    assert_same_weights(model.state_dict(), state_dict_of(checkpoint))


def test_resuming_from_a_middle_checkpoint_reproduces_the_uninterrupted_run(trained_run, tmp_path):
    # Same run (dropout and drop-path on), restarted from step 10 in another folder: data order, RNG, optimizer and
    # schedule are restored from the checkpoint, the weights as from_pretrained reads them.
    resumed_dir = tmp_path / "resumed"
    flags = [*trained_run["flags"], "--output_dir", str(resumed_dir),
             "--resume_from_checkpoint", str(trained_run["output_dir"] / "checkpoint-10")]
    main(flags)
    resumed_state = json.loads((resumed_dir / "checkpoint-20" / "trainer_state.json").read_text())
    original_state = json.loads((trained_run["output_dir"] / "checkpoint-20" / "trainer_state.json").read_text())
    losses = lambda state: [e["loss"] for e in state["log_history"] if "loss" in e]  # noqa: E731
    assert losses(resumed_state) == pytest.approx(losses(original_state), rel=0, abs=1e-6)
    resumed = state_dict_of(resumed_dir / "checkpoint-20")
    uninterrupted = state_dict_of(trained_run["output_dir"] / "checkpoint-20")
    largest = max((resumed[name] - uninterrupted[name]).abs().max().item() for name in resumed)
    print(f"resume: largest weight difference {largest}")
    assert_same_weights(resumed, uninterrupted, atol=1e-6)


# ---- Model card and the Hub ----


def test_model_card_renders_front_matter_training_table_and_metrics():
    metrics = {"Pr@0.5": 0.5, "Pr@0.6": 0.4, "Pr@0.7": 0.3, "Pr@0.8": 0.2, "Pr@0.9": 0.1, "oIoU": 0.61, "mIoU": 0.55,
               "num_samples": 10, "step": 7}
    info = ModelCardInfo(
        dataset="rrsisd", splits={"train": "train", "test": "test"}, num_train_samples=100, init="from components",
        base_models=["microsoft/swin-base-patch4-window12-384-in22k", "google-bert/bert-base-uncased"],
        image_size=480, max_length=20,
    )
    args = CrobimUTrainingArguments(output_dir="unused", per_device_train_batch_size=8)
    text = render_model_card(tiny_config(use_udlr=False), args, info, {"test": metrics}, model_id="me/model", step=7)
    card = ModelCard(text)
    assert card.data.base_model == info.base_models and card.data.datasets is None  # "rrsisd" is no Hub id
    assert card.data.eval_results[0].dataset_split == "test" and card.data.eval_results[0].metric_value == 61.0
    assert format_metric_table(metrics) in card.text
    assert "rrsisd, `test` split (10 samples, weights of step 7" in card.text
    assert "| use_udlr | `False` |" in card.text
    assert "| learning rate | 3e-05 (backbone x0.1, text encoder x0.1) |" in card.text
    assert "| schedule | polynomial {'power': 0.9} |" in card.text
    assert 'referring_segmentation_pipeline("me/model")' in card.text
    no_metrics = render_model_card(tiny_config(), None, None, None)
    assert "No evaluation was run for this checkpoint." in no_metrics


def test_push_to_hub_uploads_weights_processor_card_and_code(tmp_path, cache_dir, monkeypatch):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False,
                      **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploads.append({
            "repo_id": repo_id, "path_in_repo": path_in_repo,
            "files": set(filter_repo_objects(files, ignore_patterns=ignore_patterns)),
            "card": (Path(folder_path) / "README.md").read_text(),
        })
        future = concurrent.futures.Future()
        future.set_result(None)
        return future if run_as_future else None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output_dir = tmp_path / "local-folder"
    flags = run_flags(output_dir, cache_dir, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
                      "--eval_split", "", "--push_to_hub", "true", "--hub_model_id", "someone/crobim-u-tiny",
                      "--hub_strategy", "every_save")
    assert cli.main(["train", *flags]) == 0

    assert [upload["repo_id"] for upload in uploads] == ["someone/crobim-u-tiny"] * 3  # steps 1, 2, end
    for upload in uploads:
        assert upload["path_in_repo"] is None
        assert {"model.safetensors", "config.json", "README.md"} | PROCESSOR_FILES | CODE_FILES <= upload["files"]
        assert not any(name.startswith("checkpoint-") for name in upload["files"])
        assert 'AutoModel.from_pretrained("someone/crobim-u-tiny")' in upload["card"]
    assert "| steps done | 2 |" in uploads[-1]["card"]
