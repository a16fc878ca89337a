"""Cards the Hub reads, parsed with huggingface_hub (no network): the Space card of the repository README."""

import tomllib
from pathlib import Path

from huggingface_hub import SpaceCard
from packaging.requirements import Requirement
from packaging.version import Version


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
