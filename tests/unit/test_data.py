"""Prompt data: the real Qwen3 tokenizer and chat template, GSM8K prompts, the grain pipeline."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from effopd_jax import data
from helpers_tiny import REPO_ROOT

ROOT = pathlib.Path(REPO_ROOT)
TOKENIZER_DIR = ROOT / "third_party" / "qwen3_tokenizer"
GSM8K_FILE = ROOT / "third_party" / "gsm8k" / "gsm8k_test_100.jsonl"
TOKENIZER_JSON_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K_FILE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def gsm8k(tokenizer):
    """All 100 GSM8K prompts (max_prompt_length large enough to keep them all)."""
    examples, stats = data.load_prompts(GSM8K_FILE, tokenizer, max_prompt_length=1024)
    assert stats.num_kept == 100
    return examples


def _ids(batches) -> list[list[int]]:
    return [b.example_ids.tolist() for b in batches]


# ---------------------------------------------------------------------------------------------
# The real Qwen3 tokenizer and chat template
# ---------------------------------------------------------------------------------------------


def test_pinned_tokenizer_file_is_the_official_one():
    digest = hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == TOKENIZER_JSON_SHA256


def test_qwen3_chat_template_non_thinking(tokenizer, gsm8k_rows, gsm8k):
    question = gsm8k_rows[0]["prompt"]
    expected = (
        "<|im_start|>user\n" + question + "<|im_end|>\n" + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert gsm8k[0].prompt_text == expected
    # Token ids against the raw `tokenizers` library on the hand-built string (independent of
    # transformers and of the chat template).
    raw = tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    expected_ids = raw.encode(expected, add_special_tokens=False).ids
    np.testing.assert_array_equal(gsm8k[0].prompt_token_ids, expected_ids)
    assert expected_ids[:3] == [151644, 872, 198]  # <|im_start|> user \n
    # <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
    assert expected_ids[-9:] == [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643


def test_pipeline_ids_match_transformers_tokenized_template(tokenizer, gsm8k_rows, gsm8k):
    for row, example in zip(gsm8k_rows, gsm8k):
        messages = [{"role": "user", "content": row["prompt"]}]
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, enable_thinking=False, return_dict=True
        )
        np.testing.assert_array_equal(example.prompt_token_ids, encoded["input_ids"])
        assert example.answer == row["answer"]
        assert example.data_source == "gsm8k"
        assert example.messages == messages


def test_thinking_mode_is_a_template_switch(tokenizer):
    examples, _ = data.load_prompts(
        GSM8K_FILE, tokenizer, max_prompt_length=1024, chat_template_kwargs={}, max_examples=1
    )
    assert examples[0].prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<think>" not in examples[0].prompt_text


def test_without_chat_template_the_prompt_is_verbatim(tokenizer, gsm8k_rows):
    examples, _ = data.load_prompts(
        GSM8K_FILE, tokenizer, max_prompt_length=1024, use_chat_template=False, max_examples=3
    )
    raw = tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    for row, example in zip(gsm8k_rows, examples):
        assert example.prompt_text == row["prompt"]
        expected = raw.encode(row["prompt"], add_special_tokens=False).ids
        np.testing.assert_array_equal(example.prompt_token_ids, expected)


# ---------------------------------------------------------------------------------------------
# Loading: filters, formats, malformed rows, errors
# ---------------------------------------------------------------------------------------------


def test_overlong_prompts_are_filtered_and_counted(tokenizer, gsm8k):
    lengths = np.array([len(e.prompt_token_ids) for e in gsm8k])
    limit = int(np.median(lengths))
    examples, stats = data.load_prompts(GSM8K_FILE, tokenizer, max_prompt_length=limit)
    assert stats.num_rows == 100 and stats.num_malformed == 0
    assert stats.num_too_long == int((lengths > limit).sum()) > 0
    assert stats.num_kept == len(examples) == int((lengths <= limit).sum())
    assert stats.longest_kept == int(lengths[lengths <= limit].max()) <= limit
    # The kept ones are the short ones, in file order, renumbered.
    assert [e.origin for e in examples] == [gsm8k[i].origin for i in np.flatnonzero(lengths <= limit)]
    assert [e.example_id for e in examples] == list(range(len(examples)))
    assert f"{stats.num_too_long} longer than max_prompt_length={limit}" in stats.summary()


def test_empty_after_filtering_names_file_and_filter(tokenizer):
    message = r"gsm8k_test_100\.jsonl.*100 longer than max_prompt_length=10 tokens"
    with pytest.raises(ValueError, match=message):
        data.load_prompts(GSM8K_FILE, tokenizer, max_prompt_length=10)


def test_missing_and_unsupported_files(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_prompts(tmp_path / "nope.jsonl", tokenizer, max_prompt_length=64)
    (tmp_path / "x.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        data.load_prompts(tmp_path / "x.csv", tokenizer, max_prompt_length=64)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        data.load_tokenizer(str(tmp_path / "no_tokenizer"))


def test_several_files_are_concatenated(tokenizer, tmp_path):
    first = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"prompt": "A?", "answer": "1"})])
    second = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "B?", "answer": "2", "data_source": "aime24"}]), second)
    examples, stats = data.load_prompts([first, second], tokenizer, max_prompt_length=64)
    assert [e.origin for e in examples] == [f"{first}:1", f"{second}:0"]
    assert [(e.answer, e.data_source) for e in examples] == [("1", "math"), ("2", "aime24")]
    assert stats.files == (str(first), str(second))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_prompts([first, tmp_path / "missing.jsonl"], tokenizer, max_prompt_length=64)


def test_jsonl_and_parquet_give_the_same_examples(tokenizer, gsm8k_rows, gsm8k, tmp_path):
    flat = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(gsm8k_rows), flat)
    # The verl layout the authors train from: chat messages in `prompt`, nested ground truth.
    verl = tmp_path / "gsm8k_verl.parquet"
    verl_rows = [
        {
            "data_source": r["data_source"],
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "reward_model": {"style": "rule", "ground_truth": r["answer"]},
        }
        for r in gsm8k_rows
    ]
    pq.write_table(pa.Table.from_pylist(verl_rows), verl)
    from_flat, _ = data.load_prompts(flat, tokenizer, max_prompt_length=1024)
    from_verl, _ = data.load_prompts(
        verl, tokenizer, max_prompt_length=1024, answer_key="reward_model.ground_truth"
    )
    for other in (from_flat, from_verl):
        assert len(other) == len(gsm8k)
        for a, b in zip(gsm8k, other):
            np.testing.assert_array_equal(a.prompt_token_ids, b.prompt_token_ids)
            assert (a.prompt_text, a.answer, a.data_source) == (b.prompt_text, b.answer, b.data_source)
    # Same batches from the pipeline, too.
    kw = dict(prompts_per_step=10, seed=3, num_epochs=1, process_index=0, process_count=1)
    assert _ids(data.train_iterator(gsm8k, **kw)) == _ids(data.train_iterator(from_flat, **kw))


def _write_jsonl(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MIXED_LINES = [
    json.dumps({"prompt": "What is 2+2?", "answer": "4", "data_source": "math"}),  # 1 ok
    "{not json",  # 2 bad
    json.dumps({"prompt": "What is 3+3?"}),  # 3 bad: no answer
    json.dumps({"answer": "1"}),  # 4 bad: no prompt
    "",  # 5 blank: not a row
    json.dumps({"messages": [{"role": "user", "content": "Hi"}], "answer": 42}),  # 6 ok, numeric answer
    json.dumps({"prompt": "Q", "answer": ["4"]}),  # 7 bad: list answer
    json.dumps({"messages": [{"role": "user"}], "answer": "1"}),  # 8 bad: no content
    json.dumps({"prompt": "   ", "answer": "1"}),  # 9 bad: empty prompt
    json.dumps({"prompt": "Q", "answer": True}),  # 10 bad: bool answer
    json.dumps(["a", "list"]),  # 11 bad: not an object
    json.dumps({"prompt": "Q?", "answer": "7", "data_source": 3}),  # 12 bad: data_source type
    json.dumps({"prompt": "What is 5+5?", "answer": "10"}),  # 13 ok, default data source
]


def test_malformed_rows_are_skipped_and_counted(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", MIXED_LINES)
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64)
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:6", f"{path}:13"]
    assert [e.answer for e in examples] == ["4", "42", "10"]
    assert [e.data_source for e in examples] == ["math", "math", "math"]
    assert stats.num_rows == 12 and stats.num_malformed == 9 and stats.num_kept == 3
    assert len(stats.malformed_examples) == data.MAX_REPORTED_BAD_ROWS
    assert stats.malformed_examples[0].startswith(f"{path}:2: invalid JSON")
    assert stats.malformed_examples[1] == f"{path}:3: no 'answer' field"
    assert stats.malformed_examples[2] == f"{path}:4: no 'prompt' or 'messages' field"
    assert "9 malformed" in stats.summary()


def test_malformed_rows_raise_when_asked(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", MIXED_LINES)
    with pytest.raises(ValueError, match=rf"{path}:2: malformed row: invalid JSON"):
        data.load_prompts(path, tokenizer, max_prompt_length=64, on_bad_row="raise")
    path = _write_jsonl(tmp_path / "one_bad.jsonl", [MIXED_LINES[0], MIXED_LINES[6]])
    with pytest.raises(ValueError, match=rf"{path}:2: malformed row: 'answer' must be a string or a number"):
        data.load_prompts(path, tokenizer, max_prompt_length=64, on_bad_row="raise")


def test_all_malformed_is_an_empty_dataset_error(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", MIXED_LINES[1:4])
    with pytest.raises(ValueError, match=r"no prompts left in .*bad\.jsonl: 3 rows read, 3 malformed"):
        data.load_prompts(path, tokenizer, max_prompt_length=64)


def test_answers_optional_for_training(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "noanswer.jsonl", [json.dumps({"prompt": "Tell me a story."})])
    examples, _ = data.load_prompts(path, tokenizer, max_prompt_length=64, require_answer=False)
    assert examples[0].answer is None
    with pytest.raises(ValueError, match="always requires answers"):
        data.load_eval_set(path, tokenizer, max_prompt_length=64, require_answer=False)


def test_eval_set_is_all_rows_in_file_order(tokenizer, gsm8k):
    examples, stats = data.load_eval_set(GSM8K_FILE, tokenizer, max_prompt_length=1024)
    assert [e.origin for e in examples] == [e.origin for e in gsm8k]
    first, _ = data.load_eval_set(GSM8K_FILE, tokenizer, max_prompt_length=1024, max_examples=7)
    assert [e.origin for e in first] == [e.origin for e in gsm8k[:7]]
    batch = data.batch_examples(first)
    assert len(batch) == 7 and batch.example_ids.tolist() == list(range(7))


# ---------------------------------------------------------------------------------------------
# The grain pipeline
# ---------------------------------------------------------------------------------------------


def _run(examples, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return list(data.train_iterator(examples, **kw))


def test_same_seed_same_batches_different_seed_different(gsm8k):
    a = _ids(_run(gsm8k, prompts_per_step=8, seed=5, num_epochs=2))
    b = _ids(_run(gsm8k, prompts_per_step=8, seed=5, num_epochs=2))
    c = _ids(_run(gsm8k, prompts_per_step=8, seed=6, num_epochs=2))
    assert a == b
    assert a != c
    # Neighbouring seeds do not share epoch orders (e.g. seed 6's first epoch is not seed 5's second).
    assert a[:12] != c[12:] and a[12:] != c[:12]
    for run in (a, c):
        assert all(len(set(sum(run[e * 12 : (e + 1) * 12], []))) == 96 for e in range(2))


def test_epochs_cover_each_prompt_once(gsm8k):
    examples = gsm8k[:96]
    batches = _run(examples, prompts_per_step=8, seed=0, num_epochs=3)
    assert len(batches) == 3 * data.steps_per_epoch(96, 8) == 36
    epochs = [sum(_ids(batches[e * 12 : (e + 1) * 12]), []) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(96))
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert epochs[0] != list(range(96))
    # With a remainder (100 = 12 * 8 + 4): 12 batches per epoch, no prompt twice in an epoch.
    batches = _run(gsm8k, prompts_per_step=8, seed=0, num_epochs=2)
    assert len(batches) == 24
    for e in range(2):
        ids = sum(_ids(batches[e * 12 : (e + 1) * 12]), [])
        assert len(ids) == len(set(ids)) == 96


def test_unshuffled_keeps_file_order(gsm8k):
    batches = _run(gsm8k, prompts_per_step=25, seed=0, shuffle=False, num_epochs=2)
    assert _ids(batches) == [list(range(i, i + 25)) for i in (0, 25, 50, 75)] * 2


def test_batch_contents_match_examples(gsm8k):
    batch = _run(gsm8k, prompts_per_step=4, seed=1, num_epochs=1)[0]
    for i, example_id in enumerate(batch.example_ids):
        example = gsm8k[example_id]
        np.testing.assert_array_equal(batch.prompt_token_ids[i], example.prompt_token_ids)
        assert batch.prompt_texts[i] == example.prompt_text
        assert batch.answers[i] == example.answer
        assert batch.data_sources[i] == example.data_source
        assert batch.messages[i] == example.messages


def test_process_split_is_disjoint_and_covers_the_global_batch(gsm8k):
    single = _ids(_run(gsm8k, prompts_per_step=12, seed=2, num_epochs=2))
    per_process = [
        _ids(_run(gsm8k, prompts_per_step=12, seed=2, num_epochs=2, process_index=p, process_count=4))
        for p in range(4)
    ]
    assert all(len(steps) == len(single) == 16 for steps in per_process)
    for step, global_batch in enumerate(single):
        parts = [per_process[p][step] for p in range(4)]
        assert all(len(part) == 3 for part in parts)
        assert sum(parts, []) == global_batch  # contiguous slices in process order
        assert len(set(sum(parts, []))) == 12  # disjoint


def test_iterator_state_restores_at_the_next_batch(gsm8k):
    kw = dict(prompts_per_step=8, seed=11, num_epochs=3, process_index=1, process_count=2)
    reference = _ids(data.train_iterator(gsm8k, **kw))
    for stop in (0, 5, 11, 12, 30):  # incl. the last batch of an epoch and the next epoch
        iterator = data.train_iterator(gsm8k, **kw)
        for _ in range(stop):
            next(iterator)
        state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it
        resumed = data.train_iterator(gsm8k, **kw)
        resumed.set_state(state)
        assert _ids(resumed) == reference[stop:]


def test_iterator_state_through_orbax(gsm8k, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    kw = dict(prompts_per_step=10, seed=4, num_epochs=2, process_index=0, process_count=1)
    iterator = data.train_iterator(gsm8k, **kw)
    for _ in range(7):
        next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _ids(iterator)
    resumed = data.train_iterator(gsm8k, **kw)
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert _ids(resumed) == expected and len(expected) == 13
    manager.close()


def test_pipeline_argument_checks(gsm8k):
    with pytest.raises(ValueError, match="not divisible by the process count 4"):
        data.train_dataset(gsm8k, prompts_per_step=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="larger than the 100 prompts"):
        data.train_dataset(gsm8k, prompts_per_step=101, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        data.train_dataset(gsm8k, prompts_per_step=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="num_epochs"):
        data.train_dataset(gsm8k, prompts_per_step=4, seed=0, num_epochs=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed"):
        data.train_dataset(gsm8k, prompts_per_step=4, seed=-1, process_index=0, process_count=1)


def test_default_process_split_comes_from_jax(gsm8k):
    import jax

    dataset = data.train_dataset(gsm8k, prompts_per_step=4, seed=0, num_epochs=1)
    assert jax.process_count() == 1 and len(dataset[0]) == 4


def test_left_pad():
    tokens, mask = data.left_pad([np.array([5, 6, 7]), [9], []], pad_id=0, length=4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert tokens.dtype == np.int32 and mask.dtype == bool
    with pytest.raises(ValueError, match="more than length=2"):
        data.left_pad([[1, 2, 3]], pad_id=0, length=2)


# ---------------------------------------------------------------------------------------------
# What the teachers read: reference solutions, routing tags, the raw rows of a step
# ---------------------------------------------------------------------------------------------


def test_gsm8k_rows_carry_their_worked_solutions(gsm8k_rows, gsm8k):
    assert [e.solution for e in gsm8k] == [row["solution"] for row in gsm8k_rows]
    assert all(e.solution.rstrip().endswith(f"#### {row['answer']}") for e, row in zip(gsm8k, gsm8k_rows))
    assert [e.route_tag for e in gsm8k] == ["gsm8k"] * 100  # by default the data_source


def test_solution_and_route_tag_from_nested_fields(tokenizer, tmp_path):
    rows = [
        {"prompt": "a", "answer": "1", "extra_info": {"ref_solution": "S1", "opd_teacher": "code"}},
        {"prompt": "b", "answer": "2", "extra_info": {"ref_solution": "  ", "opd_teacher": None}},
        {"prompt": "c", "answer": "3"},
        {"prompt": "d", "answer": "4", "extra_info": {"ref_solution": ["not", "text"]}},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64, solution_key="extra_info.ref_solution",
                                        route_key="extra_info.opd_teacher")
    assert [(e.solution, e.route_tag, e.data_source) for e in examples] == [
        ("S1", "code", "math"), (None, None, "math"), (None, None, "math")]  # blank or missing: None
    assert stats.num_malformed == 1 and "'extra_info.ref_solution' must be a string, got list" in stats.malformed_examples[0]


def test_a_step_repeats_each_prompt_with_its_raw_row(gsm8k):
    batch = data.batch_examples(gsm8k[:3])
    rows = batch.repeat(2)
    assert rows.example_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert [m[0]["content"] for m in rows.messages] == [gsm8k[i].messages[0]["content"] for i in (0, 0, 1, 1, 2, 2)]
    assert rows.solutions == [gsm8k[i].solution for i in (0, 0, 1, 1, 2, 2)]
    assert rows.route_tags == ["gsm8k"] * 6 and len(rows) == 6
    with pytest.raises(ValueError, match="times must be >= 1"):
        batch.repeat(0)
