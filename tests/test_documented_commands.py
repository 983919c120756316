"""Every command line the README and ``examples/`` document runs (a documented command is a promise).

The commands are read from the documents themselves: the ``bash`` blocks of ``README.md`` and the READMEs under
``examples/``, and the usage lines at the top of the launch scripts. ``HOW`` says for each how it is checked here, so a
command added to a document fails :func:`test_every_documented_command_is_checked` until it is given a way to run:

* ``run``: executed as written through bash, with placeholders (``HF_DIR``, ``runs/...``) pointed at a temporary
  folder and, for training, a tiny model and one step appended last (the launchers pass the user's flags last, so
  they win); each must exit 0 and train / write what it promises;
* ``argv``: a launcher line whose full run needs more processes than this machine has: the launcher runs with a
  stand-in Python that records the trainer's argv, which must pass the trainer's checks at the documented world size;
* ``elsewhere``: run by another test (named), or by CI itself;
* ``not here``: needs what no CI machine has (a GPU, the Hugging Face Hub), with the reason.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grace import sample_data_dir
from megatron_grace.config import parse_args
from megatron_grace.testing import save_tiny_hf_model
from megatron_grace.utils import free_port

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "examples/configs/README.md", "examples/slurm/README.md", "examples/data/README.md"]
SCRIPTS = ["examples/pretrain_grace.sh", "examples/pretrain_grace_unsup.sh", "examples/slurm/pretrain_grace.sbatch"]

LAUNCH = "bash examples/pretrain_grace.sh"
HOW = {
    "pip install torch==2.13.0": ("elsewhere", ".ci/run (tools/setup_venv.sh pins it first)"),
    "pip install -e .": ("elsewhere", ".ci/run (tools/setup_venv.sh: pip install -e .[test,eval])"),
    'pip install -e ".[gpu]"': ("not here", "Transformer Engine and flash-attn need CUDA"),
    "bash .ci/run": ("elsewhere", "CI runs it"),
    "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=2 python -m pytest -q tests":
        ("elsewhere", ".ci/run runs this command"),
    "python -m megatron_grace.default_model": ("run", {}),
    "python tools/convert_hf.py hf-to-mcore --hf-path HF_DIR --save MCORE_DIR": ("run", {}),
    "python tools/convert_hf.py mcore-to-hf --load MCORE_DIR --save HF_DIR": ("run", {}),
    "bash benchmarks/gpu_check.sh --dry-run": ("elsewhere", "tests/test_gpu_check.py"),
    "bash benchmarks/gpu_check.sh": ("not here", "needs a GPU (its --dry-run runs in tests/test_gpu_check.py)"),
    LAUNCH: ("run", {}),
    "bash examples/pretrain_grace_unsup.sh": ("run", {}),
    "bash examples/pretrain_grace.sh --train-iters 20 --save runs/mine": ("run", {}),
    f"CONFIG=examples/configs/qwen2.5-3b-instruct.sh {LAUNCH}": ("run", {"NPROC_PER_NODE": "2"}),
    f"NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 {LAUNCH}":
        ("argv", "two nodes of 8 (tests/test_launchers.py runs two real nodes of 2 processes)"),
    "sbatch --export=ALL,CONFIG=examples/configs/qwen2.5-3b-instruct.sh examples/slurm/pretrain_grace.sbatch":
        ("elsewhere", "tests/test_launchers.py (a real sbatch job) and tests/test_example_scripts.py (its srun line)"),
    "sbatch --nodes=2 --export=ALL,CONFIG=examples/configs/qwen3-4b-instruct-2507.sh,SAVE_DIR=/scratch/grace-4b "
    "examples/slurm/pretrain_grace.sbatch --train-iters 500":
        ("elsewhere", "tests/test_example_scripts.py::test_sbatch_launches_one_torchrun_per_node_with_rendezvous"),
    f"{LAUNCH} --algorithm infonce --lr 1e-5 --train-iters 20 --save runs/infonce-smollm2": ("run", {}),
    f"TRAIN_MODE=unsupervised {LAUNCH} --algorithm simcse --lr 1e-5 --save runs/simcse-smollm2": ("run", {}),
    f"CONFIG=examples/configs/qwen2.5-1.5b-instruct-infonce.sh {LAUNCH}": ("run", {}),
    'source examples/configs/qwen2.5-3b-instruct.sh && torchrun --nproc-per-node 8 -m megatron_grace.train '
    '"${GRACE_ARGS[@]}"': ("argv", "8 processes"),
    "huggingface-cli download Qwen/Qwen2.5-3B-Instruct --local-dir models/Qwen2.5-3B-Instruct":
        ("not here", "the Hugging Face Hub is unreachable from CI"),
    "python tools/prepare_data.py e5.jsonl --mode supervised --hf-model models/Qwen2.5-3B-Instruct "
    "--output-dir data/e5": ("run", {}),
    "python tools/prepare_data.py wiki1m_for_simcse.txt --mode unsupervised --hf-model models/Qwen2.5-1.5B-Instruct "
    "--output-dir data/wiki1m": ("run", {}),
    "touch runs/grace-qwen2.5-3b-instruct-sup/exit_requested":
        ("elsewhere", "tests/test_planned_exit.py (the request file on two ranks)"),
    "scancel --signal=USR1 --batch JOBID": ("elsewhere", "tests/test_launchers.py (a real SLURM job, requeued)"),
    f"{LAUNCH} --exit-duration-in-mins 230": ("run", {}),
    "python tools/build_sample_data.py": ("not here", "downloads Debian's wordnet-base (apt-get download)"),
    "python tools/build_sample_data.py --wordnet-dir /usr/share/wordnet":
        ("elsewhere", "tests/test_data.py (its parser on WordNet lines); needs a WordNet installation to run whole"),
}


def documented_commands() -> list[str]:
    """Command lines of the documents' bash blocks and of the scripts' usage comments, continuation lines joined,
    comments, optional ``[...]`` parts and a trailing ``...`` removed."""
    lines = []
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", (REPO / document).read_text(), re.S):
            lines += block.splitlines()
    for script in SCRIPTS:
        for line in (REPO / script).read_text().splitlines()[1:]:
            if not line.startswith("#"):
                break
            usage = re.match(r"#\s{2,}((?:[A-Z_]+=\S+ )*(?:bash|sbatch|python) .*)", line)
            if usage:
                lines.append(usage.group(1))
    commands, pending = [], ""
    for line in lines:
        line = re.sub(r"(^|\s{2,})#.*$", "", line).strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        line = re.sub(r"\s+\[(?:--|extra )[^\]]*\]", "", line)  # optional parts: [--flag ...], [extra ...]
        line = re.sub(r"\s+\.\.\.$", "", line).strip()
        if line and line not in commands:
            commands.append(line)
    return commands


def test_every_documented_command_is_checked():
    commands = documented_commands()
    assert len(commands) > 20
    unchecked = [command for command in commands if command not in HOW]
    assert not unchecked, f"documented commands without a check in HOW: {unchecked}"
    stale = [command for command in HOW if command not in commands]
    assert not stale, f"HOW lists commands no document has any more: {stale}"


# ---------------------------------------------------------------------------------------------------- argv checks
def recorded_trainer_argv(tmp_path: Path, command: str) -> tuple[list[str], int]:
    """Run a launcher line with a stand-in Python; returns the trainer's argv and the world size torchrun got."""
    record = tmp_path / "argv"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/bash\n[[ $1 == -c ]] && exit 0\nprintf "%s\\0" "$@" > "{record}"\n')
    stand_in.chmod(0o755)
    torchrun = tmp_path / "torchrun"
    torchrun.write_text(f'#!/bin/bash\nexec "{stand_in}" -m torch.distributed.run "$@"\n')
    torchrun.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stand_in), PATH=f"{tmp_path}:{os.environ['PATH']}", SAVE_DIR=str(tmp_path / "r"))
    completed = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    argv = record.read_text().split("\0")[:-1]
    trainer = argv[argv.index("megatron_grace.train") + 1:]

    def distributed(flag, default):
        return int(argv[argv.index(flag) + 1]) if flag in argv else default

    return trainer, distributed("--nproc-per-node", 1) * distributed("--nnodes", 1)


@pytest.mark.parametrize("command", [c for c, how in HOW.items() if how[0] == "argv"])
def test_launcher_lines_give_the_trainer_valid_flags(tmp_path, command):
    argv, world_size = recorded_trainer_argv(tmp_path, command)
    assert world_size == 16 if "NNODES=2" in command else world_size == 8
    parse_args(argv).validate(world_size=world_size, read_model_config=False)


@pytest.mark.parametrize("extra, nproc, expected", [
    # The README's baseline line: the demo's GRPO-only KL default must not reach InfoNCE.
    (["--algorithm", "infonce", "--lr", "1e-5"], 1, {"kl_coef": 0.0, "algorithm": "infonce"}),
    # A global batch of 2 on 2 ranks: the demo's mini-batch of a quarter batch would not divide over 2 ranks.
    (["--global-batch-size", "2"], 2, {"ppo_mini_batch_size": 2, "kl_coef": 0.04}),
    (["--global-batch-size", "8"], 2, {"ppo_mini_batch_size": 2}),
    (["--global-batch-size=16", "--tensor-model-parallel-size", "2"], 4, {"ppo_mini_batch_size": 4}),
    ([], 1, {"ppo_mini_batch_size": 1, "kl_coef": 0.04, "global_batch_size": 4}),  # the main job: 4 updates a step
    (["--ppo-mini-batch-size", "4"], 1, {"ppo_mini_batch_size": 4}),  # the user's value wins
])
def test_demo_defaults_follow_the_users_flags(tmp_path, extra, nproc, expected):
    command = f"NPROC_PER_NODE={nproc} {LAUNCH} {shlex.join(extra)}"
    argv, world_size = recorded_trainer_argv(tmp_path, command)
    config = parse_args(argv)
    config.validate(world_size=world_size, read_model_config=False)
    flat = config.flat()
    assert {key: flat[key] for key in expected} == expected


# ---------------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("documented")
    return root, save_tiny_hf_model("qwen2", root / "tiny", smollm2_tokenizer_dir)


def run_command(command: str, tmp: Path, model: Path, extra_env: dict) -> subprocess.CompletedProcess:
    """Placeholders to temporary paths; a training line gets the tiny model and one step appended."""
    substitutions = {"HF_DIR": str(tmp / "hf_out" if "mcore-to-hf" in command else model),
                     "MCORE_DIR": str(tmp / "mcore"), "runs/": f"{tmp}/runs/", "data/": f"{tmp}/data/",
                     "models/Qwen2.5-3B-Instruct": str(model), "models/Qwen2.5-1.5B-Instruct": str(model),
                     "e5.jsonl": str(sample_data_dir() / "train_supervised.jsonl"),
                     "wiki1m_for_simcse.txt": str(sample_data_dir() / "train_unsupervised.txt")}
    for placeholder, value in substitutions.items():
        command = command.replace(placeholder, value)
    if "examples/pretrain_grace" in command:
        run_dir = tmp / "run"
        command += (f" --hf-model {model} --train-iters 1 --max-response-length 8 --max-prompt-length 128"
                    f" --sample-interval 0 --no-report --log-interval 1")
        if "--save" not in command:
            command += f" --save {run_dir} --load {run_dir}"
    # "python" in a documented line is the environment's own, as in an activated virtual environment.
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               MASTER_PORT=str(free_port()), HF_MODEL=str(model), SAVE_DIR=str(tmp / "run"),
               TRAIN_DATA=str(sample_data_dir() / "train_supervised.jsonl"), **extra_env)
    if "unsup" in command or "TRAIN_MODE=unsupervised" in command:
        env["TRAIN_DATA"] = str(sample_data_dir() / "train_unsupervised.txt")
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


RUN = [c for c, how in HOW.items() if how[0] == "run"]
HF_TO_MCORE = "python tools/convert_hf.py hf-to-mcore --hf-path HF_DIR --save MCORE_DIR"


@pytest.mark.parametrize("command", RUN, ids=[re.sub(r"\W+", "_", c)[:60] for c in RUN])
def test_documented_command_runs(tiny, tmp_path, command):
    root, model = tiny
    if command.startswith("python tools/convert_hf.py mcore-to-hf"):  # needs the hf-to-mcore line's output first
        setup = run_command(HF_TO_MCORE, tmp_path, model, {})
        assert setup.returncode == 0, setup.stderr[-3000:]
    completed = run_command(command, tmp_path, model, HOW[command][1])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    if "examples/pretrain_grace" in command:
        saves = [Path(p) for p in re.findall(rf"--save ({re.escape(str(tmp_path))}\S*)", command.replace(
            "runs/", f"{tmp_path}/runs/"))] or [tmp_path / "run"]
        metrics = saves[-1] / "metrics.jsonl"
        assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1], completed.stdout
        assert (saves[-1] / "hf" / "config.json").is_file()
        # The launcher plots the run it trained, wherever --save put it (a config's folder or the user's).
        assert (saves[-1] / "metrics.png").is_file(), completed.stdout[-2000:]
    elif "hf-to-mcore" in command:
        assert (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").is_file()
    elif "mcore-to-hf" in command:
        assert (tmp_path / "hf_out" / "config.json").is_file()
    elif "prepare_data" in command:
        output = tmp_path / "data" / ("e5" if "--mode supervised" in command else "wiki1m")
        assert any(output.glob("train.*")), completed.stdout
    elif "default_model" in command:
        assert (Path(completed.stdout.strip().splitlines()[-1]) / "config.json").is_file()

