"""The synthetic arithmetic task: generator, tokenizer and answer checker.

References are independent of the module under test: Python integer arithmetic re-derives every
line of every reference solution, the expected chat strings and token ids are written out by
hand, and the tokenizer is loaded through ``transformers.AutoTokenizer``.
"""

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from effopd_jax import grading
from examples.demo.tasks import arithmetic
from examples.demo.tasks.arithmetic import (
    AdditionProblem,
    build_tokenizer,
    check_answer,
    make_task_files,
    sample_problems,
    save_tokenizer,
)

_LINE = re.compile(r"^(\d)\+(\d)\+([01])=(\d{1,2})$")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_derivation(a: int, b: int, response: str) -> None:
    """Re-derives column addition with Python ints and compares every line of ``response``."""
    *lines, last = response.split("\n")
    width = max(len(str(a)), len(str(b)))
    assert len(lines) == width
    carry = 0
    for i, line in enumerate(lines):
        match = _LINE.match(line)
        assert match, f"malformed step {line!r}"
        x, y, c, s = (int(g) for g in match.groups())
        assert (x, y, c) == ((a // 10**i) % 10, (b // 10**i) % 10, carry), line
        assert s == x + y + c, line
        carry = s // 10
    assert last == f"\\boxed{{{a + b}}}"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arith"))
    make_task_files(out, seed=7, n_train=400, n_val=60, n_test=80, min_digits=1, max_digits=4)
    save_tokenizer(os.path.join(out, "tokenizer"))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(task_dir):
    return AutoTokenizer.from_pretrained(os.path.join(task_dir, "tokenizer"))


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def test_reference_example_is_written_out_exactly():
    problem = AdditionProblem(374, 258)
    assert problem.prompt == "374+258"
    assert problem.answer == "632"
    assert problem.response == "4+8+0=12\n7+5+1=13\n3+2+1=6\n\\boxed{632}"
    # A final carry stays in the last line's sum; a shorter operand is padded with zeros.
    assert AdditionProblem(95, 7).response == "5+7+0=12\n9+0+1=10\n\\boxed{102}"
    assert AdditionProblem(0, 0).response == "0+0+0=0\n\\boxed{0}"


def test_every_row_is_well_formed_and_correct(task_dir):
    for split, count in (("train", 400), ("validation", 60), ("test", 80)):
        rows = _read(os.path.join(task_dir, f"{split}.jsonl"))
        assert len(rows) == count
        for row in rows:
            assert set(row) == {"prompt", "answer", "response", "data_source", "num_columns"}
            assert row["data_source"] == "synthetic_arith"
            a_text, b_text = re.fullmatch(r"(\d+)\+(\d+)", row["prompt"]).groups()
            a, b = int(a_text), int(b_text)
            assert str(a) == a_text and str(b) == b_text  # no leading zeros
            assert 0 <= a < 10**4 and 0 <= b < 10**4
            assert row["answer"] == str(a + b)
            assert row["num_columns"] == max(len(a_text), len(b_text))
            _check_derivation(a, b, row["response"])
            assert check_answer(row["response"], row["answer"])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**7), st.integers(0, 10**7))
def test_derivation_matches_integer_addition(a, b):
    problem = AdditionProblem(a, b)
    _check_derivation(a, b, problem.response)
    assert check_answer(problem.response, str(a + b))


def test_deterministic_for_a_seed_and_seed_dependent(tmp_path):
    def contents(directory, seed):
        paths = make_task_files(str(directory), seed=seed, n_train=50, n_val=10, n_test=10)
        assert sorted(paths) == ["test", "train", "validation"]
        return {split: open(path, "rb").read() for split, path in paths.items()}

    first = contents(tmp_path / "a", seed=3)
    again = contents(tmp_path / "b", seed=3)
    other = contents(tmp_path / "c", seed=4)
    assert first == again
    for split in first:
        assert first[split] != other[split]


def test_splits_are_disjoint_and_duplicate_free(task_dir):
    prompts = {s: [r["prompt"] for r in _read(os.path.join(task_dir, f"{s}.jsonl"))] for s in arithmetic.SPLITS}
    for split, values in prompts.items():
        assert len(set(values)) == len(values), split
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])


def test_digit_range_is_respected():
    import random

    problems = sample_problems(random.Random(0), 300, min_digits=2, max_digits=3)
    lengths = {len(str(p.a)) for p in problems} | {len(str(p.b)) for p in problems}
    assert lengths == {2, 3}
    assert all(10 <= p.a <= 999 and 10 <= p.b <= 999 for p in problems)


def test_bad_arguments_are_refused(tmp_path):
    import random

    with pytest.raises(ValueError, match="count"):  # only 100 one-digit problems exist
        sample_problems(random.Random(0), 60, min_digits=1, max_digits=1)
    with pytest.raises(ValueError, match="min_digits"):
        sample_problems(random.Random(0), 5, min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="n_val"):
        make_task_files(str(tmp_path), seed=0, n_train=5, n_val=-1, n_test=5)
    with pytest.raises(ValueError, match="AdditionProblem.b"):
        AdditionProblem(3, -4)


def test_cli_writes_splits_and_tokenizer(tmp_path):
    arithmetic.main(["--out_dir", str(tmp_path), "--seed", "1", "--n_train", "20", "--n_val", "5", "--n_test", "5"])
    assert [len(_read(tmp_path / f"{s}.jsonl")) for s in arithmetic.SPLITS] == [20, 5, 5]
    assert sorted(os.listdir(tmp_path / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_loads_like_a_qwen_tokenizer(hf_tokenizer):
    tok = hf_tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.bos_token is None
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    # Special tokens: 3, characters: 10 digits + 26 letters + space + newline + 24 punctuation,
    # word pieces: 4.
    assert len(tok) == 3 + 62 + 4 == 69
    # Digit d has id 3 + d (right after the specials); no bos/eos is added around plain text.
    assert tok.encode("120") == [4, 5, 3]


def test_chat_template_matches_qwen_chatml(hf_tokenizer):
    tok = hf_tokenizer
    messages = [{"role": "user", "content": "374+258"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n374+258<|im_end|>\n<|im_start|>assistant\n"
    # Qwen3's `enable_thinking` kwarg (the trainer passes it) is accepted and changes nothing.
    assert text == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    vocab = tok.get_vocab()
    expected_pieces = ["<|im_start|>", "user", "\n", *"374+258", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert ids == [vocab[p] for p in expected_pieces]
    conversation = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "\\boxed{3}"},
    ]
    assert tok.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nadd<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{3}<|im_end|>\n"
    )


def test_encode_decode_round_trips_every_generated_text(task_dir, hf_tokenizer):
    tok = hf_tokenizer
    raw = build_tokenizer()
    word_pieces = set(arithmetic.WORD_TOKENS) | set(arithmetic.SPECIAL_TOKENS)
    for split in arithmetic.SPLITS:
        for row in _read(os.path.join(task_dir, f"{split}.jsonl")):
            conversation = tok.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}],
                tokenize=False,
            )
            for text in (row["prompt"], row["response"]):
                assert tok.decode(tok.encode(text)) == text
            for text in (row["prompt"], row["response"], conversation):
                ids = tok.encode(text)
                assert tok.decode(ids, skip_special_tokens=False) == text
                pieces = tok.convert_ids_to_tokens(ids)
                assert "".join(pieces) == text
                assert all(len(p) == 1 or p in word_pieces for p in pieces)
                assert raw.encode(text).ids == ids  # transformers adds nothing on top


def test_default_sequences_fit_the_demo_length(tmp_path, hf_tokenizer):
    def length(prompt: str, response: str) -> int:
        prompt_ids = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )["input_ids"]
        return len(prompt_ids) + len(hf_tokenizer.encode(response + hf_tokenizer.eos_token))

    # The longest default (max_digits=3) problem, 999+999: 8 template tokens + 7 prompt
    # + 3 steps * 9 + 6 box + 1 eos = 49 tokens.
    longest = AdditionProblem(999, 999)
    assert length(longest.prompt, longest.response) == 49
    make_task_files(str(tmp_path), seed=0, n_train=300, n_val=0, n_test=0)
    lengths = [length(r["prompt"], r["response"]) for r in _read(tmp_path / "train.jsonl")]
    assert 20 <= min(lengths) and max(lengths) <= 49


# ---------------------------------------------------------------------------------------------
# Answer checker
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("4+8+0=12\n7+5+1=13\n3+2+1=6\n\\boxed{632}", True),
        ("\\boxed{ 632 }", True),  # surrounding spaces are stripped
        ("\\boxed{631}\n\\boxed{632}", True),  # the last box decides
        ("\\boxed{632}\n\\boxed{631}", False),
        ("\\boxed{632}\n\\boxed{63", False),  # an unclosed last box is no answer
        ("\\boxed{631}", False),
        ("\\boxed{6320}", False),
        ("\\boxed{}", False),
        ("632", False),  # no box
        ("\\boxed 632", False),
        ("\\boxed{63}2", False),
        ("", False),
    ],
)
def test_check_answer(response, expected):
    assert check_answer(response, "632") is expected
    # One rule for the demo: the trainer grades synthetic rows with grading.grade.
    assert grading.grade(response, "632", arithmetic.DATA_SOURCE) == float(expected)


def test_check_answer_refuses_non_strings():
    with pytest.raises(ValueError, match="answer"):
        check_answer("\\boxed{3}", 3)
    with pytest.raises(ValueError, match="response_text"):
        check_answer(None, "3")
