"""A non-editable install works: the wheel built from this checkout, installed into a fresh virtual environment,
trains one GRACE step on the embedded default model with the default training data, from a folder outside the
checkout (so nothing can be found through the source tree).

The fresh environment gets the wheel alone; its dependencies come from the test environment through a ``.pth`` line
(no network, no second torch). A path named in a ``.pth`` file is not itself processed as a site directory, so the
test environment's editable install of megatron-grace stays invisible there.
"""
import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command, **kwargs):
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert completed.returncode == 0, f"{command}\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed


def test_wheel_trains_one_step_on_the_embedded_default_outside_the_checkout(tmp_path):
    wheel_dir = tmp_path / "wheel"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         str(REPO)], timeout=300)
    (wheel,) = wheel_dir.glob("megatron_grace-*.whl")

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             timeout=60).stdout.strip())
    (site_packages / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A world of its own: a rendezvous left in this process's environment by an earlier in-process test would point
    # the trainer at a port that process still holds.
    inherited = {"PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    env = {key: value for key, value in os.environ.items() if key not in inherited}
    env.update(OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    located = run([str(python), "-c", "import megatron_grace, megatron_grace.kernels as k; "
                   "print(megatron_grace.__file__); print(k.__path__[0])"], cwd=elsewhere, env=env, timeout=120)
    package_file, kernels_dir = located.stdout.split()
    assert Path(package_file).is_relative_to(site_packages), package_file
    assert Path(kernels_dir) == site_packages / "megatron_grace" / "kernels"

    run_dir = elsewhere / "run"
    run([str(python), "-m", "megatron_grace.train", "--train-iters", "1", "--global-batch-size", "1",
         "--ppo-mini-batch-size", "1", "--rollout-n", "2", "--micro-batch-size", "2", "--max-prompt-length", "128",
         "--max-response-length", "8", "--sample-interval", "0", "--no-report", "--save", str(run_dir)],
        cwd=elsewhere, env=env, timeout=900)
    args = json.loads((run_dir / "args.json").read_text())
    assert Path(args["train_data"]) == site_packages / "megatron_grace" / "sample_data" / "train_supervised.jsonl"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
