"""Console scripts: every ``grace-*`` command that setup.py declares is installed, runs, and is the same function as
the tool it stands for (``python -m megatron_grace.train`` or ``python tools/<name>.py``)."""
import importlib
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The scripts as setup.py declares them (read from the file, so a script added there is tested here too).
DECLARED = dict(re.findall(r'"(grace-[a-z-]+) = ([\w.]+:\w+)"', (REPO / "setup.py").read_text()))
TOOL_FILES = {"grace-convert": "convert_hf.py", "grace-eval": "eval_mteb.py", "grace-report": "report.py",
              "grace-explain": "explain.py", "grace-plot": "plot_metrics.py", "grace-prepare-data": "prepare_data.py"}


def test_every_tool_has_a_console_script():
    assert set(DECLARED) == {"grace-train", *TOOL_FILES}
    for name, tool in TOOL_FILES.items():
        module = DECLARED[name].split(":")[0]
        assert f"from {module} import main" in (REPO / "tools" / tool).read_text(), name


def test_every_tool_is_a_thin_wrapper_of_its_cli_module():
    """The code of each ``tools/<name>.py`` lives in ``megatron_grace/cli/<name>.py`` (one home for entry points);
    the file only keeps ``python tools/<name>.py`` working and says so."""
    tools = sorted(path for path in (REPO / "tools").glob("*.py") if path.name != "__init__.py")
    assert len(tools) == 8, [path.name for path in tools]
    for path in tools:
        text = path.read_text()
        assert (REPO / "megatron_grace" / "cli" / path.name).is_file(), path.name
        assert f"from megatron_grace.cli.{path.stem} import main" in text, path.name
        assert f"this file keeps ``python tools/{path.name}`` working" in text, path.name
        assert len(text.splitlines()) <= 12, f"{path.name}: code belongs in megatron_grace/cli/{path.name}"


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_console_script_is_installed_and_runs(name):
    module_name, function = DECLARED[name].split(":")
    assert callable(getattr(importlib.import_module(module_name), function))
    script = Path(sysconfig.get_path("scripts")) / name
    if not script.is_file():
        script = Path(sys.executable).parent / name
    assert script.is_file(), f"{name} not installed: pip install -e . again after setup.py changed"
    completed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    program = {"grace-train": "python -m megatron_grace.train"}.get(name, name)  # the trainer names its usage
    assert completed.stdout.startswith(f"usage: {program} "), completed.stdout[:200]
