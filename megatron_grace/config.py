"""The training configuration: one frozen dataclass per flag group, the single place for every default and every
cross-field check. ``python -m megatron_grace.train``'s parser is built from these fields: a field's name is its
flag's name (``tensor_model_parallel_size`` ↔ ``--tensor-model-parallel-size``, named as in Megatron-LM where
Megatron-LM has the concept and as in verl/TRL for the RL-specific ones), its default the flag's default and its
metadata the flag's help. Components take their group (``config.rollout``), not the whole tree.

:meth:`GraceConfig.validate` runs before any process group or model exists; its errors name the flags. The invalid
combinations it refuses are listed in the README ("Invalid combinations"); ``tests/test_config.py`` checks the two
agree.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import sample_data_dir
from .console import LOG_LEVELS

DEFAULT_TRAIN_DATA = {
    "supervised": sample_data_dir() / "train_supervised.jsonl",
    "unsupervised": sample_data_dir() / "train_unsupervised.txt",
}

ALGORITHMS = ("grace", "infonce", "simcse")  # grace: GRPO; the others: megatron_grace/contrastive.py
CONTRASTIVE_MODES = {"infonce": "supervised", "simcse": "unsupervised"}  # the --train-mode each baseline reads
DEFAULT_SIMCSE_DROPOUT = 0.1  # SimCSE's dropout (Gao et al. 2021): --hidden-dropout's default for simcse

# ``--export-hf`` without a value: the run directory's ``hf/``, resolved after parsing so that a ``--save`` given later
# on the command line (after a config's flags) moves the export with it, as TensorBoard's default does.
EXPORT_UNDER_SAVE = "<save>/hf"


def flag(default, help: str = "", **argparse_options):
    """A config field that is also a command-line flag; ``argparse_options`` go to ``add_argument`` (``type`` is
    the default's type unless given)."""
    return field(default=default, metadata={"help": help, **argparse_options})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class ConfigError(SystemExit):
    """An invalid flag or flag combination; the message names the flags. Exits with status 1 (argparse's own errors
    exit with 2)."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ModelConfig:
    hf_model: str | None = flag(None, "Hugging Face folder of the policy (default: the embedded "
                                      "SmolLM2-135M-Instruct)", type=str)
    bf16: bool = flag(False, "bf16 parameters and activations (fp32 main weights)")
    recompute_activations: bool = flag(False, "full activation recomputation")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1)
    pipeline_model_parallel_size: int = flag(1)
    sequence_parallel: bool = flag(False)
    distributed_timeout_minutes: float = flag(30.0)


@dataclass(frozen=True)
class DataConfig:
    train_data: str | None = flag(None, "jsonl {query, positive, negative} (supervised) or text, one per line "
                                        "(unsupervised); default: the bundled WordNet sample", type=str)
    train_mode: str = flag("supervised", choices=["supervised", "unsupervised"])
    max_prompt_length: int = flag(1024, "templated prompt tokens; longer main prompts are skipped, query/negative "
                                        "prompts cut")
    strict_data: bool = flag(False, "bad rows are errors instead of counted skips")


@dataclass(frozen=True)
class RolloutConfig:
    rollout_n: int = flag(8, "main rollouts per prompt (GRPO group size)")
    rollout_temperature: float = flag(1.0)
    query_temperature: float = flag(0.5, "temperature of the query/anchor and negative rationales")
    max_response_length: int = flag(2048)
    rollout_sync_interval: int = flag(32, "decoded tokens between the host's checks for finished rows (finished "
                                          "rows leave the batch there); the only device-to-host read of the "
                                          "decode loop")
    rollout_decode_step: str = flag("ours", "ours: our decode step on a static KV cache (megatron_grace/rollout/"
                                            "decode_step.py; pipeline-parallel layouts fall back to megatron); "
                                            "megatron: Megatron-Core's inference wrapper", choices=("ours", "megatron"))
    rollout_cuda_graphs: bool = flag(True, "replay our decode step from a CUDA graph per row bucket (GPUs only)")


@dataclass(frozen=True)
class ObjectiveConfig:
    algorithm: str = flag("grace", "grace: GRPO on rationale rollouts; infonce / simcse: the contrastive baselines "
                                   "on the same model, data and pooling without rationales "
                                   "(megatron_grace/contrastive.py)", choices=ALGORITHMS)
    contrastive_temperature: float = flag(0.05, "τ of the InfoNCE loss of --algorithm infonce / simcse")
    hidden_dropout: float | None = flag(None, f"dropout on the hidden states (default {DEFAULT_SIMCSE_DROPOUT} for "
                                              f"simcse, 0 otherwise; grace needs 0)", type=float)
    reward_variant: str = flag("code", "code: the reference code's terms; paper: several negatives summed; "
                                       "per-rollout: negatives and cross-group term measured against each rollout, "
                                       "so they reach the advantage (see kernels/grace_rewards.py)",
                               choices=["code", "paper", "per-rollout"])
    reward_temperature: float = flag(0.1, "τ: similarities are divided by it")
    clustering_weight: float = flag(0.2, "λ1")
    cross_group_weight: float = flag(0.2, "λ2")
    length_penalty: float = flag(-1.0, "reward of a response that hit --max-response-length without EOS")
    norm_adv_by_std: bool = flag(False, "divide GRPO advantages by the group std")
    clip_ratio_low: float = flag(0.2)
    clip_ratio_high: float = flag(0.2)
    clip_ratio_c: float = flag(3.0, "dual-clip bound for negative advantages")
    kl_coef: float = flag(0.0, "low-variance KL to the initial policy; > 0 loads a frozen reference model")
    entropy_coef: float = flag(0.0)


@dataclass(frozen=True)
class TrainingConfig:
    train_iters: int = flag(1000, "GRPO steps (rollout batches)")
    global_batch_size: int = flag(64, "prompts per GRPO step, all DP ranks")
    ppo_mini_batch_size: int = flag(16, "prompts per optimizer step; global-batch-size / ppo-mini-batch-size "
                                        "steps per rollout")
    ppo_epochs: int = flag(1)
    micro_batch_size: int = flag(4, "sequences per forward/backward micro-batch")
    seed: int = flag(1234)
    max_nonfinite_steps: int = flag(3, "consecutive steps skipped for NaN/Inf before the run stops")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = flag(1e-6)
    lr_warmup_iters: int = flag(0, "linear warm-up in optimizer steps")
    weight_decay: float = flag(0.01)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    clip_grad: float = flag(1.0)


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = flag(None, "run directory: checkpoints, metrics.jsonl, samples", type=str)
    save_interval: int | None = flag(None, type=int)
    load: str | None = flag(None, "resume from the latest checkpoint in this directory (missing/empty: start "
                                  "fresh)", type=str)
    load_optim: bool = flag(True, "load the optimizer state (--no-load-optim: weights only)")
    fallback_to_previous_checkpoint: bool = flag(False, "if the latest checkpoint is corrupt, resume from the "
                                                        "newest complete older one")
    export_hf: str | None = flag(None, "write an HF folder of the final policy to DIR (no value: <save>/hf)",
                                 type=str, nargs="?", const=EXPORT_UNDER_SAVE, metavar="DIR")
    # Planned exits (Megatron-LM's flags; megatron_grace/planned_exit.py): finish the step in flight, save it, exit 0.
    exit_signal_handler: bool = flag(False, "SIGTERM or SIGUSR1 on any rank requests a planned exit (the request "
                                            "file <save>/exit_requested always does)")
    exit_duration_in_mins: float | None = flag(None, "planned exit once the trainer has run N minutes (set-up "
                                                     "included)", type=float, metavar="N")
    exit_interval: int | None = flag(None, "planned exit after every N-th step (N, 2N, ...)", type=int, metavar="N")
    stop_on_collapse: bool = flag(False, "the rationale collapse alarm (GRPO) is a planned exit, not only a warning")


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = flag(1)
    collapse_window: int = flag(8, "steps per window of the rationale collapse alarm: the last N steps against the "
                                   "run's first N")
    sample_interval: int = flag(10, "print a sample rationale every N steps")
    tensorboard_dir: str | None = flag(None, "default: <save>/tensorboard", type=str)
    wandb_project: str | None = flag(None, type=str)
    wandb_exp_name: str | None = flag(None, type=str)
    report: bool = flag(True, "write <save>/report.html at the end (curves, samples, configuration)")
    log_level: str | None = flag(None, "info: known-harmless library warnings hidden (default, or "
                                       "$MEGATRON_GRACE_LOG_LEVEL); debug: every warning and library log line",
                                 choices=LOG_LEVELS)


# ---------------------------------------------------------------------------------------------------- the tree
@dataclass(frozen=True)
class GraceConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def flat(self) -> dict:
        """Every flag's value by its field name: ``args.json``, the checkpoint's copy, the run report, wandb."""
        return {f.name: getattr(group, f.name) for group in self.groups() for f in dataclasses.fields(group)}

    def groups(self) -> list:
        return [getattr(self, group.name) for group in dataclasses.fields(self)]

    def replace(self, **flags) -> GraceConfig:
        """A copy with some flags changed, by field name (the group is found)."""
        unknown = set(flags) - set(self.flat())
        if unknown:
            raise TypeError(f"no such flag(s): {sorted(unknown)}")
        changed = {}
        for group_field in dataclasses.fields(self):
            group = getattr(self, group_field.name)
            own = {f.name: flags[f.name] for f in dataclasses.fields(group) if f.name in flags}
            if own:
                changed[group_field.name] = dataclasses.replace(group, **own)
        return dataclasses.replace(self, **changed)

    def validate(self, world_size: int, *, read_model_config: bool = True) -> None:
        """Refuse invalid flags and combinations before launch (:class:`ConfigError` naming the flags): the layout
        against the world size, the batch geometry, each algorithm's requirements, value ranges, and TP/PP against
        the heads and layers of ``--hf-model``'s ``config.json`` (without ``--hf-model`` the model builder checks
        the default model's layout later; ``read_model_config=False`` checks the flags alone, for configs whose
        model folder is not on this machine)."""
        parallel, training, objective = self.parallel, self.training, self.objective
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} × "
                              f"--pipeline-model-parallel-size {pp}")
        dp = world_size // (tp * pp)
        self._check_positive()
        if training.global_batch_size % dp:
            raise ConfigError(f"--global-batch-size {training.global_batch_size} is not divisible by the "
                              f"data-parallel size {dp}")
        if objective.algorithm == "grace":
            self._check_grpo(dp)
        else:
            self._check_contrastive()
        if objective.hidden_dropout is not None and not 0 <= objective.hidden_dropout < 1:
            raise ConfigError(f"--hidden-dropout {objective.hidden_dropout} must be in [0, 1)")
        if parallel.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        checkpoint = self.checkpoint
        if checkpoint.save_interval is not None and (checkpoint.save_interval < 1 or checkpoint.save is None):
            raise ConfigError("--save-interval needs --save and a positive interval")
        exit_flags = {"--exit-signal-handler": checkpoint.exit_signal_handler,
                      "--stop-on-collapse": checkpoint.stop_on_collapse,
                      "--exit-duration-in-mins": checkpoint.exit_duration_in_mins is not None,
                      "--exit-interval": checkpoint.exit_interval is not None}
        if checkpoint.save is None and any(exit_flags.values()):
            raise ConfigError(f"{' / '.join(name for name, given in exit_flags.items() if given)} needs --save: a "
                              f"planned exit saves the last completed step")
        if checkpoint.export_hf == EXPORT_UNDER_SAVE and checkpoint.save is None:
            raise ConfigError("--export-hf without a folder exports under --save: give --save or a folder")
        if read_model_config:
            self._check_layout_against_model()

    def check_training_data(self, num_negatives: int) -> None:
        """The checks that need the training file read (after :meth:`validate`): the negatives its rows carry.
        Raises :class:`~megatron_grace.data.dataset.DataError` naming the file and the flag."""
        from .data.dataset import DataError

        objective, train_data = self.objective, self.data.train_data
        if objective.algorithm == "infonce" and num_negatives == 0:
            raise DataError(f"--algorithm infonce needs hard negatives: the rows of {train_data} have no "
                            f"'negative' field")
        if (objective.algorithm == "grace" and self.data.train_mode == "supervised"
                and objective.reward_variant == "code" and num_negatives > 1):
            raise DataError(f"--reward-variant code scores one negative per query, and the training data "
                            f"({train_data}) has {num_negatives}: use --reward-variant paper or per-rollout")

    def _check_positive(self) -> None:
        positive = {**{name: getattr(self.training, name) for name in ("train_iters", "micro_batch_size",
                                                                      "max_nonfinite_steps")},
                    "max_response_length": self.rollout.max_response_length,
                    "rollout_sync_interval": self.rollout.rollout_sync_interval,
                    "max_prompt_length": self.data.max_prompt_length,
                    **{name: getattr(self.checkpoint, name) for name in ("exit_duration_in_mins", "exit_interval")
                       if getattr(self.checkpoint, name) is not None},
                    "log_interval": self.logging.log_interval,
                    "collapse_window": self.logging.collapse_window,
                    "distributed_timeout_minutes": self.parallel.distributed_timeout_minutes,
                    "reward_temperature": self.objective.reward_temperature,
                    "rollout_temperature": self.rollout.rollout_temperature,
                    "query_temperature": self.rollout.query_temperature}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{flag_name(name)} must be positive, got {value}")

    def _check_grpo(self, dp: int) -> None:
        training, rollout_n = self.training, self.rollout.rollout_n
        mini = training.ppo_mini_batch_size
        if mini < 1 or training.global_batch_size % mini:
            raise ConfigError(f"--global-batch-size {training.global_batch_size} is not divisible by "
                              f"--ppo-mini-batch-size {mini}")
        if mini % dp:
            raise ConfigError(f"--ppo-mini-batch-size {mini} is not divisible by the data-parallel size {dp}")
        if (mini // dp * rollout_n) % training.micro_batch_size:
            raise ConfigError(f"--micro-batch-size {training.micro_batch_size} does not divide the {mini // dp} "
                              f"prompts × {rollout_n} rollouts of a mini-batch on each data-parallel rank")
        if rollout_n < 2:
            raise ConfigError(f"--rollout-n {rollout_n}: GRPO needs at least 2 rollouts per prompt (advantages are "
                              f"relative to the group)")
        if self.objective.hidden_dropout:
            raise ConfigError(f"--hidden-dropout {self.objective.hidden_dropout} with --algorithm grace: the PPO "
                              f"ratio compares the rollout's and the update's log-probs of the same policy, which "
                              f"dropout would make differ")

    def _check_contrastive(self) -> None:
        objective, mode = self.objective, CONTRASTIVE_MODES[self.objective.algorithm]
        if self.data.train_mode != mode:
            raise ConfigError(f"--algorithm {objective.algorithm} trains on {mode} data: give --train-mode {mode} "
                              f"(got {self.data.train_mode})")
        if objective.contrastive_temperature <= 0:
            raise ConfigError("--contrastive-temperature must be positive")
        if objective.hidden_dropout and self.parallel.sequence_parallel:
            raise ConfigError("--hidden-dropout with --sequence-parallel: dropout under sequence parallelism draws "
                              "from Megatron's tensor-parallel RNG tracker, which the replay of the masks does not "
                              "cover")
        if objective.kl_coef > 0 or objective.entropy_coef > 0:
            raise ConfigError("--kl-coef / --entropy-coef are GRPO terms: they need --algorithm grace")

    def _check_layout_against_model(self) -> None:
        if not self.model.hf_model:
            return
        from .models import architecture_from_hf_dir

        arch = architecture_from_hf_dir(self.model.hf_model)
        try:
            arch.check_tensor_parallel(self.parallel.tensor_model_parallel_size)
            arch.check_pipeline_parallel(self.parallel.pipeline_model_parallel_size)
        except ValueError as error:
            raise ConfigError(f"{error} ({self.model.hf_model})") from None


# ---------------------------------------------------------------------------------------------------- the parser
GROUP_TITLES = {"model": "model", "parallel": "parallelism", "data": "data", "rollout": "rollout",
                "objective": "objective", "training": "training", "optim": "optimizer",
                "checkpoint": "checkpointing", "logging": "logging"}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m megatron_grace.train``, one argument group per config group. Every on/off
    flag also has a ``--no-`` form, so that a config's choice can be turned off."""
    parser = argparse.ArgumentParser(prog="python -m megatron_grace.train", allow_abbrev=False,
                                     description="GRACE: train an LLM into a text embedder with GRPO on "
                                                 "Megatron-Core.")
    for group_field in dataclasses.fields(GraceConfig):
        group = parser.add_argument_group(GROUP_TITLES[group_field.name])
        for option in dataclasses.fields(group_field.default_factory()):
            options = dict(option.metadata)
            if isinstance(option.default, bool):
                options["action"] = argparse.BooleanOptionalAction
            elif "type" not in options and "choices" not in options:
                options["type"] = type(option.default)
            group.add_argument(flag_name(option.name), dest=option.name, default=option.default, **options)
    return parser


def config_from_flags(flags: dict) -> GraceConfig:
    """The config tree from flat flag values (parsed flags, or a checkpoint's ``args`` copy), with the defaults that
    depend on other flags resolved: the bundled data of ``--train-mode``, SimCSE's dropout, ``<save>/hf``."""
    groups = {}
    for group_field in dataclasses.fields(GraceConfig):
        cls = group_field.default_factory
        groups[group_field.name] = cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls) if f.name in flags})
    config = GraceConfig(**groups)
    resolved = {}
    if config.data.train_data is None:
        resolved["train_data"] = str(DEFAULT_TRAIN_DATA[config.data.train_mode])
    if config.objective.hidden_dropout is None:
        resolved["hidden_dropout"] = DEFAULT_SIMCSE_DROPOUT if config.objective.algorithm == "simcse" else 0.0
    if config.checkpoint.export_hf == EXPORT_UNDER_SAVE and config.checkpoint.save is not None:
        resolved["export_hf"] = str(Path(config.checkpoint.save) / "hf")
    return config.replace(**resolved)


def parse_args(argv=None) -> GraceConfig:
    return config_from_flags(vars(build_parser().parse_args(argv)))
