"""Cards the Hub reads, parsed with huggingface_hub (no network): the repository README as a Space card, the model
card of every checkpoint, and the metric's Space card."""

import runpy
import tomllib
from pathlib import Path

import evaluate
from helpers import tiny_config
from huggingface_hub import ModelCard, SpaceCard
from packaging.requirements import Requirement
from packaging.version import Version

from crobim_u.training import ModelCardInfo, render_model_card


REPOSITORY = Path(__file__).resolve().parents[1]


def test_readme_is_a_space_card_for_app_py_with_a_gradio_version_the_app_extra_allows():
    card = SpaceCard.load(REPOSITORY / "README.md")
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    (gradio,) = [Requirement(text) for text in pyproject["project"]["optional-dependencies"]["app"]]
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert (REPOSITORY / card.data.app_file).is_file()
    assert Version(card.data.sdk_version) in gradio.specifier
    assert card.text.lstrip().startswith("# crobim-u")


def test_space_requirements_are_the_package_dependencies_and_the_geo_extra():
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    expected = {str(Requirement(text)) for text in project["dependencies"] + project["optional-dependencies"]["geo"]}
    lines = (REPOSITORY / "requirements.txt").read_text().splitlines()
    listed = {str(Requirement(line)) for line in lines if line.strip() and not line.startswith("#")}
    assert listed == expected


def test_model_card_metadata_carries_the_hub_fields_and_the_measured_model_index():
    metrics = {"Pr@0.5": 0.5, "Pr@0.6": 0.4, "Pr@0.7": 0.3, "Pr@0.8": 0.2, "Pr@0.9": 0.1, "oIoU": 0.6123,
               "mIoU": 0.5, "num_samples": 10}
    info = ModelCardInfo(
        dataset="someone/rrsisd-parquet", splits={"train": "train", "test": "test"},
        base_models=["microsoft/swin-base-patch4-window12-384-in22k", "google-bert/bert-base-uncased"],
    )
    card = ModelCard(render_model_card(tiny_config(), None, info, {"test": metrics}, model_id="me/crobim-u-rrsisd"))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert {"referring-segmentation", "remote-sensing", "crobim-u"} <= set(card.data.tags)
    assert card.data.base_model == info.base_models
    assert card.data.datasets == ["someone/rrsisd-parquet"]
    assert card.data.model_name == "crobim-u-rrsisd"
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {name: results[name].metric_value for name in results} == {"oIoU": 61.23, "mIoU": 50.0}
    assert {(result.task_type, result.dataset_type, result.dataset_split) for result in results.values()} == {
        ("image-segmentation", "someone/rrsisd-parquet", "test")
    }
    # A data set without a Hub id is named in the model index but not linked.
    local = ModelCard(render_model_card(tiny_config(), None, ModelCardInfo(dataset="rrsisd"), {"test": metrics}))
    assert local.data.datasets is None and local.data.eval_results[0].dataset_type == "rrsisd"


def test_metric_readme_is_a_metric_space_whose_app_serves_evaluates_widget(monkeypatch):
    folder = REPOSITORY / "metrics" / "referring_segmentation"
    card = SpaceCard.load(folder / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert Version(card.data.sdk_version).major == 3  # evaluate's widget is written for gradio 3 (gr.inputs)
    assert {"evaluate", "metric"} <= set(card.data.tags)
    launched = []
    monkeypatch.setattr(evaluate.utils, "launch_gradio_widget", launched.append)
    runpy.run_path(str(folder / card.data.app_file))
    (module,) = launched
    assert module.name == "referring_segmentation"
    assert module.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])["oIoU"] == 0.5
