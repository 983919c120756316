"""Launch scripts and paper configs: shell syntax, flags the trainer accepts with the spec's values, SLURM launch line.

No SLURM here: the sbatch script runs against stand-ins for ``scontrol`` and ``srun`` that record their arguments.
"""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_grace.config import parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "examples" / "configs"
SBATCH = REPO / "examples" / "slurm" / "pretrain_grace.sbatch"
DEMO_CONFIG = CONFIG_DIR / "smollm2-cpu-demo.sh"
# The paper configs (the demo and the files they source are not configs of a paper run).
CONFIGS = sorted(path for path in CONFIG_DIR.glob("*.sh")
                 if path.name not in {"paper_defaults.sh", "last_flag_value.sh", DEMO_CONFIG.name})
BASELINE_CONFIGS = [path for path in CONFIGS if path.stem.endswith(("-infonce", "-simcse"))]
GRACE_CONFIGS = [path for path in CONFIGS if path not in BASELINE_CONFIGS]
SHELL_SCRIPTS = sorted([*REPO.glob("examples/**/*.sh"), *REPO.glob("examples/**/*.sbatch"), *REPO.glob("*.sh"),
                        *REPO.glob("tools/**/*.sh"), *REPO.glob("benchmarks/**/*.sh")])
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def parsed(argv: list[str]) -> SimpleNamespace:
    """Every flag's value after parsing (``GraceConfig.flat()``), and ``.config``: the config tree."""
    config = parse_args(argv)
    return SimpleNamespace(**config.flat(), config=config)


def config_args(config: Path, **env) -> list[str]:
    """GRACE_ARGS of a config, sourced under ``set -euo pipefail`` as the launchers do, one element per NUL."""
    script = 'set -euo pipefail; source "$1"; printf "%s\\0" "${GRACE_ARGS[@]}"'
    completed = subprocess.run([BASH, "-c", script, "_", str(config)], capture_output=True, cwd=REPO, timeout=30,
                               env={"PATH": os.environ["PATH"], **env})
    assert completed.returncode == 0, completed.stderr.decode()
    return completed.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: str(path.relative_to(REPO)))
def test_shell_syntax(script):
    completed = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_configs_and_sbatch():
    scripts = [SBATCH, *sorted(CONFIG_DIR.glob("*.sh"))]
    completed = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=REPO,
                               timeout=60)
    assert completed.returncode == 0, completed.stdout


def test_all_paper_backbones_have_a_config():
    names = {path.name for path in CONFIGS}
    assert {"qwen2.5-1.5b-instruct.sh", "qwen2.5-3b-instruct.sh", "llama-3.2-3b-instruct.sh",
            "qwen3-4b-instruct-2507.sh", "qwen2.5-1.5b-instruct-unsup.sh"} <= names


@pytest.mark.parametrize("config", GRACE_CONFIGS, ids=lambda path: path.name)
def test_config_has_the_spec_values_and_a_valid_layout(config):
    args = parsed(config_args(config))
    # Hyperparameters from docs/algorithm.md.
    assert (args.global_batch_size, args.rollout_n, args.ppo_mini_batch_size, args.ppo_epochs) == (64, 8, 16, 1)
    assert (args.max_prompt_length, args.max_response_length) == (1024, 2048)
    assert (args.lr, args.lr_warmup_iters, args.weight_decay, args.clip_grad, args.bf16) == (1e-6, 0, 0.01, 1.0, True)
    assert (args.reward_variant, args.reward_temperature) == ("code", 0.1)
    assert (args.clustering_weight, args.cross_group_weight) == (0.2, 0.2)
    assert (args.kl_coef, args.entropy_coef, args.norm_adv_by_std) == (0.0, 0.0, False)
    assert (args.clip_ratio_low, args.clip_ratio_high, args.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert (args.query_temperature, args.rollout_temperature) == (0.5, 1.0)
    assert (args.train_iters, args.save_interval) == (1000, 100)
    assert args.save == args.load  # rerunning resumes
    assert args.train_mode == ("unsupervised" if "unsup" in config.name else "supervised")
    # The layout the README promises: one and two 8-GPU nodes (TP2 configs also four) pass the trainer's checks.
    nodes = (1, 2, 4) if args.tensor_model_parallel_size == 2 else (1, 2)
    for node_count in nodes:
        args.config.validate(world_size=8 * node_count, read_model_config=False)


def test_baseline_configs_share_one_set_of_settings():
    """The paper table's contrastive baselines for Qwen2.5-1.5B: InfoNCE on the supervised data, SimCSE on the
    unsupervised sentences, both from BASELINE_PAPER_ARGS (paper_defaults.sh) and the GRACE configs' model and data."""
    assert {path.name for path in BASELINE_CONFIGS} == {"qwen2.5-1.5b-instruct-infonce.sh",
                                                         "qwen2.5-1.5b-instruct-simcse.sh"}
    grace = {mode: parsed(config_args(CONFIG_DIR / name)) for mode, name in
             (("supervised", "qwen2.5-1.5b-instruct.sh"), ("unsupervised", "qwen2.5-1.5b-instruct-unsup.sh"))}
    for config in BASELINE_CONFIGS:
        args = parsed(config_args(config))
        algorithm = "infonce" if "infonce" in config.name else "simcse"
        assert args.algorithm == algorithm
        assert args.train_mode == ("supervised" if algorithm == "infonce" else "unsupervised")
        assert (args.global_batch_size, args.train_iters, args.max_prompt_length) == (256, 1000, 1024)
        assert (args.lr, args.weight_decay, args.clip_grad, args.bf16) == (1e-5, 0.01, 1.0, True)
        assert args.contrastive_temperature == 0.05
        assert args.hidden_dropout == (0.1 if algorithm == "simcse" else 0.0)
        assert (args.hf_model, args.train_data) == (grace[args.train_mode].hf_model, grace[args.train_mode].train_data)
        assert args.save == args.load and args.save.startswith(f"runs/{algorithm}-")
        for node_count in (1, 2):
            args.config.validate(world_size=8 * node_count, read_model_config=False)


# The flags the committed study (results/quality_smollm2_cpu/) was made with, before the demo's values moved into
# examples/configs/smollm2-cpu-demo.sh: the study script must still give each run exactly these.
STUDY_GRACE_FLAGS = ["--seed", "1234", "--max-prompt-length", "256", "--train-iters", "16", "--global-batch-size", "4",
                     "--ppo-mini-batch-size", "1", "--rollout-n", "4", "--micro-batch-size", "4",
                     "--max-response-length", "128", "--rollout-temperature", "0.7", "--lr", "1e-5", "--kl-coef",
                     "0.04", "--save-interval", "8", "--sample-interval", "1"]
STUDY_INFONCE_FLAGS = ["--seed", "1234", "--max-prompt-length", "256", "--algorithm", "infonce", "--train-iters", "20",
                       "--global-batch-size", "16", "--micro-batch-size", "8", "--lr", "1e-5"]


def test_quality_study_runs_the_flags_its_results_were_made_with(tmp_path):
    """The study sources the demo config and adds its own step count and learning rate: every run's parsed settings
    equal those of the flags it was run with (so the committed results stay reproducible from the script)."""
    completed = subprocess.run([BASH, "results/quality_smollm2_cpu/run_study.sh", str(tmp_path / "work")], cwd=REPO,
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, DRY_RUN=str(tmp_path), PYTHON=sys.executable))
    assert completed.returncode == 0, completed.stderr
    expected = {"grace-code": [*STUDY_GRACE_FLAGS, "--reward-variant", "code"],
                "grace-per-rollout": [*STUDY_GRACE_FLAGS, "--reward-variant", "per-rollout"],
                "infonce": STUDY_INFONCE_FLAGS}
    assert {path.stem for path in tmp_path.glob("*.args")} == set(expected)
    for name, flags in expected.items():
        argv = (tmp_path / f"{name}.args").read_text().split("\0")[:-1]
        save = ["--save", str(tmp_path / "work" / name), "--load", str(tmp_path / "work" / name),
                "--export-hf", str(tmp_path / "work" / "models" / name)]
        assert parsed(argv).config == parsed([*flags, *save]).config, name


def test_demo_config_is_the_main_jobs_settings():
    """What the README's main job trains with: 8 steps of 4 prompts x 4 rollouts on the embedded model, a quarter
    batch per optimizer step, the KL term for GRPO only, the per-rollout reward variant."""
    args = parsed(config_args(DEMO_CONFIG))
    assert (args.train_iters, args.global_batch_size, args.rollout_n, args.ppo_mini_batch_size) == (8, 4, 4, 1)
    assert (args.max_prompt_length, args.max_response_length, args.rollout_temperature) == (256, 128, 0.7)
    assert (args.lr, args.kl_coef, args.seed, args.save) == (2e-5, 0.04, 1234, "runs/grace-smollm2-supervised")
    assert args.reward_variant == "per-rollout"  # the variant that keeps the margin rising (issue 32); papers: code
    assert args.export_hf == "runs/grace-smollm2-supervised/hf"
    assert parsed(config_args(DEMO_CONFIG, TRAIN_MODE="unsupervised")).save == "runs/grace-smollm2-unsupervised"


def test_config_paths_follow_the_environment(tmp_path):
    argv = config_args(CONFIG_DIR / "qwen2.5-3b-instruct.sh", HF_MODEL="/models/qwen 3b", TRAIN_DATA="/d/t.jsonl",
                       SAVE_DIR=str(tmp_path / "run dir"), WANDB_PROJECT="grace")
    args = parsed(argv)
    assert args.hf_model == "/models/qwen 3b" and args.train_data == "/d/t.jsonl"
    assert args.save == args.load == str(tmp_path / "run dir")
    assert args.export_hf == str(tmp_path / "run dir" / "hf")
    assert args.wandb_project == "grace"
    assert "--wandb-project" not in config_args(CONFIG_DIR / "qwen2.5-3b-instruct.sh")


def write_stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_sbatch(tmp_path, *extra, **env):
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir(exist_ok=True)
    # More host names than a pipe buffer holds, so `head -n1` exits while scontrol still writes (SIGPIPE).
    write_stand_in(stand_ins, "scontrol", 'for i in $(seq -w 1 20000); do echo "gpu-node-$i"; done\n')
    write_stand_in(stand_ins, "srun", f'printf "%s\\0" "$@" > "{tmp_path}/srun_args"\n')
    environment = {
        "PATH": f"{stand_ins}:{os.environ['PATH']}", "HOME": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "grace",
        "SLURM_JOB_NODELIST": "gpu-node-[01-02]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64", "LOG_ROOT": str(tmp_path / "logs"), **env,
    }
    return subprocess.run([BASH, str(SBATCH), *extra], capture_output=True, text=True, timeout=60, env=environment)


def test_sbatch_launches_one_torchrun_per_node_with_rendezvous(tmp_path):
    completed = run_sbatch(tmp_path, "--train-iters", "7", "--wandb-exp-name", "my run",
                           CONFIG="examples/configs/qwen3-4b-instruct-2507.sh", PYTHON="/venv/bin/python")
    assert completed.returncode == 0, completed.stderr
    argv = (tmp_path / "srun_args").read_text().split("\0")[:-1]
    torchrun_at = argv.index("/venv/bin/python")
    srun_options, torchrun = argv[:torchrun_at], argv[torchrun_at:]
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"} <= set(srun_options)
    assert f"--output={tmp_path}/logs/grace-4242/node%n-%N.log" in srun_options

    def value(flag):
        return torchrun[torchrun.index(flag) + 1]

    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert value("--nnodes") == "2" and value("--nproc-per-node") == "8"
    assert value("--rdzv-backend") == "c10d" and value("--rdzv-id") == "4242.0"
    assert value("--rdzv-endpoint") == f"gpu-node-00001:{20000 + 4242 % 20000}"
    train_argv = torchrun[torchrun.index("megatron_grace.train") + 1:]
    assert train_argv[:len(config_args(CONFIG_DIR / "qwen3-4b-instruct-2507.sh"))] == \
        config_args(CONFIG_DIR / "qwen3-4b-instruct-2507.sh")
    assert train_argv[-4:] == ["--train-iters", "7", "--wandb-exp-name", "my run"]  # passthrough, last so it wins
    assert parsed(train_argv).train_iters == 7

    log_dir = tmp_path / "logs" / "grace-4242"
    launch = (log_dir / "launch.txt").read_text()
    assert "rendezvous gpu-node-00001:24242" in launch and "qwen3-4b-instruct-2507.sh" in launch
    assert (log_dir / "qwen3-4b-instruct-2507.sh").is_file()


def test_sbatch_dry_run_and_errors(tmp_path):
    completed = run_sbatch(tmp_path, DRY_RUN="1")
    assert completed.returncode == 0, completed.stderr
    assert not (tmp_path / "srun_args").exists()
    assert "qwen2.5-1.5b-instruct.sh" in completed.stdout and "--rdzv-backend c10d" in completed.stdout

    missing = run_sbatch(tmp_path, CONFIG="examples/configs/nope.sh")
    assert missing.returncode == 1 and "config examples/configs/nope.sh not found" in missing.stderr
    outside = run_sbatch(tmp_path, GRACE_ROOT=str(tmp_path))
    assert outside.returncode == 1 and "not the megatron-grace repository" in outside.stderr


def test_command_line_overrides_what_a_config_turns_on_and_where_it_writes(tmp_path):
    """Flags after the config's (the launchers pass "$@" last): --no-bf16 turns bf16 off, and a later --save moves
    the HF export (and TensorBoard's default, <save>/tensorboard, which metrics.py derives from --save)."""
    from megatron_grace.metrics import tensorboard_dir

    config = CONFIG_DIR / "qwen2.5-1.5b-instruct.sh"
    default = parsed(config_args(config))
    assert default.bf16 and default.export_hf == str(Path(default.save) / "hf")
    moved = tmp_path / "elsewhere"
    args = parsed([*config_args(config), "--no-bf16", "--save", str(moved)])
    assert not args.bf16
    assert args.export_hf == str(moved / "hf") and tensorboard_dir(args.config.logging, args.save) == moved / "tensorboard"
    explicit = parsed([*config_args(config), "--save", str(moved), "--export-hf", str(tmp_path / "hf"),
                           "--tensorboard-dir", str(tmp_path / "tb")])
    assert explicit.export_hf == str(tmp_path / "hf") and tensorboard_dir(explicit.config.logging, explicit.save) == tmp_path / "tb"


def test_export_under_save_needs_save():
    with pytest.raises(SystemExit, match="--export-hf without a folder exports under --save"):
        parse_args(["--export-hf"]).validate(world_size=1)
