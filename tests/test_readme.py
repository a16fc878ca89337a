"""The README as a newcomer reads it: its quick start runs, its set-up commands are the ones CI runs, its links lead
somewhere, and it stays short enough to read (reference material lives in docs/)."""

import re
from pathlib import Path

import numpy as np
import torch
from helpers import save_checkpoint

REPOSITORY = Path(__file__).resolve().parents[1]
README = (REPOSITORY / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text of the README's `## heading` section, up to the next `## ` heading outside a code block."""
    start = README.index(f"## {heading}\n")
    rest = README[start + len(heading) + 4 :]
    in_code = False
    for match in re.finditer(r"^.*$", rest, flags=re.MULTILINE):
        line = match.group()
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("## "):
            return rest[: match.start()]
    return rest


def test_quick_start_runs_on_the_folder_the_demo_writes(tmp_path, monkeypatch):
    # The quick start loads `outputs/demo`, as `crobim-u demo` leaves it; a tiny random checkpoint stands in for it.
    (code,) = re.findall(r"```python\n(.*?)```", section("Quick start"), flags=re.DOTALL)
    save_checkpoint(tmp_path / "outputs" / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Quick start)", "exec"), namespace)
    results, prediction = namespace["results"], namespace["prediction"]
    width, height = namespace["image"].size
    assert len(results) == len(namespace["expressions"]) == 2
    for result in results:
        assert tuple(result["mask"].shape) == (height, width) and result["mask"].dtype == torch.bool
        assert tuple(result["uncertainty"].shape) == (height, width)
        assert 0.0 <= float(result["uncertainty"].min()) and float(result["uncertainty"].max()) <= 1.0
        assert 0.0 <= result["reliability"] <= 1.0
    assert np.asarray(prediction["mask"]).shape == (height, width)


def test_set_up_holds_the_test_command_ci_runs_and_the_demo_command():
    ci = (REPOSITORY / ".ci" / "run").read_text()
    set_up = section("Set-up")
    (test_command,) = [line for line in ci.splitlines() if "pytest" in line]
    assert test_command in set_up
    assert "crobim-u demo" in set_up and set_up.index("crobim-u demo") < set_up.index(test_command)


def test_readme_is_short_and_every_local_link_resolves():
    assert len(README.splitlines()) <= 200
    for document in [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]:
        text = document.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (document.parent / target).exists(), f"{document.name} links to {target}, which does not exist"
