"""GRACE data pipeline: prompts and L_sys per chat template, bad rows, strict mode, length handling, sampler."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_grace.cli import build_sample_data, prepare_data
from megatron_grace.data import (
    SYSTEM_PROMPT,
    DataError,
    GroupSampler,
    PromptBuilder,
    PromptError,
    load_grace_dataset,
)

REPO = Path(__file__).resolve().parents[1]

# Simplified but faithful forms of the real templates: Qwen2.5 (ChatML with its own default system prompt, which the
# GRACE system prompt replaces) and Llama 3 (BOS inside the template, headers as special tokens, content trimmed).
QWEN2_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_HEAD = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
CHATML_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
CHATML_TAIL_TOKENS = 6  # <|im_end|> Ċ <|im_start|> ass istant Ċ in SmolLM2's vocabulary
LLAMA3_HEAD = (
    f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PROMPT}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
)
LLAMA3_TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def tokenizer_with_template(tokenizer_dir, template, **special_tokens):
    """SmolLM2's BPE vocabulary behind another family's chat template and special tokens."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), **special_tokens)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def builder(smollm2_tokenizer):
    return PromptBuilder(smollm2_tokenizer)


def split_decoded(tokenizer, prompt):
    """The decoded system part (before L_sys) and the pooled part of a prompt."""
    ids, start = prompt.input_ids, prompt.pool_start
    return tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:])


# ----------------------------------------------------------------------------------------------------- prompts / L_sys
def test_pool_start_smollm2(smollm2_tokenizer, builder):
    prompt = builder.build("Cats purr when content.")
    assert split_decoded(smollm2_tokenizer, prompt) == (CHATML_HEAD, "Cats purr when content." + CHATML_TAIL)
    assert prompt.input_ids[0] == smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_pool_start_qwen2_style_template(smollm2_tokenizer_dir):
    tokenizer = tokenizer_with_template(smollm2_tokenizer_dir, QWEN2_TEMPLATE, eos_token="<|im_end|>")
    prompt = PromptBuilder(tokenizer).build("Cats purr when content.")
    assert split_decoded(tokenizer, prompt) == (CHATML_HEAD, "Cats purr when content." + CHATML_TAIL)


def test_pool_start_llama3_style_template_that_trims_the_text(smollm2_tokenizer_dir):
    tokenizer = tokenizer_with_template(
        smollm2_tokenizer_dir, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )
    prompt = PromptBuilder(tokenizer).build("  Cats purr when content. \n")
    assert split_decoded(tokenizer, prompt) == (LLAMA3_HEAD, "Cats purr when content." + LLAMA3_TAIL)
    assert tokenizer.convert_ids_to_tokens(prompt.input_ids[:2]) == ["<|begin_of_text|>", "<|start_header_id|>"]


def test_template_without_the_user_text_is_an_error(smollm2_tokenizer_dir):
    system_only = "{{ messages[0]['content'] }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    builder = PromptBuilder(tokenizer_with_template(smollm2_tokenizer_dir, system_only))
    with pytest.raises(PromptError, match="cannot locate the user text"):
        builder.build("Cats purr when content.")


def test_truncation_keeps_the_assistant_header(smollm2_tokenizer, builder):
    text = " ".join(["word"] * 200)
    full = builder.build(text)
    max_length = full.pool_start + 7 + CHATML_TAIL_TOKENS  # room for 7 text tokens
    cut = builder.build(text, max_length, truncate=True)
    assert cut.truncated and len(cut) == max_length and cut.pool_start == full.pool_start
    assert smollm2_tokenizer.decode(cut.input_ids[-CHATML_TAIL_TOKENS:]) == CHATML_TAIL
    assert cut.input_ids[:-CHATML_TAIL_TOKENS] == full.input_ids[:max_length - CHATML_TAIL_TOKENS]
    with pytest.raises(PromptError, match="more than the maximum"):
        builder.build(text, max_length)


# ------------------------------------------------------------------------------------------------------- reading rows
def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def row(query="what purrs?", positive="Cats purr when content.", negative="Dogs bark at strangers.", **extra):
    obj = {"query": query, "positive": positive, **extra}
    if negative is not None:
        obj["negative"] = negative
    return json.dumps(obj)


BAD_FILE_LINES = [
    row(),                                                        # 1 kept
    '{"query": "unterminated',                                    # 2
    b'{"query": "caf\xe9", "positive": "x", "negative": "y"}',   # 3 latin-1 byte
    json.dumps({"query": "q", "negative": "n"}),                  # 4
    row(query="   "),                                             # 5
    row(query=5),                                                 # 6
    "",                                                           # 7
    row(negative=["Dogs bark at strangers."]),                    # 8 kept: a one-item list is one negative
    "[1, 2]",                                                     # 9
    row(negative=["a dog", "a fish"]),                            # 10
    row(query="\\ud800 lone"),                                    # 11 not a lone surrogate: a literal backslash
    '{"query": "\\ud800", "positive": "p", "negative": "n"}',    # 12 lone surrogate escape
    row(negative=None),                                           # 13 fewer negatives than line 1
]
BAD_FILE_SKIPS = {
    "invalid JSON": [2],
    "invalid UTF-8": [3],
    "missing field 'positive'": [4],
    "empty field 'query'": [5],
    "field 'query' is not a string": [6],
    "blank line": [7],
    "row is not a JSON object": [9],
    "2 negative(s) where the first valid row has 1": [10],
    "field 'query' is not valid Unicode (lone surrogate)": [12],
    "0 negative(s) where the first valid row has 1": [13],
}


def test_bad_rows_are_counted_with_line_numbers(tmp_path, smollm2_tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", BAD_FILE_LINES)
    dataset = load_grace_dataset(path, smollm2_tokenizer, mode="supervised", max_prompt_length=256, verbose=False)
    assert dataset.sample_ids() == [0, 7, 10]
    assert dataset.report.skipped == BAD_FILE_SKIPS
    assert (dataset.report.lines, dataset.report.kept, dataset.report.num_skipped) == (13, 3, 10)
    assert dataset.num_negatives == 1
    assert dataset[1].row.negatives == ("Dogs bark at strangers.",)
    summary = dataset.report.summary()
    assert summary.splitlines()[0] == "bad.jsonl: 13 lines read, 3 examples kept, 10 skipped"
    assert "skipped 1 x invalid UTF-8: line 3" in summary


def test_strict_mode_names_file_and_line(tmp_path, smollm2_tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", BAD_FILE_LINES)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_grace_dataset(path, smollm2_tokenizer, max_prompt_length=256, strict=True, verbose=False)
    path = write_lines(tmp_path / "latin1.jsonl", [row(), BAD_FILE_LINES[2]])
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: invalid UTF-8 \(byte 14 of the line is b'\\xe9'\)"):
        load_grace_dataset(path, smollm2_tokenizer, max_prompt_length=256, strict=True, verbose=False)


def test_empty_and_unusable_files_are_errors(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        load_grace_dataset(write_lines(tmp_path / "empty.jsonl", []), smollm2_tokenizer, verbose=False)
    with pytest.raises(DataError, match=r"no usable rows in .*junk.jsonl(.|\n)*invalid JSON: lines 1, 2"):
        load_grace_dataset(write_lines(tmp_path / "junk.jsonl", ["{", "}"]), smollm2_tokenizer, verbose=False)
    with pytest.raises(DataError, match="does not exist"):
        load_grace_dataset(tmp_path / "missing.jsonl", smollm2_tokenizer, verbose=False)


# ------------------------------------------------------------------------------------------- lengths and truncation
def test_overlong_main_is_skipped_and_query_negative_truncated(tmp_path, smollm2_tokenizer, builder):
    short = "Cats purr when content."
    max_length = len(builder.build(short)) + 2
    long_text = " ".join(["purring"] * 100)
    path = write_lines(tmp_path / "lengths.jsonl", [
        row(query=short, positive=short, negative=short),
        row(query=short, positive=long_text, negative=short),      # main too long: skipped
        row(query=long_text, positive=short, negative=long_text),  # query and negative cut to max_length
    ])
    dataset = load_grace_dataset(path, builder, max_prompt_length=max_length, verbose=False)
    assert dataset.sample_ids() == [0, 2]
    assert dataset.report.skipped == {f"main prompt over {max_length} tokens": [2]}
    assert dataset.report.truncated == {"query": [3], "negative": [3]}
    cut = dataset[1]
    assert len(cut.query) == len(cut.negatives[0]) == max_length and cut.query.truncated
    assert smollm2_tokenizer.decode(cut.query.input_ids[-CHATML_TAIL_TOKENS:]) == CHATML_TAIL
    assert not cut.main.truncated
    with pytest.raises(DataError, match=rf"lengths\.jsonl:2: main prompt: .*more than the maximum of {max_length}"):
        load_grace_dataset(path, builder, max_prompt_length=max_length, strict=True, verbose=False)


def test_unsupervised_file(tmp_path, smollm2_tokenizer, builder):
    path = write_lines(tmp_path / "sentences.txt", ["Cats purr when content.", "   ", "  Dogs bark.\r"])
    dataset = load_grace_dataset(path, builder, mode="unsupervised", max_prompt_length=256, verbose=False)
    assert dataset.sample_ids() == [0, 2]
    assert dataset.report.skipped == {"blank line": [2]}
    assert dataset.num_negatives == 0
    example = dataset[1]
    assert example.row.main == example.row.query == "Dogs bark."
    assert example.query is example.main and example.negatives == ()
    assert example.main == builder.build("Dogs bark.")


def test_supervised_without_and_with_several_negatives(tmp_path, builder):
    path = write_lines(tmp_path / "noneg.jsonl", [row(negative=None), row(negative=None)])
    assert load_grace_dataset(path, builder, max_prompt_length=256, verbose=False).num_negatives == 0
    path = write_lines(tmp_path / "paper.jsonl", [row(negative=["a dog", "a fish"])] * 2)
    dataset = load_grace_dataset(path, builder, max_prompt_length=256, verbose=False)
    assert dataset.num_negatives == 2
    assert [n.input_ids for n in dataset[0].negatives] == [builder.build("a dog").input_ids,
                                                           builder.build("a fish").input_ids]


# ------------------------------------------------------------------------------------------------------------ sampler
def drain(sampler, num_batches):
    return [sampler.next_batch() for _ in range(num_batches)]


def test_sampler_is_seeded_and_follows_seed_plus_epoch():
    batches = drain(GroupSampler(10, 4, seed=7), 5)  # 20 samples = exactly two epochs
    assert batches == drain(GroupSampler(10, 4, seed=7), 5)
    assert batches != drain(GroupSampler(10, 4, seed=8), 5)
    stream = sum(batches, [])
    assert stream[:10] == np.random.default_rng(7).permutation(10).tolist()
    assert stream[10:] == np.random.default_rng(8).permutation(10).tolist()


def test_sampler_epoch_boundary_neither_skips_nor_repeats():
    sampler = GroupSampler(10, 4, seed=3)
    stream = sum(drain(sampler, 15), [])  # 60 samples = six epochs; batches 3, 8, 13 straddle a boundary
    for epoch in range(6):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert (sampler.epoch, sampler.position, sampler.consumed_samples) == (6, 0, 60)


def test_sampler_batch_larger_than_dataset():
    sampler = GroupSampler(3, 8, seed=0)
    stream = sum(drain(sampler, 3), [])
    assert all(sorted(stream[i:i + 3]) == [0, 1, 2] for i in range(0, 24, 3))
    assert (sampler.epoch, sampler.position) == (8, 0)


def test_sampler_state_round_trip_across_an_epoch_boundary():
    reference = GroupSampler(10, 4, seed=5)
    drain(reference, 2)
    state = json.loads(json.dumps(reference.state_dict()))  # a checkpoint holds plain ints
    assert state == {"seed": 5, "epoch": 0, "position": 8, "num_examples": 10}
    expected = drain(reference, 4)  # crosses into epoch 1
    resumed = GroupSampler(10, 4, seed=999)  # the checkpoint's seed wins over the constructor's
    resumed.load_state_dict(state)
    assert drain(resumed, 4) == expected
    assert resumed.state_dict() == reference.state_dict() == {"seed": 5, "epoch": 2, "position": 4, "num_examples": 10}
    with pytest.raises(ValueError, match="for 10 examples but this dataset has 11"):
        GroupSampler(11, 4, seed=5).load_state_dict(state)


def test_shard_gives_contiguous_whole_slices():
    batch = [9, 3, 7, 1, 0, 4, 6, 2]
    assert [GroupSampler.shard(batch, rank, 4) for rank in range(4)] == [[9, 3], [7, 1], [0, 4], [6, 2]]
    assert GroupSampler.shard(batch, 0, 1) == batch
    with pytest.raises(ValueError, match="does not divide over 3"):
        GroupSampler.shard(batch, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        GroupSampler.shard(batch, 4, 4)


# ------------------------------------------------------------------------------------------------- prepare_data tool
def test_prepare_data_filters_and_splits(tmp_path, smollm2_tokenizer_dir, builder, capsys):
    short = "Cats purr when content."
    max_length = len(builder.build(short)) + 2
    lines = [row(query=f"q{i}", positive=short) for i in range(10)]
    lines[4] = row(positive=" ".join(["purring"] * 100))  # too long
    lines[6] = "not json"
    source = write_lines(tmp_path / "raw.jsonl", lines)
    argv = [str(source), "--mode", "supervised", "--output-dir", str(tmp_path / "out"),
            "--tokenizer", str(smollm2_tokenizer_dir), "--max-prompt-length", str(max_length),
            "--test-fraction", "0.25"]
    assert prepare_data.main(argv) == 0
    assert "raw.jsonl: 10 lines read, 8 examples kept, 2 skipped" in capsys.readouterr().out
    test_rows = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [r["query"] for r in test_rows] == ["q0", "q1"]  # int(8 * 0.25) leading rows
    assert [r["query"] for r in train_rows] == ["q2", "q3", "q5", "q7", "q8", "q9"]
    assert train_rows[0] == {"query": "q2", "positive": short, "negative": "Dogs bark at strangers."}
    assert prepare_data.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prepare_data.main(argv + ["--strict", "--overwrite"]) == 1
    assert "raw.jsonl:7: invalid JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- WordNet sample data tool
SAMPLE_DATA = REPO / "examples" / "data"


def test_wordnet_data_lines_parse():
    noun = build_sample_data.parse_data_line(
        "00406612 04 n 02 fold 0 folding 0 003 @ 00404403 n 0000 + 01277992 v 0201 ~ 00406800 n 0000 | "
        'the act of folding; "he gave the napkins a double fold"  \n'
    )
    assert noun == build_sample_data.Synset(
        "00406612-n", ["fold", "folding"], "00404403-n", "the act of folding", ["he gave the napkins a double fold"]
    )
    assert noun.entry() == "fold, folding: he gave the napkins a double fold"
    verb = build_sample_data.parse_data_line(
        "01277992 35 v 02 fold 0 fold_up 0 002 @ 01234567 v 0000 + 00406612 n 0101 01 + 08 00 | "
        'bend so that one part covers the other; "fold up the newspaper"; "fold the sheets"\n'
    )
    assert (verb.lemmas, verb.parent, verb.examples) == (["fold", "fold up"], "01234567-v",
                                                         ["fold up the newspaper", "fold the sheets"])
    satellite = build_sample_data.parse_data_line(
        '00002312 00 s 01 long(a) 0 001 & 00002098 a 0000 | of time; "a long life"- A. Author; "long years"\n'
    )
    assert satellite == build_sample_data.Synset("00002312-s", ["long"], "00002098-a", "of time",
                                                 ["a long life", "long years"])


def test_wordnet_build_keeps_held_out_text_out_of_training(monkeypatch):
    Synset = build_sample_data.Synset
    synsets = [
        Synset("1-n", ["cat"], "0-n", "a small feline", ["the cat purred"]),
        Synset("2-n", ["dog"], "0-n", "a domestic canine", ["the dog barked loudly at night"]),
        Synset("3-n", ["lion"], "0-n", "a big feline", ["the lion roared"]),           # held out
        Synset("4-n", ["wolf"], "0-n", "a wild canine", ["the lion roared"]),           # shares held-out text
        Synset("5-n", ["fox"], "0-n", "a small canine", []),                            # no example
        Synset("6-n", ["oak"], "9-n", "a tree", ["the oak fell down in the storm"]),    # only child of 9-n
    ]
    monkeypatch.setattr(build_sample_data, "is_held_out", lambda key, percent: key == "3-n")
    heldout, triplets, sentences = build_sample_data.build(
        synsets, heldout_percent=20, num_supervised=10, num_unsupervised=10, seed=0)
    assert heldout == ["3-n"]
    assert sorted(t["query"] for t in triplets) == ["a domestic canine", "a small feline"]
    by_query = {t["query"]: t for t in triplets}
    assert by_query["a small feline"] == {"query": "a small feline", "positive": "cat: the cat purred",
                                          "negative": "dog: the dog barked loudly at night"}
    assert by_query["a domestic canine"]["negative"] == "cat: the cat purred"
    assert sorted(sentences) == ["the dog barked loudly at night", "the oak fell down in the storm"]


def test_bundled_sample_data(builder):
    sizes = {path.name: path.stat().st_size for path in SAMPLE_DATA.iterdir()}
    assert sum(sizes.values()) <= 2 * 1024 * 1024, sizes
    assert {"README.md", "LICENSE.WordNet"} <= sizes.keys()
    supervised = load_grace_dataset(SAMPLE_DATA / "train_supervised.jsonl", builder, max_prompt_length=1024,
                                    strict=True, verbose=False)
    unsupervised = load_grace_dataset(SAMPLE_DATA / "train_unsupervised.txt", builder, mode="unsupervised",
                                      max_prompt_length=1024, strict=True, verbose=False)
    assert (len(supervised), supervised.num_negatives, len(unsupervised)) == (3000, 1, 3000)
    heldout = (SAMPLE_DATA / "heldout_synsets.txt").read_text().split()
    assert len(heldout) == 22703
    # The README's rule, written out independently of the tool.
    assert all(int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < 20 for key in heldout)
    assert all(len(key) == 10 and key[8] == "-" and key[9] in "nvas" for key in heldout)
