"""Command-line flags of ``python -m megatron_grace.train``, named as in Megatron-LM where Megatron-LM has the concept
and as in verl/TRL for the RL-specific ones, plus the validation that runs before any model is built."""
from __future__ import annotations

import argparse
from pathlib import Path

from .console import LOG_LEVELS

DEFAULT_TRAIN_DATA = {
    "supervised": Path(__file__).resolve().parent.parent / "examples" / "data" / "train_supervised.jsonl",
    "unsupervised": Path(__file__).resolve().parent.parent / "examples" / "data" / "train_unsupervised.txt",
}

ALGORITHMS = ("grace", "infonce", "simcse")  # grace: GRPO; the others: megatron_grace/contrastive.py
CONTRASTIVE_MODES = {"infonce": "supervised", "simcse": "unsupervised"}  # the --train-mode each baseline reads
DEFAULT_SIMCSE_DROPOUT = 0.1  # SimCSE's dropout (Gao et al. 2021): --hidden-dropout's default for simcse

# ``--export-hf`` without a value: the run directory's ``hf/``, resolved after parsing so that a ``--save`` given later
# on the command line (after a config's flags) moves the export with it, as TensorBoard's default does.
EXPORT_UNDER_SAVE = "<save>/hf"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_grace.train",
        description="GRACE: train an LLM into a text embedder with GRPO on Megatron-Core.",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--hf-model", default=None,
                       help="Hugging Face folder of the policy (default: the embedded SmolLM2-135M-Instruct)")
    model.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 parameters and activations (fp32 main weights)")
    model.add_argument("--recompute-activations", action=argparse.BooleanOptionalAction, default=False, help="full activation recomputation")

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False)
    parallel.add_argument("--distributed-timeout-minutes", type=float, default=30.0)

    data = parser.add_argument_group("data")
    data.add_argument("--train-data", default=None,
                      help="jsonl {query, positive, negative} (supervised) or text, one per line (unsupervised); "
                           "default: the bundled WordNet sample")
    data.add_argument("--train-mode", choices=["supervised", "unsupervised"], default="supervised")
    data.add_argument("--max-prompt-length", type=int, default=1024,
                      help="templated prompt tokens; longer main prompts are skipped, query/negative prompts cut")
    data.add_argument("--strict-data", action=argparse.BooleanOptionalAction, default=False, help="bad rows are errors instead of counted skips")

    rollout = parser.add_argument_group("rollout")
    rollout.add_argument("--rollout-n", type=int, default=8, help="main rollouts per prompt (GRPO group size)")
    rollout.add_argument("--rollout-temperature", type=float, default=1.0)
    rollout.add_argument("--query-temperature", type=float, default=0.5,
                         help="temperature of the query/anchor and negative rationales")
    rollout.add_argument("--max-response-length", type=int, default=2048)
    rollout.add_argument("--rollout-sync-interval", type=int, default=32,
                         help="decoded tokens between the host's checks for finished rows (finished rows leave the "
                              "batch there); the only device-to-host read of the decode loop")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--algorithm", choices=ALGORITHMS, default="grace",
                           help="grace: GRPO on rationale rollouts; infonce / simcse: the contrastive baselines on "
                                "the same model, data and pooling without rationales (megatron_grace/contrastive.py)")
    objective.add_argument("--contrastive-temperature", type=float, default=0.05,
                           help="τ of the InfoNCE loss of --algorithm infonce / simcse")
    objective.add_argument("--hidden-dropout", type=float, default=None,
                           help=f"dropout on the hidden states (default {DEFAULT_SIMCSE_DROPOUT} for simcse, "
                                f"0 otherwise; grace needs 0)")
    objective.add_argument("--reward-variant", choices=["code", "paper", "per-rollout"], default="code",
                           help="code: the reference code's terms; paper: several negatives summed; per-rollout: "
                                "negatives and cross-group term measured against each rollout, so they reach the "
                                "advantage (see megatron_grace/kernels/grace_rewards.py)")
    objective.add_argument("--reward-temperature", type=float, default=0.1, help="τ: similarities are divided by it")
    objective.add_argument("--clustering-weight", type=float, default=0.2, help="λ1")
    objective.add_argument("--cross-group-weight", type=float, default=0.2, help="λ2")
    objective.add_argument("--length-penalty", type=float, default=-1.0,
                           help="reward of a response that hit --max-response-length without EOS")
    objective.add_argument("--norm-adv-by-std", action=argparse.BooleanOptionalAction, default=False, help="divide GRPO advantages by the group std")
    objective.add_argument("--clip-ratio-low", type=float, default=0.2)
    objective.add_argument("--clip-ratio-high", type=float, default=0.2)
    objective.add_argument("--clip-ratio-c", type=float, default=3.0, help="dual-clip bound for negative advantages")
    objective.add_argument("--kl-coef", type=float, default=0.0,
                           help="low-variance KL to the initial policy; > 0 loads a frozen reference model")
    objective.add_argument("--entropy-coef", type=float, default=0.0)

    training = parser.add_argument_group("training")
    training.add_argument("--train-iters", type=int, default=1000, help="GRPO steps (rollout batches)")
    training.add_argument("--global-batch-size", type=int, default=64, help="prompts per GRPO step, all DP ranks")
    training.add_argument("--ppo-mini-batch-size", type=int, default=16,
                          help="prompts per optimizer step; global-batch-size / ppo-mini-batch-size steps per rollout")
    training.add_argument("--ppo-epochs", type=int, default=1)
    training.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward micro-batch")
    training.add_argument("--lr", type=float, default=1e-6)
    training.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up in optimizer steps")
    training.add_argument("--weight-decay", type=float, default=0.01)
    training.add_argument("--adam-beta1", type=float, default=0.9)
    training.add_argument("--adam-beta2", type=float, default=0.999)
    training.add_argument("--clip-grad", type=float, default=1.0)
    training.add_argument("--seed", type=int, default=1234)
    training.add_argument("--max-nonfinite-steps", type=int, default=3,
                          help="consecutive steps skipped for NaN/Inf before the run stops")

    checkpoint = parser.add_argument_group("checkpointing")
    checkpoint.add_argument("--save", default=None, help="run directory: checkpoints, metrics.jsonl, samples")
    checkpoint.add_argument("--save-interval", type=int, default=None)
    checkpoint.add_argument("--load", default=None,
                            help="resume from the latest checkpoint in this directory (missing/empty: start fresh)")
    checkpoint.add_argument("--no-load-optim", action="store_true", help="load weights only")
    checkpoint.add_argument("--fallback-to-previous-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                            help="if the latest checkpoint is corrupt, resume from the newest complete older one")
    checkpoint.add_argument("--export-hf", nargs="?", const=EXPORT_UNDER_SAVE, default=None, metavar="DIR",
                            help="write an HF folder of the final policy to DIR (no value: <save>/hf)")

    logging = parser.add_argument_group("logging")
    logging.add_argument("--log-interval", type=int, default=1)
    logging.add_argument("--sample-interval", type=int, default=10, help="print a sample rationale every N steps")
    logging.add_argument("--tensorboard-dir", default=None, help="default: <save>/tensorboard")
    logging.add_argument("--wandb-project", default=None)
    logging.add_argument("--wandb-exp-name", default=None)
    logging.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                         help="write <save>/report.html at the end (curves, samples, configuration)")
    logging.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                         help="info: known-harmless library warnings hidden (default, or $MEGATRON_GRACE_LOG_LEVEL); "
                              "debug: every warning and library log line")
    return parser


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Check flag combinations before anything heavy starts; errors name the flags."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size

    def fail(message: str) -> None:
        raise SystemExit(f"error: {message}")

    if tp < 1 or pp < 1 or world_size % (tp * pp):
        fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} × "
             f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    if args.global_batch_size % dp:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the data-parallel size {dp}")
    if args.algorithm == "grace":
        if args.global_batch_size % args.ppo_mini_batch_size:
            fail(f"--global-batch-size {args.global_batch_size} is not divisible by --ppo-mini-batch-size "
                 f"{args.ppo_mini_batch_size}")
        if args.ppo_mini_batch_size % dp:
            fail(f"--ppo-mini-batch-size {args.ppo_mini_batch_size} is not divisible by the data-parallel size {dp}")
        if (args.ppo_mini_batch_size // dp * args.rollout_n) % args.micro_batch_size:
            fail(f"--micro-batch-size {args.micro_batch_size} does not divide the {args.ppo_mini_batch_size // dp} "
                 f"prompts × {args.rollout_n} rollouts of a mini-batch on each data-parallel rank")
        if args.rollout_n < 2:
            fail(f"--rollout-n {args.rollout_n}: GRPO needs at least 2 rollouts per prompt (advantages are relative "
                 f"to the group)")
        if args.hidden_dropout:
            fail(f"--hidden-dropout {args.hidden_dropout} with --algorithm grace: the PPO ratio compares the "
                 f"rollout's and the update's log-probs of the same policy, which dropout would make differ")
    else:
        if args.train_mode != CONTRASTIVE_MODES[args.algorithm]:
            fail(f"--algorithm {args.algorithm} trains on {CONTRASTIVE_MODES[args.algorithm]} data: give "
                 f"--train-mode {CONTRASTIVE_MODES[args.algorithm]} (got {args.train_mode})")
        if args.contrastive_temperature <= 0:
            fail("--contrastive-temperature must be positive")
        if args.hidden_dropout and args.sequence_parallel:
            fail("--hidden-dropout with --sequence-parallel: dropout under sequence parallelism draws from "
                 "Megatron's tensor-parallel RNG tracker, which the replay of the masks does not cover")
        if args.kl_coef > 0 or args.entropy_coef > 0:
            fail("--kl-coef / --entropy-coef are GRPO terms: they need --algorithm grace")
    if args.hidden_dropout is not None and not 0 <= args.hidden_dropout < 1:
        fail(f"--hidden-dropout {args.hidden_dropout} must be in [0, 1)")
    if args.sequence_parallel and tp == 1:
        fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
    for flag in ("train_iters", "max_response_length", "max_prompt_length", "micro_batch_size", "log_interval",
                 "rollout_sync_interval"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be positive")
    if args.save_interval is not None and (args.save_interval < 1 or args.save is None):
        fail("--save-interval needs --save and a positive interval")
    if args.reward_temperature <= 0:
        fail("--reward-temperature must be positive")
    if min(args.rollout_temperature, args.query_temperature) <= 0:
        fail("sampling temperatures must be positive")
    if args.export_hf == EXPORT_UNDER_SAVE and args.save is None:
        fail("--export-hf without a folder exports under --save: give --save or a folder")


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.train_data is None:
        args.train_data = str(DEFAULT_TRAIN_DATA[args.train_mode])
    if args.hidden_dropout is None:
        args.hidden_dropout = DEFAULT_SIMCSE_DROPOUT if args.algorithm == "simcse" else 0.0
    if args.export_hf == EXPORT_UNDER_SAVE and args.save is not None:
        args.export_hf = str(Path(args.save) / "hf")
    return args
