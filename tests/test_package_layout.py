"""The package's layers: each folder imports only the parts below it, so a change to a stage stays in its folder and
no import cycle can form. Read from the source (AST), so a new import is checked without running it."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_grace"

# What each folder may import from megatron_grace (besides itself). The model families are the bottom of the stack
# (a checkpoint holds a model, never the other way round); the rollout engine serves GRPO and the encoder alike;
# evaluation is apart from training.
ALLOWED = {
    "kernels": set(),  # the top-level kernels/ folder, installed as megatron_grace.kernels
    "models": {"config", "platform", "utils"},
    "data": {"config"},
    "checkpointing": {"config", "models", "utils", "fault_injection", "platform"},
    "rollout": {"config", "kernels", "models", "platform", "utils"},
    "eval": {"", "config", "data", "kernels", "utils", "default_model"},
    "grpo": {"config", "data", "kernels", "rollout", "platform", "schedule", "optim", "metrics", "fault_injection"},
}


def internal_imports(path: Path, package: str) -> set[str]:
    """The first name below ``megatron_grace`` of every module that ``path``, a file directly in ``package``'s
    folder, imports (``""`` for a name of the package itself, like ``sample_data_dir``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = ["megatron_grace", package][: 3 - node.level] if node.level else []
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target[0] != "megatron_grace":
                continue
            if len(target) > 1:
                names.add(target[1])
            else:  # from megatron_grace import x: x is a module, a folder or a name of the package itself
                names.update(alias.name if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()
                             else "" for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "megatron_grace":
                    names.add(parts[1] if len(parts) > 1 else "")
    return names - {package}


def folder_files(package: str) -> list[Path]:
    folder = REPO / "kernels" if package == "kernels" else PACKAGE / package
    return sorted(folder.glob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_folder_imports_only_the_layers_below_it(package):
    files = folder_files(package)
    assert files, package
    for path in files:
        extra = internal_imports(path, package) - ALLOWED[package]
        assert not extra, f"{path.relative_to(REPO)} imports megatron_grace.{sorted(extra)}: not below {package}/"


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    """The checker itself: a file of models/ that imported checkpointing either way would be caught."""
    source = tmp_path / "models" / "convert.py"
    source.parent.mkdir()
    for line, expected in [("from ..checkpointing import save_checkpoint", {"checkpointing"}),
                           ("from megatron_grace.checkpointing.hf_conversion import export_to_hf", {"checkpointing"}),
                           ("import megatron_grace.train", {"train"}),
                           ("from .state_dict import mcore_to_hf", set()),
                           ("from . import llama", set())]:
        source.write_text(line + "\n")
        assert internal_imports(source, "models") == expected, line
