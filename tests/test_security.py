"""Security: nothing in the package runs code from a file it loads. Weights come from safetensors only, no
`eval`/`exec`, no pickle but the restricted unpickler, and no pickle in saved or pushed checkpoints."""

import ast
import concurrent.futures
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_VOCAB_SIZE, make_processor, tiny_model
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from crobim_u.inference.loading import load_checkpoint
from crobim_u.training.arguments import ModelArguments
from crobim_u.training.run import build_model
from crobim_u.training.run import main as train_main
from crobim_u.training.trainer import load_weights_like_from_pretrained


REPOSITORY = Path(__file__).resolve().parents[1]
SCANNED = ("crobim_u", "benchmarks")
# The one module allowed to touch `pickle.Unpickler`: it refuses every global (crobim_u/data/safe_pickle.py).
RESTRICTED_UNPICKLER = Path("crobim_u/data/safe_pickle.py")
# Names that run code or unpickle whatever a file holds, wherever they are referenced (called or passed on).
FORBIDDEN = {
    "eval", "exec", "builtins.eval", "builtins.exec", "pickle.load", "pickle.loads", "pickle.Unpickler",
    "_pickle.load", "_pickle.loads", "_pickle.Unpickler", "marshal.load", "marshal.loads", "shelve.open",
    "dill.load", "dill.loads", "joblib.load", "cloudpickle.load", "cloudpickle.loads", "torch.serialization.load",
}


class UnsafeLoadingFinder(ast.NodeVisitor):
    """Collects `(line, what)` for each unsafe pattern in a module, resolving `import x as y` and `from x import y`."""

    def __init__(self, allow_unpickler: bool = False):
        self.aliases: dict[str, str] = {}
        self.allowed = {"pickle.Unpickler"} if allow_unpickler else set()
        self.findings: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            # `import a.b` binds `a`; `import a.b as c` binds `c` to `a.b`.
            root = alias.name.split(".")[0]
            self.aliases[alias.asname or root] = alias.name if alias.asname else root

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if node.module and node.level == 0:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def reference(self, node: ast.AST) -> None:
        name = self.dotted(node)
        if name in FORBIDDEN and name not in self.allowed:
            self.findings.append((node.lineno, name))

    def visit_Name(self, node: ast.Name) -> None:
        self.reference(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.reference(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        if name == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                self.findings.append((node.lineno, "torch.load without weights_only=True"))
        if name in ("numpy.load", "np.load") and not (
            isinstance(keywords.get("allow_pickle", ast.Constant(False)), ast.Constant)
            and keywords.get("allow_pickle", ast.Constant(False)).value is False
        ):
            self.findings.append((node.lineno, "numpy.load with allow_pickle"))
        for keyword, flagged in (("use_safetensors", False), ("trust_remote_code", True)):
            value = keywords.get(keyword)
            if isinstance(value, ast.Constant) and value.value is flagged:
                self.findings.append((node.lineno, f"{keyword}={flagged}"))
        self.generic_visit(node)


def unsafe_loading(source: str, allow_unpickler: bool = False) -> list[tuple[int, str]]:
    finder = UnsafeLoadingFinder(allow_unpickler)
    finder.visit(ast.parse(source))
    return finder.findings


def test_package_source_loads_nothing_unsafely():
    files = sorted(path for folder in SCANNED for path in (REPOSITORY / folder).rglob("*.py"))
    assert len(files) > 20 and REPOSITORY / RESTRICTED_UNPICKLER in files
    findings = []
    for path in files:
        relative = path.relative_to(REPOSITORY)
        for line, what in unsafe_loading(path.read_text(encoding="utf-8"), relative == RESTRICTED_UNPICKLER):
            findings.append(f"{relative}:{line}: {what}")
    assert findings == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("x = eval('1 + 1')", "eval"),
        ("exec(code)", "exec"),
        ("import pickle\npickle.load(open('f', 'rb'))", "pickle.load"),
        ("import pickle as p\nobj = p.loads(data)", "pickle.loads"),
        ("from pickle import loads\nloads(data)", "pickle.loads"),
        ("import pickle\nloader = pickle.Unpickler", "pickle.Unpickler"),
        ("import marshal\nmarshal.loads(data)", "marshal.loads"),
        ("import torch\ntorch.load('x.pt')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x.pt', weights_only=False)", "torch.load without weights_only=True"),
        ("from torch import load\nload('x.pt')", "torch.load without weights_only=True"),
        ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "numpy.load with allow_pickle"),
        ("Model.from_pretrained(path, use_safetensors=False)", "use_safetensors=False"),
        ("AutoModel.from_pretrained(path, trust_remote_code=True)", "trust_remote_code=True"),
    ],
)
def test_the_scan_finds_each_unsafe_pattern(source, expected):
    assert [what for _, what in unsafe_loading(source)] == [expected]


def test_the_scan_passes_safe_patterns_and_allows_the_unpickler_only_where_it_is_restricted():
    safe = (
        "import torch\nimport pickle\nmodel.eval()\ntorch.load('x.pt', weights_only=True)\n"
        "raise pickle.UnpicklingError('no')\nModel.from_pretrained(path, use_safetensors=True)"
    )
    assert unsafe_loading(safe) == []
    source = (REPOSITORY / RESTRICTED_UNPICKLER).read_text()
    assert [what for _, what in unsafe_loading(source)] == ["pickle.Unpickler"]
    assert unsafe_loading(source, allow_unpickler=True) == []


@pytest.fixture(scope="module")
def bin_only_folder(tmp_path_factory) -> Path:
    """A checkpoint folder whose weights are a pickle (`pytorch_model.bin`), as old or hostile checkpoints are."""
    folder = tmp_path_factory.mktemp("bin-only")
    model = tiny_model()
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_model_weights_load_from_safetensors_only(bin_only_folder):
    with pytest.raises(OSError, match="model.safetensors"):
        load_checkpoint(bin_only_folder)
    with pytest.raises(OSError, match="model.safetensors"):
        load_weights_like_from_pretrained(tiny_model(), str(bin_only_folder))
    with pytest.raises(OSError, match="model.safetensors"):
        build_model(ModelArguments(model_name_or_path=str(bin_only_folder)), vocab_size=TINY_VOCAB_SIZE)


def test_checkpoints_and_pushes_hold_no_pickled_training_arguments(tmp_path, monkeypatch):
    uploads = []

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False,
                      **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploads.append((path_in_repo, set(filter_repo_objects(files, ignore_patterns=ignore_patterns))))
        future = concurrent.futures.Future()
        future.set_result(None)
        return future if run_as_future else None

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output_dir = tmp_path / "run"
    train_main([
        "--preset", "tiny", "--image_size", "64", "--dataset_name", "synthetic", "--synthetic_num_train", "4",
        "--synthetic_num_validation", "0", "--synthetic_num_test", "0", "--synthetic_image_size", "64",
        "--cache_dir", str(tmp_path / "cache"), "--eval_split", "", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
        "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--report_to", "none", "--push_to_hub", "true",
        "--hub_model_id", "me/tiny", "--hub_strategy", "checkpoint", "--learning_rate", "0.00123",
    ])
    # Steps 1 and 2 push the output folder and the checkpoint (as last-checkpoint); the end pushes the folder.
    assert [path for path, _ in uploads] == [None, "last-checkpoint", None, "last-checkpoint", None]
    for _, files in uploads:
        assert "training_args.json" in files and "model.safetensors" in files
        assert not [name for name in files if name.endswith((".bin", ".pkl", ".pickle"))], files
    saved = [path.relative_to(output_dir) for path in output_dir.rglob("*") if path.is_file()]
    assert not [path for path in saved if path.suffix in (".bin", ".pkl", ".pickle")], saved
    for folder in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        arguments = json.loads((folder / "training_args.json").read_text())
        assert arguments["learning_rate"] == 0.00123 and arguments["hub_model_id"] == "me/tiny"


def test_the_pipeline_loads_safetensors_only(bin_only_folder, tmp_path):
    from crobim_u import referring_segmentation_pipeline

    make_processor().save_pretrained(bin_only_folder)
    # transformers wraps the OSError of each model class it tried into one ValueError.
    with pytest.raises(ValueError, match=r"no file named model\.safetensors found"):
        referring_segmentation_pipeline(str(bin_only_folder))
    model = tiny_model()
    model.save_pretrained(tmp_path)
    make_processor().save_pretrained(tmp_path)
    prediction = referring_segmentation_pipeline(str(tmp_path))(np.zeros((20, 30, 3), np.uint8), "the red car")
    assert prediction["mask"].size == (30, 20)
