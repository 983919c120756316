"""The configuration tree (megatron_grace/config.py): one default per flag, and the README's list of invalid
combinations, each refused by ``GraceConfig.validate()`` with a message naming the flag.

The defaults are checked against what the README's flag table and the paper configs say, the places that used to
disagree with the parser: the README states each default once (``--flag VALUE``), and ``paper_defaults.sh`` may only
hold flags whose value differs from the default.
"""
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_grace.config import ConfigError, GraceConfig, build_parser, config_from_flags, flag_name, parse_args

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def flag_defaults() -> dict[str, object]:
    """``--flag`` → its default, from the config tree."""
    return {flag_name(f.name): f.default for group in GraceConfig().groups() for f in dataclasses.fields(group)}


def test_the_parser_is_the_config_tree():
    actions = {action.option_strings[0]: action for action in build_parser()._actions if action.dest != "help"}
    assert set(actions) == set(flag_defaults())
    assert all(actions[name].default == default for name, default in flag_defaults().items())
    # Parsing nothing gives the tree's defaults, with only the flag-dependent ones resolved.
    parsed = parse_args([]).flat()
    resolved = {"train_data", "hidden_dropout"}
    assert {k: v for k, v in parsed.items() if k not in resolved} == \
        {k: v for k, v in GraceConfig().flat().items() if k not in resolved}
    assert parsed["hidden_dropout"] == 0.0 and parsed["train_data"].endswith("train_supervised.jsonl")
    # The flat view (args.json, the checkpoint's copy) rebuilds the same tree.
    config = parse_args(["--tensor-model-parallel-size", "2", "--no-load-optim", "--rollout-n", "4"])
    assert config_from_flags(config.flat()) == config
    assert config.replace(rollout_n=6).rollout.rollout_n == 6 and config.rollout.rollout_n == 4
    with pytest.raises(TypeError, match="no_such_flag"):
        config.replace(no_such_flag=1)


def test_the_readme_states_the_defaults_of_the_config():
    table = README[README.index("### Training flags"):README.index("Invalid combinations")]
    defaults, checked = flag_defaults(), 0
    for flag, value in re.findall(r"`(--[a-z0-9-]+) ([^`]+)`", table):
        if flag not in defaults or value.isupper() or value.startswith("["):
            continue  # a metavar (DIR, PATH, N) or an optional value
        default = defaults[flag]
        first = value.split("\\|")[0]  # choices are listed default first
        assert default is not None, f"README gives {flag} a default, the config has none"
        assert type(default)(first) == default, f"README says {flag} {first}, the config's default is {default}"
        checked += 1
    assert checked >= 25


def paper_array(name: str) -> list[str]:
    script = f'source "$1"; printf "%s\\0" "${{{name}[@]}}"'
    out = subprocess.run(["bash", "-c", script, "bash", str(REPO / "examples" / "configs" / "paper_defaults.sh")],
                         capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("array", ["GRACE_PAPER_ARGS", "BASELINE_PAPER_ARGS"])
def test_paper_defaults_hold_only_flags_that_differ_from_the_defaults(array):
    flags = paper_array(array)
    assert flags, array
    changed = parse_args(flags).flat()
    default = parse_args([]).flat()
    given = {arg.removeprefix("--").removeprefix("no-").replace("-", "_") for arg in flags if arg.startswith("--")}
    repeated = sorted(name for name in given if changed[name] == default[name])
    assert not repeated, f"{array} repeats the defaults of {repeated}"


# The README's list of invalid combinations → (world size, flags, the message's fragment). One entry per line.
SMALL_BATCH = ["--global-batch-size", "8", "--ppo-mini-batch-size", "8", "--rollout-n", "4", "--micro-batch-size", "4"]
INVALID = {
    "a world size not divisible by TP × PP": [(3, ["--tensor-model-parallel-size", "2"], "world size 3 is not "
                                                                                         "divisible")],
    "a non-positive count, length, interval, timeout or temperature": [
        (1, ["--train-iters", "0"], "--train-iters must be positive"),
        (1, ["--max-response-length", "0"], "--max-response-length must be positive"),
        (1, ["--rollout-sync-interval", "0"], "--rollout-sync-interval must be positive"),
        (1, ["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be positive"),
        (1, ["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be positive"),
        (1, ["--query-temperature", "0"], "--query-temperature must be positive"),
        (1, ["--reward-temperature", "-1"], "--reward-temperature must be positive"),
        (1, ["--exit-interval", "0", "--save", "runs/x"], "--exit-interval must be positive"),
        (1, ["--exit-duration-in-mins", "-1", "--save", "runs/x"], "--exit-duration-in-mins must be positive")],
    "a global batch not divisible by the data-parallel size": [(4, ["--global-batch-size", "6"], "--global-batch-size "
                                                                "6 is not divisible by the data-parallel size 4")],
    "a global batch not divisible by `--ppo-mini-batch-size`, or a mini-batch not divisible by the data-parallel "
    "size": [(1, ["--ppo-mini-batch-size", "3"], "not divisible by --ppo-mini-batch-size 3"),
             (8, ["--ppo-mini-batch-size", "4"], "--ppo-mini-batch-size 4 is not divisible by the data-parallel "
                                                 "size 8")],
    "a micro-batch that does not divide a rank's mini-batch rows": [(1, ["--micro-batch-size", "3"],
                                                                     "--micro-batch-size 3 does not divide")],
    "`--rollout-n 1`": [(1, ["--rollout-n", "1"], "--rollout-n 1: GRPO needs at least 2")],
    "dropout with `--algorithm grace`": [(1, ["--hidden-dropout", "0.1"], "--hidden-dropout 0.1 with --algorithm "
                                                                          "grace")],
    "`--hidden-dropout` outside [0, 1)": [(1, ["--algorithm", "simcse", "--train-mode", "unsupervised",
                                               "--hidden-dropout", "1.5"], "--hidden-dropout 1.5 must be in [0, 1)")],
    "`--algorithm infonce` on unsupervised or `simcse` on supervised data": [
        (1, ["--algorithm", "infonce", "--train-mode", "unsupervised"], "--algorithm infonce trains on supervised"),
        (1, ["--algorithm", "simcse"], "--algorithm simcse trains on unsupervised data")],
    "a non-positive `--contrastive-temperature`": [(1, ["--algorithm", "infonce", "--contrastive-temperature", "0"],
                                                    "--contrastive-temperature must be positive")],
    "dropout with `--sequence-parallel`": [(2, ["--algorithm", "simcse", "--train-mode", "unsupervised",
                                                "--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                            "--hidden-dropout with --sequence-parallel")],
    "GRPO-only terms (`--kl-coef`, `--entropy-coef`) with a baseline": [
        (1, ["--algorithm", "infonce", "--kl-coef", "0.1"], "--kl-coef / --entropy-coef are GRPO terms"),
        (1, ["--algorithm", "infonce", "--entropy-coef", "0.1"], "--kl-coef / --entropy-coef are GRPO terms")],
    "`--sequence-parallel` with TP 1": [(1, ["--sequence-parallel"], "--sequence-parallel needs "
                                                                     "--tensor-model-parallel-size > 1")],
    "`--save-interval` without `--save`": [(1, ["--save-interval", "5"], "--save-interval needs --save")],
    "`--export-hf` without a folder and without `--save`": [(1, ["--export-hf"], "--export-hf without a folder")],
    "`--exit-signal-handler`, `--exit-duration-in-mins` or `--exit-interval` without `--save`": [
        (1, ["--exit-signal-handler"], "--exit-signal-handler needs --save"),
        (1, ["--exit-interval", "5", "--exit-duration-in-mins", "60"],
         "--exit-duration-in-mins / --exit-interval needs --save")],
    "TP not dividing the heads or KV heads of `--hf-model`, PP above its layer count": [
        (3, ["--tensor-model-parallel-size", "3", "--hf-model", "{model}"], "--tensor-model-parallel-size 3 does "
                                                                            "not divide the model's 4 attention heads"),
        (4, ["--tensor-model-parallel-size", "4", "--hf-model", "{model}"], "does not divide the model's 2 KV heads"),
        (8, ["--pipeline-model-parallel-size", "8", "--hf-model", "{model}"], "exceeds the model's 2 layers")],
}


def readme_invalid_combinations() -> list[str]:
    section = README[README.index("`tests/test_config.py` tries each line):"):]
    section = section[section.index("\n- "):]
    return re.findall(r"^- (.+)$", section[: section.index("\n\n")], flags=re.MULTILINE)


def test_every_invalid_combination_of_the_readme_has_a_case():
    assert readme_invalid_combinations() == list(INVALID)


@pytest.mark.parametrize("line", list(INVALID))
def test_validate_refuses_each_invalid_combination(line, tiny_llama_dir):
    for world_size, flags, message in INVALID[line]:
        config = parse_args([*SMALL_BATCH, *(flag.format(model=tiny_llama_dir) for flag in flags)])
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.validate(world_size=world_size)
    parse_args(SMALL_BATCH).validate(world_size=1)  # the flags every case starts from are valid


def test_the_checks_that_need_the_training_file():
    from megatron_grace.data.dataset import DataError

    parse_args([]).check_training_data(num_negatives=1)  # the default: GRACE, code variant, one negative per row
    with pytest.raises(DataError, match="--reward-variant code scores one negative per query.*has 2"):
        parse_args([]).check_training_data(num_negatives=2)
    parse_args(["--reward-variant", "paper"]).check_training_data(num_negatives=2)
    with pytest.raises(DataError, match="--algorithm infonce needs hard negatives"):
        parse_args(["--algorithm", "infonce"]).check_training_data(num_negatives=0)
    parse_args(["--algorithm", "simcse", "--train-mode", "unsupervised"]).check_training_data(num_negatives=0)


# A library parameter or tool flag named after a config field (or one of these aliases) takes its default from the
# config tree (``= RolloutConfig.max_response_length``) or has none; a literal there is the same default written twice.
DEFAULT_ALIASES = {"sync_interval": "rollout_sync_interval", "timeout_minutes": "distributed_timeout_minutes",
                   "max_new_tokens": "max_response_length", "max_prompt_tokens": "max_prompt_length",
                   "variant": "reward_variant", "decode_step": "rollout_decode_step",
                   "cuda_graphs": "rollout_cuda_graphs"}
# Same name, another quantity (each says why): everywhere, or in one file.
NOT_THE_FLAG = {
    "seed": "evaluation, suite-building and test-model seeds are not the training run's --seed",
    "hidden_dropout": "the builder's 0.0 is 'no dropout'; the flag's default None means 'per --algorithm'",
}
NOT_THE_FLAG_IN = {
    ("megatron_grace/cli/explain.py", "max_new_tokens"): "grace-explain shows short rationales for a quick look",
    ("megatron_grace/eval/encoder.py", "max_new_tokens"): "GraceEncoder.explain's quick look (encode uses the cap)",
}


def literal_defaults_of_config_names(path):
    """(line, where, name) of every parameter (where: ``function.parameter``) or ``add_argument`` flag (``--dest``)
    in ``path`` named after a config field or alias whose default is a literal."""
    import ast

    fields = set(GraceConfig().flat()) | set(DEFAULT_ALIASES)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults) if default is not None]
            found += [(node.lineno, f"{node.name}.{arg.arg}", arg.arg) for arg, default in pairs
                      if arg.arg in fields and isinstance(default, ast.Constant) and default.value is not None]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
            dest = str(node.args[0].value)[2:].replace("-", "_")
            for keyword in node.keywords:
                if (keyword.arg == "default" and dest in fields and isinstance(keyword.value, ast.Constant)
                        and keyword.value.value is not None):
                    found.append((node.lineno, f"--{dest}", dest))
    return found


def test_no_default_is_written_twice():
    files = [*sorted((REPO / "megatron_grace").rglob("*.py")), *sorted((REPO / "kernels").glob("*.py")),
             *sorted((REPO / "tools").glob("*.py"))]
    written_twice = [f"{path.relative_to(REPO)}:{line} {where}" for path in files
                     for line, where, name in literal_defaults_of_config_names(path)
                     if name not in NOT_THE_FLAG and (str(path.relative_to(REPO)), name) not in NOT_THE_FLAG_IN]
    assert not written_twice, "literal defaults of config fields (take them from megatron_grace/config.py): " \
                              + ", ".join(written_twice)


def test_the_default_check_finds_a_literal(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def run(*, sync_interval=32, seed=0):\n    pass\n\n"
                      "def ok(*, sync_interval=RolloutConfig.rollout_sync_interval):\n    pass\n\n"
                      "parser.add_argument('--max-response-length', type=int, default=2048)\n")
    assert [where for _, where, _ in literal_defaults_of_config_names(sample)] == [
        "run.sync_interval", "run.seed", "--max_response_length"]
