"""Hostile inputs: random malformed prompt files and random bad config values (hypothesis).

The data reader and the config check may only fail with their documented errors:

* :func:`effopd_jax.data.load_prompts` with ``on_bad_row="skip"`` keeps exactly the well-formed
  rows (checked against an oracle written here from the documented rules), counts the rest, and
  raises ValueError only when nothing is left; with ``on_bad_row="raise"`` it raises ValueError
  naming ``file:line`` of the first malformed row.
* :func:`effopd_jax.config.validate_config` accepts a mutated config exactly when this file's own
  reading of the documented rules (what each kind of field allows, when a field applies, the
  rules across fields) finds nothing wrong, and otherwise raises ValueError naming a field that
  reading finds wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tempfile

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effopd_jax import config as config_lib
from effopd_jax import config_schema as schema
from effopd_jax import data
from tests.helpers_tiny import QWEN3_TOKENIZER_DIR

# Row construction in the tests is cheap; the Qwen3 template + tokenizer run per row.
SETTINGS = settings(
    deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
ROLES = ("system", "user", "assistant", "tool")  # the roles Qwen's chat template renders
LARGE_MAX_PROMPT_LENGTH = 4096  # larger than any prompt generated here


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(QWEN3_TOKENIZER_DIR)


# ---------------------------------------------------------------------------------------------
# The oracle: the documented row rules, written independently of effopd_jax.data
# ---------------------------------------------------------------------------------------------


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nonblank_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and _encodable(value)


def _messages_ok(value) -> bool:
    if not isinstance(value, list) or not value:
        return False
    for message in value:
        if not isinstance(message, dict):
            return False
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(role, str) or not isinstance(content, str) or not _encodable(content):
            return False
    return any(m["role"] == "user" and m["content"].strip() for m in value)


def _answer_ok(value) -> bool:
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, str):
        return _nonblank_text(value)
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def _nested(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def expected_ok(row, answer_key: str = "answer") -> bool:
    """Whether a parsed row is well-formed under load_prompts' documented rules (require_answer)."""
    if not isinstance(row, dict):
        return False
    messages, prompt = row.get("messages"), row.get("prompt")
    if messages is not None:
        prompt_ok = _messages_ok(messages)
    elif isinstance(prompt, str):
        prompt_ok = _nonblank_text(prompt)
    else:
        prompt_ok = _messages_ok(prompt)
    source = row.get("data_source")
    source_ok = source is None or _nonblank_text(source)
    return prompt_ok and _answer_ok(_nested(row, answer_key)) and source_ok


def expected_jsonl_line(raw: bytes) -> str:
    """``"blank"``, ``"ok"`` or ``"bad"`` for one JSONL line (without its line break)."""
    if not raw.strip(b" \t\r\n"):
        return "blank"
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "bad"
    return "ok" if expected_ok(value) else "bad"


# ---------------------------------------------------------------------------------------------
# Strategies for JSONL lines
# ---------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
nonblank_text = st.text(min_size=1, max_size=30).filter(lambda s: bool(s.strip()))
roles = st.sampled_from(ROLES + ("", "User", "function")) | json_scalars
message = st.fixed_dictionaries({}, optional={"role": roles, "content": st.text(max_size=20) | json_values})
messages = st.lists(message | json_values, max_size=3) | json_values
answers = st.one_of(st.text(max_size=10), nonblank_text, st.integers(), st.floats(), json_values)
# A random object with or without each field, each of a random type.
random_rows = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=30), nonblank_text, messages, json_values),
        "messages": messages,
        "answer": answers,
        "data_source": st.text(max_size=8) | json_values,
        "extra": json_values,
    },
)
# Well-formed rows, so that every file mixes good and bad lines.
good_rows = st.one_of(
    st.fixed_dictionaries(
        {"prompt": nonblank_text, "answer": nonblank_text | st.integers() | st.floats(allow_nan=False, allow_infinity=False)},
        optional={"data_source": st.sampled_from(["math", "gsm8k"])},
    ),
    st.fixed_dictionaries(
        {
            "messages": st.tuples(
                st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=15)}), max_size=2),
                st.fixed_dictionaries({"role": st.just("user"), "content": nonblank_text}),
            ).map(lambda t: [*t[0], t[1]]),
            "answer": nonblank_text,
        }
    ),
)
# Hand-picked hostile lines (bytes, as they would sit in the file).
SPECIAL_LINES = [
    b'{"prompt": "What is 1+1?", "answer": "2"}',  # fine
    b'{"prompt": "q", "answer": NaN}',
    b'{"prompt": "q", "answer": Infinity}',
    b'{"prompt": "q", "answer": -Infinity}',
    b'{"prompt": "q", "answer": 1e999}',  # parses as inf
    b'{"prompt": "q", "answer": ' + b"7" * 5000 + b"}",  # over Python's int-to-str digit limit
    b"[" * 50_000,  # nesting too deep for the JSON parser
    b'{"prompt": "\\ud800 lone surrogate", "answer": "1"}',
    b'{"messages": [{"role": "user", "content": "\\udfff"}], "answer": "1"}',
    b'{"prompt": "q", "answer": "\\ud83d"}',
    b'{"prompt": "q", "answer": "1", "data_source": "\\udc80"}',
    b'{"prompt": "q", "answer": "1"',  # truncated object
    b'{"prompt": "\xff\xfe", "answer": "1"}',  # invalid UTF-8 inside a string
    b"\xc3\x28",  # invalid 2-byte sequence
    b"\xef\xbb\xbf" + b'{"prompt": "q", "answer": "1"}',  # a BOM that is not at the start of the file
    b"\xc2\xa0",  # a non-breaking space: not JSON whitespace, so not blank
    b"\x0c",  # form feed: not JSON whitespace
    b" \t\r",  # blank
    b"null",
    b"42",
    b'"a string"',
    b"[]",
    b"{}",
    b"true",
    b'{"prompt": "", "answer": "1"}',
    b'{"prompt": " \\n\\t ", "answer": "1"}',
    b'{"messages": [], "answer": "1"}',
    b'{"messages": {"role": "user", "content": "hi"}, "answer": "1"}',
    b'{"messages": [{"role": "user", "content": 5}], "answer": "1"}',
    b'{"messages": [{"role": "narrator", "content": "hi"}], "answer": "1"}',
    b'{"messages": [{"role": "system", "content": "hi"}], "answer": "1"}',  # no user turn
    b'{"messages": null, "prompt": "fallback", "answer": "1"}',  # null messages: the prompt is used
    b'{"prompt": 12, "answer": "1"}',
    b'{"prompt": "q", "answer": [1]}',
    b'{"prompt": "q", "answer": false}',
    b'{"prompt": "q", "answer": "  "}',
    b'{"prompt": "q", "answer": 3, "data_source": ""}',
    b'{"prompt": "q", "answer": 3, "data_source": 7}',
]


def _dumps(value, ensure_ascii: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8")


jsonl_lines = st.one_of(
    st.builds(_dumps, good_rows, st.booleans()),
    st.builds(_dumps, random_rows, st.booleans()),
    st.builds(_dumps, json_values, st.booleans()),
    st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from(SPECIAL_LINES),
)


@st.composite
def jsonl_files(draw):
    """``(file bytes, [status of line 1, line 2, ...])``."""
    lines = draw(st.lists(jsonl_lines, max_size=10))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = draw(st.booleans())
    trailing_newline = draw(st.booleans())
    content = (b"\xef\xbb\xbf" if bom else b"") + newline.join(lines) + (newline if trailing_newline and lines else b"")
    # The file's first line without one leading BOM (the drawn first line may itself start with one).
    first_lines = [((b"\xef\xbb\xbf" if bom else b"") + lines[0]).removeprefix(b"\xef\xbb\xbf")] if lines else []
    statuses = [expected_jsonl_line(line) for line in first_lines + lines[1:]]
    return content, statuses


def _check_load(tokenizer, path: str, statuses: list[str], max_prompt_length: int, answer_key: str = "answer",
                origin=lambda i: i + 1):
    """Runs load_prompts in both modes and checks the outcome against the per-row ``statuses``."""
    ok_rows = [origin(i) for i, s in enumerate(statuses) if s == "ok"]
    bad_rows = [origin(i) for i, s in enumerate(statuses) if s == "bad"]
    kwargs = dict(max_prompt_length=max_prompt_length, answer_key=answer_key)

    # on_bad_row="skip": every row counted once; only an empty result raises.
    try:
        examples, stats = data.load_prompts(path, tokenizer, on_bad_row="skip", **kwargs)
    except ValueError as e:
        assert str(e).startswith(f"no prompts left in {path}: {len(ok_rows) + len(bad_rows)} rows read"), str(e)
        assert f"{len(bad_rows)} malformed" in str(e)
        if max_prompt_length == LARGE_MAX_PROMPT_LENGTH:
            assert not ok_rows
        kept_origins = []
    else:
        assert stats.num_rows == len(ok_rows) + len(bad_rows)
        assert stats.num_malformed == len(bad_rows)
        assert stats.num_kept + stats.num_too_long == len(ok_rows)
        assert len(stats.malformed_examples) == min(len(bad_rows), data.MAX_REPORTED_BAD_ROWS)
        for reason, row in zip(stats.malformed_examples, bad_rows):
            assert reason.startswith(f"{path}:{row}: ")
        kept_origins = [e.origin for e in examples]
        assert set(kept_origins) <= {f"{path}:{row}" for row in ok_rows}
        if max_prompt_length == LARGE_MAX_PROMPT_LENGTH:
            assert kept_origins == [f"{path}:{row}" for row in ok_rows]
        for e in examples:
            assert 1 <= len(e.prompt_token_ids) <= max_prompt_length and e.prompt_token_ids.dtype.name == "int32"
            assert isinstance(e.answer, str) and e.answer.strip()
            assert isinstance(e.data_source, str) and e.data_source.strip()
            assert any(m["role"] == "user" for m in e.messages)

    # on_bad_row="raise": the first malformed row, named by file and line/row.
    try:
        raised, _ = data.load_prompts(path, tokenizer, on_bad_row="raise", **kwargs)
    except ValueError as e:
        if bad_rows:
            assert str(e).startswith(f"{path}:{bad_rows[0]}: malformed row: "), str(e)
        else:
            assert str(e).startswith(f"no prompts left in {path}"), str(e)
    else:
        assert not bad_rows
        assert [e.origin for e in raised] == kept_origins


@SETTINGS
@given(file=jsonl_files(), small=st.booleans())
def test_random_jsonl_files_fail_only_as_documented(tokenizer, file, small):
    content, statuses = file
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.jsonl")
        with open(path, "wb") as f:
            f.write(content)
        _check_load(tokenizer, path, statuses, 12 if small else LARGE_MAX_PROMPT_LENGTH)


# ---------------------------------------------------------------------------------------------
# Hand-written JSONL cases: the reasons, and files that are empty / BOM / CRLF / no final newline
# ---------------------------------------------------------------------------------------------


def _write(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


GOOD = b'{"prompt": "What is 2+3?", "answer": "5"}'


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"prompt": "caf\xe9", "answer": "1"}', "not valid UTF-8 at byte 15 of the line (byte 0xe9)"),
        (b'{"prompt": "q", "answer": NaN}', "'answer' is not finite: nan"),
        (b'{"prompt": "q", "answer": ' + b"9" * 5000 + b"}", "an integer literal has more than 4300 digits"),
        (b"[" * 50_000, "nested too deeply"),
        (b'{"prompt": "\\ud800", "answer": "1"}', "'prompt' is not valid Unicode (a lone surrogate at character 0)"),
        (b"null", "a row must be an object, got NoneType"),
        (b"[1, 2]", "a row must be an object, got list"),
        (b'{"prompt": {"text": "q"}, "answer": "1"}', "'prompt' must be a string or a list of chat messages, got dict"),
        (b'{"messages": [], "answer": "1"}', "'messages' is an empty list of chat messages"),
        (b'{"messages": [{"role": "user", "content": ["x"]}], "answer": "1"}',
         "'messages[0]' needs a string 'role' and a string 'content', got str and list"),
        (b'{"messages": [{"role": "bot", "content": "x"}], "answer": "1"}', "'messages[0].role' must be one of"),
        (b'{"messages": [{"role": "user", "content": "  "}], "answer": "1"}',
         "'messages' has no user message with non-blank content"),
        (b'{"prompt": "q", "answer": "1", "data_source": ["a"]}', "'data_source' must be a string, got list"),
    ],
)
def test_each_rejection_has_its_reason(tokenizer, tmp_path, line, reason):
    path = _write(tmp_path, "p.jsonl", GOOD + b"\n" + line + b"\n")
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64)
    assert [e.origin for e in examples] == [f"{path}:1"]
    assert stats.num_malformed == 1
    assert stats.malformed_examples[0].startswith(f"{path}:2: ") and reason in stats.malformed_examples[0]
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: malformed row: ") + ".*" + re.escape(reason)):
        data.load_prompts(path, tokenizer, max_prompt_length=64, on_bad_row="raise")


def test_one_non_utf8_line_does_not_spoil_the_file(tokenizer, tmp_path):
    path = _write(tmp_path, "p.jsonl", GOOD + b"\n\xff\xfe\xfd\n" + GOOD.replace(b"2+3", b"4+4") + b"\n")
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64)
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:3"]
    assert stats.malformed_examples == (f"{path}:2: not valid UTF-8 at byte 0 of the line (byte 0xff)",)


def test_bom_crlf_and_missing_final_newline_are_accepted(tokenizer, tmp_path):
    reference, _ = data.load_prompts(_write(tmp_path, "ref.jsonl", GOOD + b"\n" + GOOD + b"\n"), tokenizer,
                                     max_prompt_length=64)
    path = _write(tmp_path, "p.jsonl", b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n" + GOOD)
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64)
    assert stats.num_rows == 2 and stats.num_malformed == 0
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:3"]
    assert [e.prompt_text for e in examples] == [e.prompt_text for e in reference]
    assert examples[0].messages == [{"role": "user", "content": "What is 2+3?"}]


def test_truncated_last_line_is_one_bad_row(tokenizer, tmp_path):
    path = _write(tmp_path, "p.jsonl", GOOD + b"\n" + GOOD[:-7])
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64)
    assert len(examples) == 1 and stats.num_malformed == 1
    assert stats.malformed_examples[0].startswith(f"{path}:2: invalid JSON")


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n  \r\n\t\n"])
def test_empty_file_is_the_empty_dataset_error(tokenizer, tmp_path, content):
    path = _write(tmp_path, "p.jsonl", content)
    for mode in ("skip", "raise"):
        with pytest.raises(ValueError, match=re.escape(f"no prompts left in {path}: 0 rows read")):
            data.load_prompts(path, tokenizer, max_prompt_length=64, on_bad_row=mode)


# ---------------------------------------------------------------------------------------------
# Parquet: random schemas and values
# ---------------------------------------------------------------------------------------------

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
# kind -> (arrow type, strategy for one non-null value)
PARQUET_KINDS = {
    "string": (pa.string(), st.text(max_size=20) | nonblank_text),
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "float": (pa.float64(), st.floats()),
    "bool": (pa.bool_(), st.booleans()),
    "binary": (pa.binary(), st.binary(max_size=8)),
    "strings": (pa.list_(pa.string()), st.lists(st.text(max_size=5), max_size=3)),
    "messages": (
        pa.list_(MESSAGE_TYPE),
        st.lists(
            st.fixed_dictionaries({"role": st.none() | st.sampled_from(ROLES + ("bot",)),
                                   "content": st.none() | st.text(max_size=10) | nonblank_text}),
            max_size=3,
        ),
    ),
    "ground_truth": (pa.struct([("ground_truth", pa.string())]), st.fixed_dictionaries({"ground_truth": st.none() | nonblank_text})),
    "ground_truth_int": (pa.struct([("ground_truth", pa.int64())]), st.fixed_dictionaries({"ground_truth": st.none() | st.integers(-5, 5)})),
    "no_ground_truth": (pa.struct([("style", pa.string())]), st.fixed_dictionaries({"style": st.just("rule")})),
    "null": (pa.null(), st.none()),
}
PARQUET_COLUMNS = {
    "prompt": ["string", "messages", "int", "float", "bool", "binary", "strings", "null", "ground_truth"],
    "messages": ["messages", "string", "strings", "null", "int"],
    "answer": ["string", "int", "float", "bool", "strings", "binary", "null", "messages"],
    "data_source": ["string", "int", "null"],
    "reward_model": ["ground_truth", "ground_truth_int", "no_ground_truth", "string", "null"],
}

USABLE_KINDS = {"prompt": ["string", "messages"], "answer": ["string", "int"], "data_source": ["string"]}
USABLE_VALUES = {
    "string": nonblank_text,
    "messages": st.tuples(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=10)}), max_size=1),
        st.fixed_dictionaries({"role": st.just("user"), "content": nonblank_text}),
    ).map(lambda t: [*t[0], t[1]]),
}


def _invalid_utf8_strings(values: list) -> pa.Array:
    """A string array whose non-null entries are raw bytes (possibly invalid UTF-8), unvalidated."""
    offsets, blob = [0], b""
    for value in values:
        blob += value or b""
        offsets.append(len(blob))
    validity = pa.array([v is not None for v in values], pa.bool_()).buffers()[1]
    return pa.StringArray.from_buffers(
        len(values), pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(blob), validity
    )


@st.composite
def parquet_tables(draw):
    """``(table, python rows as written, answer_key)``."""
    num_rows = draw(st.integers(0, 6))
    columns, rows = {}, [{} for _ in range(num_rows)]
    # Half the tables have a usable schema (a string/messages prompt and a string/int answer) with
    # mostly good values, so that good and bad rows mix; the rest are random.
    usable = draw(st.booleans())
    for name, kinds in PARQUET_COLUMNS.items():
        if usable and name in USABLE_KINDS:
            kind = draw(st.sampled_from(USABLE_KINDS[name]))
            arrow_type, value_strategy = PARQUET_KINDS[kind]
            value_strategy = USABLE_VALUES.get(kind, value_strategy)
        elif not usable and draw(st.booleans()):
            kind = draw(st.sampled_from(kinds))
            arrow_type, value_strategy = PARQUET_KINDS[kind]
        else:
            continue
        values = draw(st.lists(value_strategy | st.none(), min_size=num_rows, max_size=num_rows))
        if name == "prompt" and kind == "string" and draw(st.booleans()):
            # Raw bytes in a string column: rows with invalid UTF-8 must be malformed on their own.
            raw = draw(st.lists(st.none() | st.binary(max_size=6) | st.binary(max_size=4).map(lambda b: b + b"\xff")
                                | nonblank_text.map(str.encode), min_size=num_rows, max_size=num_rows))
            columns[name] = _invalid_utf8_strings(raw)
            values = []
            for value in raw:
                try:
                    values.append(None if value is None else value.decode("utf-8"))
                except UnicodeDecodeError:
                    values.append(UnicodeDecodeError)  # marks the row as undecodable
        else:
            columns[name] = pa.array(values, type=arrow_type)
        for row, value in zip(rows, values):
            row[name] = value
    answer_key = "answer" if usable else draw(st.sampled_from(["answer", "reward_model.ground_truth"]))
    table = pa.table(columns) if columns else pa.table({"unrelated": pa.array([1] * num_rows, pa.int64())})
    if not columns:
        rows = [{"unrelated": 1} for _ in range(num_rows)]
    return table, rows, answer_key


@SETTINGS
@given(case=parquet_tables(), small=st.booleans())
def test_random_parquet_rows_fail_only_as_documented(tokenizer, case, small):
    table, rows, answer_key = case
    statuses = [
        "bad" if UnicodeDecodeError in row.values() else ("ok" if expected_ok(row, answer_key) else "bad")
        for row in rows
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.parquet")
        pq.write_table(table, path)
        _check_load(tokenizer, path, statuses, 12 if small else LARGE_MAX_PROMPT_LENGTH, answer_key=answer_key,
                    origin=lambda i: i)


def test_verl_layout_parquet_with_hostile_rows(tokenizer, tmp_path):
    """The authors' layout: prompt = messages, answer nested in reward_model; None and bad types mixed in."""
    rows = [
        {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}, "data_source": "math"},
        {"prompt": [{"role": "user", "content": None}], "reward_model": {"ground_truth": "2"}, "data_source": "math"},
        {"prompt": [], "reward_model": {"ground_truth": "2"}, "data_source": "math"},
        {"prompt": None, "reward_model": {"ground_truth": "2"}, "data_source": "math"},
        {"prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"ground_truth": None}, "data_source": None},
        {"prompt": [{"role": "user", "content": "3+3?"}], "reward_model": None, "data_source": "math"},
        {"prompt": [{"role": "user", "content": "4+4?"}], "reward_model": {"ground_truth": "8"}, "data_source": "gsm8k"},
    ]
    path = str(tmp_path / "verl.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64, answer_key="reward_model.ground_truth")
    assert [(e.origin, e.answer, e.data_source) for e in examples] == [(f"{path}:0", "2", "math"),
                                                                        (f"{path}:6", "8", "gsm8k")]
    assert stats.num_malformed == 5
    assert stats.malformed_examples == (
        f"{path}:1: 'prompt[0]' needs a string 'role' and a string 'content', got str and NoneType",
        f"{path}:2: 'prompt' is an empty list of chat messages",
        f"{path}:3: no 'prompt' or 'messages' field",
        f"{path}:4: no 'reward_model.ground_truth' field",
        f"{path}:5: no 'reward_model.ground_truth' field",
    )


def test_invalid_utf8_in_a_parquet_string_column_is_one_bad_row(tokenizer, tmp_path):
    table = pa.table({"prompt": _invalid_utf8_strings([b"What is 1+1?", b"caf\xe9", b"What is 2+2?"]),
                      "answer": pa.array(["2", "?", "4"])})
    path = str(tmp_path / "p.parquet")
    pq.write_table(table, path)
    examples, stats = data.load_prompts(path, tokenizer, max_prompt_length=64)
    assert [e.origin for e in examples] == [f"{path}:0", f"{path}:2"]
    assert stats.malformed_examples == (f"{path}:1: a string value is not valid UTF-8 (unexpected end of data at byte 3)",)


@SETTINGS
@given(cut=st.floats(0.0, 0.999))
def test_a_damaged_parquet_file_is_refused_naming_it(tokenizer, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.parquet")
        pq.write_table(pa.table({"prompt": ["What is 1+1?"] * 3, "answer": ["2"] * 3}), path)
        with open(path, "rb") as f:
            content = f.read()
        with open(path, "wb") as f:
            f.write(content[: int(cut * len(content))])
        for mode in ("skip", "raise"):
            with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be read as Parquet")):
                data.load_prompts(path, tokenizer, max_prompt_length=64, on_bad_row=mode)


# ---------------------------------------------------------------------------------------------
# Config validation: random mutations of a valid config
# ---------------------------------------------------------------------------------------------
# Which fields exist, of which kind, with which bounds and when they apply comes from the schema
# (config_lib.FIELDS, config_lib.TEACHER_FIELDS, kinds and conditions as data). What a kind
# *means* ("an int in [low, high]", "an existing prompt file"), how a condition is evaluated,
# and the rules across fields are written here again, from the documentation, so that the test
# checks validate_config against an independent reading rather than against itself.


def _real(value) -> float | None:
    """The float value of a non-bool int/float, or None for anything else."""
    if type(value) not in (int, float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _digits(value) -> bool:
    return type(value) is str and value.isascii() and value.isdigit() and len(value) < 100


def _int_ok(kind: schema.Int, value) -> bool:
    if any(type(value) is type(special) and value == special for special in kind.special):
        return True
    if kind.digit_strings and _digits(value):
        value = int(value)
    return type(value) is int and kind.low <= value <= kind.high


def _real_ok(kind: schema.Real, value) -> bool:
    if value is None:
        return kind.none_ok
    x = _real(value)
    if x is None or not math.isfinite(x):
        return False
    return (x > kind.low if kind.low_open else x >= kind.low) and (x < kind.high if kind.high_open else x <= kind.high)


def _model_path_ok(value, config_file_ok: bool) -> bool:
    if type(value) is not str or not value:
        return False
    if os.path.isdir(value):
        return os.path.isfile(os.path.join(value, "config.json"))
    return config_file_ok and os.path.isfile(value) and value.lower().endswith(".json")


def _prompt_files_ok(kind: schema.PromptFiles, value) -> bool:
    return (
        type(value) in (tuple, list)
        and len(value) >= kind.min_count
        and all(type(p) is str and os.path.isfile(p) and p.lower().endswith(kind.suffixes) for p in value)
    )


def _str_keyed_ok(value) -> bool:
    if not isinstance(value, (dict, ml_collections.ConfigDict)):
        return False
    try:
        return all(type(k) is str for k in value.keys())
    except TypeError:  # a ConfigDict with mixed key types cannot list its keys
        return False


def _holds(condition, values: dict) -> bool | None:
    """The condition over checked values; None when a field it reads is not valid itself."""
    if not all(name in values for name in condition.fields):
        return None
    if isinstance(condition, schema.AllOf):
        return all(_holds(part, values) for part in condition.conditions)
    if isinstance(condition, schema.AnyOf):
        return any(_holds(part, values) for part in condition.conditions)
    value = values[condition.field]
    if isinstance(condition, schema.LongerThan):
        return len(value) > condition.count
    if isinstance(condition, schema.Equals):
        return value == condition.value
    if isinstance(condition, schema.NotEquals):
        return value != condition.value
    if isinstance(condition, schema.Greater):
        return value > condition.value
    if isinstance(condition, schema.NonEmpty):
        return len(value) > 0
    raise AssertionError(f"a condition this test does not know: {condition}")


def _value_ok(kind, value, values: dict) -> bool | None:
    """Whether ``value`` is allowed by ``kind`` (None: cannot tell, a field it depends on is bad)."""
    if isinstance(kind, schema.Int):
        return _int_ok(kind, value)
    if isinstance(kind, schema.Real):
        return _real_ok(kind, value)
    if isinstance(kind, schema.Bool):
        return type(value) is bool
    if isinstance(kind, schema.Choice):
        return type(value) is str and value in kind.choices
    if isinstance(kind, schema.Identifier):
        return type(value) is str and value.isascii() and value.isidentifier()
    if isinstance(kind, schema.OptionalPath):
        exists = os.path.isdir if kind.directory else os.path.exists
        return type(value) is str and (value == "" or exists(value))
    if isinstance(kind, schema.ModelPath):
        if value == "" and kind.required_when is not None:
            required = _holds(kind.required_when, values)
            if required is None:
                return None
            if not required:
                return True  # not required: '' is fine
        config_file_ok = _holds(kind.config_file_when, values)
        return None if config_file_ok is None else _model_path_ok(value, config_file_ok)
    if isinstance(kind, schema.PromptFiles):
        return _prompt_files_ok(kind, value)
    if isinstance(kind, schema.StrKeyedMapping):
        return (value is None and kind.none_ok) or _str_keyed_ok(value)
    if isinstance(kind, schema.Text):
        return type(value) is str and (not kind.non_blank or value.strip() != "")
    if isinstance(kind, schema.Strings):
        return (type(value) in (list, tuple) and all(type(v) is str and v.strip() for v in value)
                and len(set(value)) == len(value))
    if isinstance(kind, schema.PromptTemplate):
        return type(value) is str and (value == "" or all("{" + n + "}" in value for n in kind.required))
    if isinstance(kind, schema.Retired):
        return value is None
    raise AssertionError(f"a kind this test does not know: {kind}")


def _canonical(kind, value):
    """How the documentation compares a value with a default: digit strings as ints, lists as tuples."""
    if isinstance(kind, schema.Int) and kind.digit_strings and _digits(value):
        return int(value)
    return tuple(value) if type(value) in (list, tuple) else value


def _path_parts(path: str) -> list:
    """``"teachers[0].path"`` -> ``["teachers", 0, "path"]``."""
    return [int(index) if index else name for name, index in re.findall(r"(\w+)|\[(\d+)\]", path)]


def _key_name(where: str, key) -> str:
    """How a message names a key (identifiers with a dot, anything else by repr in brackets)."""
    name = f"[{key!r}]" if not (type(key) is str and key.isascii() and key.isidentifier()) else f".{key}"
    return (where + name).lstrip(".")


def _find(node, name: str) -> tuple[str, object]:
    """("found", value), ("missing", None), or ("not a group", the group in the way)."""
    parts = name.split(".")
    for depth, part in enumerate(parts):
        if part not in node:
            return "missing", None
        node = node[part]
        if depth < len(parts) - 1 and not isinstance(node, dict):
            return "not a group", ".".join(parts[: depth + 1])
    return "found", node


def _problems(node, fields, prefix: str = "") -> tuple[set[str], dict]:
    """(Every field this test's reading of the documentation finds wrong, {field: valid value})."""
    problems: set[str] = set()
    if not isinstance(node, (dict, ml_collections.ConfigDict)):
        return {prefix.rstrip(".")}, {}
    known: dict = {}
    for field in fields:
        parts = field.name.split(".")
        for depth in range(len(parts)):
            known.setdefault(".".join(parts[:depth]), set()).add(parts[depth])

    def unknown_keys(group: dict, where: str) -> None:
        for key in list(group.keys()) if isinstance(group, dict) else []:
            path = f"{where}.{key}".lstrip(".") if type(key) is str else None
            if path is None or key not in known.get(where, set()):
                problems.add(_key_name(prefix.rstrip(".") + ("." + where if where else ""), key))
            elif path in known and isinstance(group[key], dict):
                unknown_keys(group[key], path)

    unknown_keys(node, "")
    values: dict = {}
    for field in fields:
        found, value = _find(node, field.name)
        if found == "not a group":
            problems.add(prefix + value)
        elif found == "missing":
            if not isinstance(field.kind, schema.Retired):  # a retired field may be left out
                problems.add(prefix + field.name)
        elif isinstance(field.kind, schema.Entries):
            entry_problems, entries = _entries_problems(field.kind, value, prefix + field.name)
            problems |= entry_problems
            if entries is not None:
                values[field.name] = entries
        else:
            ok = _value_ok(field.kind, value, values)
            if ok:
                values[field.name] = _canonical(field.kind, value)
            elif ok is False:
                problems.add(prefix + field.name)
    for field in fields:  # a setting its mode ignores must stay at its default
        condition = field.applies_when
        if condition is None or field.name not in values or _holds(condition, values) in (True, None):
            continue
        if values[field.name] != _canonical(field.kind, field.default):
            problems.add(prefix + field.name)
    return problems, values


def _entries_problems(kind: schema.Entries, value, where: str) -> tuple[set[str], list | None]:
    """Problems of a tuple of teacher groups, and the checked entries (None if any is bad)."""
    if type(value) not in (list, tuple) or len(value) < kind.min_count:
        return {where}, None
    problems: set[str] = set()
    entries = []
    for index, entry in enumerate(value):
        entry_problems, entry_values = _problems(entry, kind.fields, f"{where}[{index}].")
        problems |= entry_problems
        entries.append(entry_values)
    names = [entry.get(kind.unique) for entry in entries]
    for index, name in enumerate(names):
        if name is not None and name in names[:index]:
            problems.add(f"{where}[{index}].{kind.unique}")
    return problems, (None if problems else entries)


def _cross_rule_problems(values: dict) -> set[str]:
    """The documented rules across fields, each applied once the fields it reads are valid."""
    problems = set()
    teachers = values.get("teachers")
    several = teachers is not None and len(teachers) > 1
    if several and values.get("loss.name") not in (None, "sampled_token"):
        problems.add("teachers")  # several teachers: the sampled-token loss only
    mode = values.get("routing.mode")
    if teachers is not None and (mode is not None or not several):
        mode = mode if several else None
        for index, teacher in enumerate(teachers):  # data_sources with tag routing, weight with a mixture
            if teacher["data_sources"] and mode != "data_source":
                problems.add(f"teachers[{index}].data_sources")
            if teacher["weight"] != 1.0 and mode != "mixture":
                problems.add(f"teachers[{index}].weight")
        if mode == "data_source" and "routing.default_teacher" in values:
            names = [teacher["name"] for teacher in teachers]
            default = values["routing.default_teacher"]
            if default and default not in names:
                problems.add("routing.default_teacher")
            tags = [tag for teacher in teachers for tag in teacher["data_sources"]]
            if len(tags) != len(set(tags)):
                problems.add("routing")  # a tag of two teachers
            if any(not teacher["data_sources"] and teacher["name"] != default for teacher in teachers):
                problems.add("routing")  # a teacher no row reaches
    if {"effopd.enabled", "effopd.val_files"} <= set(values):
        if values["effopd.enabled"] and not values["effopd.val_files"]:
            problems.add("effopd.val_files")
    axes = [values.get(f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")]
    if None not in axes and axes.count(-1) > 1:
        problems.add("mesh")
    if values.get("lora.dropout", 0.0) != 0.0:
        problems.add("lora.dropout")  # LoRA dropout is refused
    return problems


def _expected_problems(tree: dict) -> set[str]:
    problems, values = _problems(tree, config_lib.FIELDS)
    return problems | _cross_rule_problems(values)


def _names_one_of(named: str, problems: set[str]) -> bool:
    """``named`` is a problem, or a field inside (or the group around) one."""
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")

    return any(inside(named, p) or inside(p, named) for p in problems)


def _plain(value):
    """A config as plain dicts (teacher entries included, as a list) that the test can mutate."""
    if isinstance(value, ml_collections.ConfigDict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple) and value and isinstance(value[0], ml_collections.ConfigDict):
        return [_plain(item) for item in value]
    return value


DELETE = object()


def _apply(tree: dict, path: str, value) -> None:
    """Sets (or with DELETE removes) ``path`` in ``tree``; a no-op if a group on the way is gone."""
    *parents, leaf = _path_parts(path)
    for part in parents:
        if isinstance(part, int):
            if not isinstance(tree, list) or part >= len(tree):
                return
        elif not isinstance(tree, dict) or part not in tree:
            return
        tree = tree[part]
    if isinstance(tree, dict) and isinstance(leaf, str):
        if value is DELETE:
            tree.pop(leaf, None)
        else:
            tree[leaf] = value
    elif isinstance(tree, list) and isinstance(leaf, int) and leaf < len(tree):
        if value is DELETE:
            del tree[leaf]
        else:
            tree[leaf] = value


@dataclasses.dataclass(frozen=True)
class Paths:
    model: str  # an HF model directory (config.json only)
    config_file: str  # that config.json
    prompts: str  # a prompt file
    root: str  # a directory that is not a model


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> Paths:
    root = tmp_path_factory.mktemp("cfg")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = root / "prompts.jsonl"
    prompts.write_text(GOOD.decode() + "\n")
    return Paths(str(model), str(model / "config.json"), str(prompts), str(root))


def _base_configs(p: Paths) -> list[ml_collections.ConfigDict]:
    """Valid configs whose modes differ, so that different fields are used (or ignored) in each."""
    effopd = config_lib.default_config()
    effopd.student.path = effopd.teachers[0].path = p.model
    effopd.data.train_files = (p.prompts,)
    effopd.effopd.update(enabled=True, val_files=(p.prompts,))

    every_mode = config_lib.default_config()
    every_mode.student.update(init="random", path=p.config_file, init_seed=3)
    every_mode.teachers = (config_lib.teacher_config(name="big", init="random", path=p.model, init_seed=4),)
    every_mode.data.update(train_files=(p.prompts,), eval_files=(p.prompts,), max_eval_prompts=2)
    every_mode.eval_every = 2
    every_mode.eval.update(samples_per_prompt=4, temperature=0.5, max_new_tokens=8)
    every_mode.loss.update(name="topk_reverse_kl", topk=16)
    every_mode.rollout.update(temperature=0.0)
    every_mode.monitor.update(every=2, k=4)
    every_mode.preemption.update(handle_signals=False)

    g_opd = config_lib.default_config()
    g_opd.student.path = g_opd.teachers[0].path = p.model
    g_opd.teachers[0].tokenizer = p.root
    g_opd.data.train_files = (p.prompts,)
    g_opd.update(init_from=p.model, tokenizer=p.root)
    g_opd.loss.update(reward_scale=1.25, base_path=p.model, is_threshold=None)
    g_opd.rollout.update(top_k=5, top_p=0.9)
    g_opd.mesh.update(data=1, fsdp=-1)
    routed = config_lib.default_config()
    routed.student.path = p.model
    routed.data.train_files = (p.prompts,)
    routed.teachers = (
        config_lib.teacher_config(name="math", path=p.model, data_sources=("math",)),
        config_lib.teacher_config(name="self", model="student_live", data_sources=("code",), max_prompt_length=512,
                                  context_template=config_lib.DEFAULT_CONTEXT_TEMPLATE, missing_solution="raise"),
    )
    routed.routing.update(default_teacher="math", key="extra_info.opd_teacher")
    return [effopd, every_mode, g_opd, routed]


@pytest.fixture(scope="module")
def base_trees(paths) -> list[dict]:
    trees = []
    for config in _base_configs(paths):
        config_lib.validate_config(config)
        tree = _plain(config)
        assert _expected_problems(tree) == set(), "this test's reading must accept what validate_config does"
        trees.append(tree)
    return trees


def _any_values(p: Paths):
    """Random values of random types, plus the values that sit on the edges of the ranges."""
    paths = st.sampled_from([p.model, p.config_file, p.prompts, p.root, "", ".", "/nonexistent/x.jsonl",
                             p.prompts + ".txt"])
    edges = st.sampled_from(
        [0, 1, -1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**400, 0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e-300,
         math.nan, -math.nan, math.inf, -math.inf, True, False, None, "1", "4", "04", "0", "nan", "pow2", "skip",
         "float32", "bfloat16", "dots", "cosine", "token-mean", "topk_reverse_kl", "random", "static", "t2",
         [], (), {}]
    )
    return st.one_of(
        edges,
        st.integers(),
        st.floats(),
        st.text(max_size=8),
        paths,
        st.lists(paths | st.integers(), max_size=2),
        st.tuples(paths),
        st.dictionaries(st.text("abc", max_size=3) | st.integers(0, 3), st.integers(), max_size=2),
    )


def _plausible_values(kind, p: Paths):
    """Values a user might mean for a field of this kind: mostly allowed, some just outside."""
    if isinstance(kind, schema.Int):
        numbers = [*kind.special, kind.low, kind.low + 1, kind.low + 7, kind.high, kind.low - 1, True, float(kind.low)]
        return st.sampled_from((["3", "16", "0"] if kind.digit_strings else []) + numbers)
    if isinstance(kind, schema.Real):
        return st.sampled_from([0.0, 0.5, 1.0, 1.25, 2.0, 1e-3, None])
    if isinstance(kind, schema.Bool):
        return st.booleans()
    if isinstance(kind, schema.Choice):
        return st.sampled_from(kind.choices)
    if isinstance(kind, schema.Identifier):
        return st.sampled_from(["teacher", "t2", "_x", "1x", "a-b", "", "é"])
    if isinstance(kind, (schema.OptionalPath, schema.ModelPath)):
        return st.sampled_from([p.config_file, p.model, p.root, "", "/nonexistent"])
    if isinstance(kind, schema.PromptFiles):
        return st.sampled_from([(), (p.prompts,), [p.prompts], (p.prompts, p.prompts), (p.config_file,)])
    if isinstance(kind, schema.StrKeyedMapping):
        return st.sampled_from([{}, {"enable_thinking": True}] + ([None] if kind.none_ok else []))
    if isinstance(kind, schema.Retired):
        return st.sampled_from([None, p.model, True])
    if isinstance(kind, schema.Text):
        return st.sampled_from(["", " ", "teacher", "t2", "math", "data_source", "extra_info.opd_teacher"])
    if isinstance(kind, schema.Strings):
        return st.sampled_from([(), ("math",), ("code",), ("math", "code"), ["math"], ("math", "math"), ("",), "math"])
    if isinstance(kind, schema.PromptTemplate):
        return st.sampled_from(["", "{problem}", "{problem} {solution}", "{solution}", "no placeholders",
                                config_lib.DEFAULT_CONTEXT_TEMPLATE])
    if isinstance(kind, schema.Entries):
        good = _plain(config_lib.teacher_config(path=p.model))
        math_teacher = {**good, "name": "math", "data_sources": ("math",)}
        code_teacher = {**good, "name": "code", "data_sources": ("code",)}
        live = {**good, "path": "", "model": "student_live", "context_template": "{problem} {solution}"}
        return st.sampled_from([
            [good, {**good, "name": "t2"}], [good, good], (), [good], (good,), [{**good, "extra": 1}],
            [{k: v for k, v in good.items() if k != "init"}], [config_lib.teacher_config(path=p.model)], "teacher",
            [math_teacher, code_teacher], [math_teacher, {**code_teacher, "data_sources": ("math",)}],
            [{**math_teacher, "weight": 2.0}, code_teacher], [live], [{**live, "path": p.model}],
        ])
    raise AssertionError(f"a kind this test does not know: {kind}")


FIELD_TARGETS = [(field.name, field.kind) for field in config_lib.FIELDS] + [
    (f"teachers[0].{field.name}", field.kind) for field in config_lib.TEACHER_FIELDS
]

def _rule_targets() -> list[tuple[str, object]]:
    """The fields that conditions read or restrict: "applies when", and model paths (a config
    .json file only with random init)."""
    names = set()
    for prefix, fields in (("", config_lib.FIELDS), ("teachers[0].", config_lib.TEACHER_FIELDS)):
        for field in fields:
            condition = field.kind.config_file_when if isinstance(field.kind, schema.ModelPath) else field.applies_when
            if condition is not None:
                names |= {prefix + field.name, *(prefix + name for name in condition.fields)}
    return [(path, kind) for path, kind in FIELD_TARGETS if path in names]


RULE_TARGETS = _rule_targets()
# The fields the rules across fields name (or whose group they name).
CROSS_TARGETS = [(field.name, field.kind) for field in config_lib.FIELDS
                 if any(rule.field in (field.name, field.group) for rule in config_lib.CROSS_RULES)]
GROUP_TARGETS = sorted({field.group for field in config_lib.FIELDS} - {""}) + ["teachers[0]"]
UNKNOWN_TARGETS = ["extra", "data.extra", "teachers[0].extra", "teacher.init"]  # names the schema does not have


@st.composite
def mutations(draw, p: Paths):
    """``[(path, value or DELETE)]``: one to three fields, groups or unknown names.

    Mostly fields set to values a user might mean, often the fields that the rules across fields
    and the "applies when" conditions involve (so that those refusals, and acceptances, are
    frequent); also random values, deletions, whole groups and unknown names.
    """
    count = draw(st.sampled_from([1, 1, 2, 3]))  # one alone is never masked by another
    chosen = {}
    for _ in range(count):
        pool = draw(st.sampled_from(["field"] * 3 + ["rule"] * 4 + ["cross"] * 2 + ["group", "unknown"]))
        if pool == "group":  # replaced by anything, or deleted
            chosen[draw(st.sampled_from(GROUP_TARGETS))] = draw(st.just(DELETE) | _any_values(p))
        elif pool == "unknown":
            chosen[draw(st.sampled_from(UNKNOWN_TARGETS))] = draw(_any_values(p))
        else:
            targets = {"field": FIELD_TARGETS, "rule": RULE_TARGETS, "cross": CROSS_TARGETS}[pool]
            path, kind = draw(st.sampled_from(targets))
            source = draw(st.sampled_from(["plausible"] * 6 + ["any"] * 3 + ["delete"]))
            if source == "delete":
                chosen[path] = DELETE
            else:
                chosen[path] = draw(_plausible_values(kind, p) if source == "plausible" else _any_values(p))
    return list(chosen.items())


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data_=st.data())
def test_random_config_mutations_fail_only_as_documented(paths, base_trees, data_):
    tree = copy.deepcopy(data_.draw(st.sampled_from(base_trees)))
    mutated = data_.draw(mutations(paths))
    # Shorter paths first, so that a replaced group's own fields are not then re-set.
    for path, value in sorted(mutated, key=lambda m: len(_path_parts(m[0]))):
        _apply(tree, path, copy.deepcopy(value))
    expected = _expected_problems(tree)
    # type_safe=False: what a dict-built config or a hand-edited one can carry.
    config = ml_collections.ConfigDict(tree, type_safe=False)
    try:
        config_lib.validate_config(config)
    except ValueError as e:
        message = str(e)
        named = re.match(r"config\.(.+?): ", message)
        assert named, message
        assert expected, f"refused a config this test's reading accepts: {message}"
        assert _names_one_of(named.group(1), expected), (message, expected, mutated)
    else:
        assert not expected, f"accepted {mutated}, wrong by this test's reading: {expected}"


@pytest.mark.parametrize(
    "field, value",
    [
        ("total_steps", True),
        ("total_steps", 2.0),
        ("total_steps", "100"),
        ("total_steps", -5),
        ("total_steps", None),
        ("seed", 2**32),
        ("optimizer.learning_rate", math.nan),
        ("optimizer.learning_rate", math.inf),
        ("optimizer.b2", 1.0),
        ("optimizer.eps", 0.0),
        ("rollout.top_p", math.nan),
        ("rollout.temperature", -math.inf),
        ("rollout.temperature", math.nan),
        ("rollout.engine", "vllm"),
        ("loss.topk", 0),
        ("loss.is_threshold", math.nan),
        ("data.train_files", "prompts.jsonl"),
        ("data.max_eval_prompts", -1),
        ("data.num_epochs", 1.5),
        ("effopd.trigger", "4.0"),
        ("effopd.trigger", " 4"),
        ("effopd.trigger", "0"),
        ("effopd.trigger", "\u0664"),  # ARABIC-INDIC DIGIT FOUR: a digit, but not what the CLI sends
        ("effopd.trigger", "9" * 5000),  # longer than int() parses by default
        ("effopd.trigger", 0),
        ("effopd.val_temperature", math.nan),
        ("mesh.fsdp", 0),
        ("mesh.data", -1.0),
        ("monitor.k", 0),
        ("monitor.every", -2),
        ("eval.max_new_tokens", -1),
        ("student.compute_dtype", "int8"),
        ("student.remat", "everything"),
        ("student.init", "pretrained"),
        ("student.init_seed", -1),
        ("preemption.grace_seconds", math.nan),
        ("log_every", 1),  # removed: an unknown setting now
        ("data.extra", 1),
        ("teachers", ()),
        ("teachers", "teacher"),
        ("teachers[0]", "teacher"),
        ("teachers[0].path", "/nonexistent"),
        ("teachers[0].param_dtype", "int8"),
        ("teachers[0].name", "my teacher"),
        ("teachers[0].name", ""),
        ("teachers[0].init", "zeros"),
        ("teachers[0].init_seed", 2**32),
        ("teachers[0].tokenizer", "/nonexistent"),
        ("teachers[0].extra", 1),
        ("teacher.path", "/ckpt/teacher"),  # the old single-teacher group
        ("teacher", 1),
        # Settings the chosen mode ignores (loss.name='sampled_token', no eval files, greedy off,
        # monitor off, init='checkpoint'), at anything but their default.
        ("loss.topk", 16),
        ("eval_every", 5),
        ("eval.samples_per_prompt", 4),
        ("data.max_eval_prompts", 8),
        ("monitor.k", 4),
        ("student.init_seed", 1),
        ("teachers[0].init_seed", 1),
    ],
)
def test_named_bad_values_are_refused_naming_the_field(base_trees, field, value):
    tree = copy.deepcopy(base_trees[0])
    _apply(tree, field, value)
    config = ml_collections.ConfigDict(tree, type_safe=False)
    with pytest.raises(ValueError, match=re.escape(f"config.{field}: ")):
        config_lib.validate_config(config)


@pytest.mark.parametrize(
    "overrides, field, says",
    [
        ({"effopd.val_files": ()}, "effopd.val_files", "validation set"),
        ({"effopd.enabled": False}, "effopd.val_files", "only used with effopd.enabled=True (it is False)"),
        ({"effopd.enabled": False, "effopd.val_files": (), "effopd.trigger": "4"}, "effopd.trigger", "only used"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh", "at most one axis may be -1"),
        ({"teachers[1]": "two"}, "routing", "teacher 'teacher' lists no data_sources and is not routing.default_teacher"),
        ({"teachers[1]": "two", "loss.name": "full_reverse_kl"}, "teachers",
         "2 teachers need loss.name='sampled_token'"),
        ({"teachers[1]": "two", "routing.default_teacher": "t3"}, "routing.default_teacher",
         "'t3' is not one of the teachers ['teacher', 't2']"),
        ({"teachers[1]": "two", "routing.mode": "mixture", "teachers[0].data_sources": ("x",)},
         "teachers[0].data_sources", "only used with routing.mode='data_source'"),
        ({"teachers[0].weight": 0.5}, "teachers[0].weight", "only used with routing.mode='mixture'"),
        ({"rollout.temperature": 0.0, "rollout.top_p": 0.9}, "rollout.top_p", "rollout.temperature > 0.0 (it is 0.0)"),
        ({"loss.name": "full_reverse_kl", "loss.is_threshold": None}, "loss.is_threshold", "loss.name='sampled_token'"),
        ({"loss.name": "full_reverse_kl", "loss.reward_scale": 1.25}, "loss.reward_scale", "only used"),
        ({"loss.base_path": "MODEL"}, "loss.base_path", "and loss.reward_scale != 1.0"),
        ({"preemption.handle_signals": False, "preemption.grace_seconds": 30.0}, "preemption.grace_seconds",
         "only used"),
        ({"student.init": "random", "init_from": "MODEL"}, "init_from", "student.init='checkpoint'"),
        ({"student.path": "CONFIG_FILE"}, "student.path", "no such directory"),
        ({"teachers[0].path": "CONFIG_FILE"}, "teachers[0].path", "no such directory"),
    ],
)
def test_rules_across_fields_are_refused_naming_the_field(base_trees, paths, overrides, field, says):
    tree = copy.deepcopy(base_trees[0])
    replace = {"MODEL": paths.model, "CONFIG_FILE": paths.config_file}
    if "teachers[1]" in overrides:  # a second, well-formed teacher with its own name
        tree["teachers"].append({**tree["teachers"][0], "name": "t2"})
    for path, value in overrides.items():
        if path != "teachers[1]":
            _apply(tree, path, replace.get(value, value) if isinstance(value, str) else value)
    config = ml_collections.ConfigDict(tree, type_safe=False)
    with pytest.raises(ValueError, match=f"^{re.escape(f'config.{field}: ')}.*{re.escape(says)}"):
        config_lib.validate_config(config)


def test_two_teachers_with_one_name_are_refused_naming_the_second(base_trees):
    tree = copy.deepcopy(base_trees[0])
    tree["teachers"].append(dict(tree["teachers"][0]))
    with pytest.raises(ValueError, match=re.escape("config.teachers[1].name: 'teacher' is taken by teachers[0]")):
        config_lib.validate_config(ml_collections.ConfigDict(tree, type_safe=False))


@pytest.mark.parametrize(
    "overrides",
    [
        {"effopd.trigger": "4"},
        {"effopd.trigger": 4},
        {"student.init": "random", "student.path": "CONFIG_FILE", "student.init_seed": 5},
        {"teachers[0].init": "random", "teachers[0].path": "CONFIG_FILE", "teachers[0].init_seed": 5},
        {"loss.name": "topk_reverse_kl", "loss.topk": 16},
        {"loss.name": "topk_reverse_kl", "loss.reward_scale": 1, "loss.topk": 64},  # 1 is the default 1.0
        {"data.eval_files": ("PROMPTS",), "eval_every": 5, "eval.samples_per_prompt": 4},
        {"effopd.val_files": ["PROMPTS"]},  # a list is a tuple of files
        {"teacher": DELETE},
    ],
)
def test_documented_settings_are_accepted(base_trees, paths, overrides):
    tree = copy.deepcopy(base_trees[0])
    replace = {"CONFIG_FILE": paths.config_file, "PROMPTS": paths.prompts}
    for path, value in overrides.items():
        if isinstance(value, (tuple, list)):
            value = type(value)(replace.get(v, v) for v in value)
        elif isinstance(value, str):
            value = replace.get(value, value)
        _apply(tree, path, value)
    config_lib.validate_config(ml_collections.ConfigDict(tree, type_safe=False))


def test_type_locked_overrides_still_reach_validation(base_trees):
    """Assignments ml_collections lets through on a normal (type-safe) config are refused by the check."""
    for field, value in [("total_steps", True), ("total_steps", None), ("rollout.top_p", math.nan),
                         ("mesh.data", False)]:
        config = ml_collections.ConfigDict(copy.deepcopy(base_trees[0]))
        group, _, leaf = field.rpartition(".")
        (config[group] if group else config)[leaf] = value  # accepted by the type lock
        with pytest.raises(ValueError, match=re.escape(f"config.{field}: ")):
            config_lib.validate_config(config)
    config = ml_collections.ConfigDict(copy.deepcopy(base_trees[0]))
    config.rollout.top_p = 1  # an int where a float goes is fine (ml_collections makes it 1.0)
    config_lib.validate_config(config)
