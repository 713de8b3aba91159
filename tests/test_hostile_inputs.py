"""Hostile inputs: random malformed prompt files and random bad config values (hypothesis).

The data reader and the config check may only fail with their documented errors:

* :func:`effopd_jax.data.load_prompts` with ``on_bad_row="skip"`` keeps exactly the well-formed
  rows (checked against an oracle written here from the documented rules), counts the rest, and
  raises ValueError only when nothing is left; with ``on_bad_row="raise"`` it raises ValueError
  naming ``file:line`` of the first malformed row.
* :func:`effopd_jax.config.validate_config` either accepts a mutated config (and then every
  mutated value is in range by the independent table below) or raises ValueError naming a
  mutated field.
"""

from __future__ import annotations

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


def _real(value) -> float | None:
    """The float value of a non-bool int/float, or None for anything else."""
    if type(value) not in (int, float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _int_in(low: int, high: int = 2**31 - 1, also=()):
    return lambda v: (type(v) is int and low <= v <= high) or any(type(v) is type(a) and v == a for a in also)


def _real_in(low=-math.inf, high=math.inf, low_open=False, high_open=False, allow_none=False):
    def check(v):
        if v is None:
            return allow_none
        x = _real(v)
        if x is None or not math.isfinite(x):
            return False
        return (x > low if low_open else x >= low) and (x < high if high_open else x <= high)

    return check


def _one_of(*choices):
    return lambda v: type(v) is str and v in choices


def _is_bool(v):
    return type(v) is bool


def _model_dir(v):
    return type(v) is str and os.path.isdir(v) and os.path.isfile(os.path.join(v, "config.json"))


def _optional_dir(v):
    return type(v) is str and (v == "" or os.path.isdir(v))


def _optional_path(v):
    return type(v) is str and (v == "" or os.path.exists(v))


def _prompt_files(min_count: int):
    def check(v):
        return (
            type(v) in (tuple, list)
            and len(v) >= min_count
            and all(type(p) is str and os.path.isfile(p) and p.lower().endswith((".jsonl", ".parquet")) for p in v)
        )

    return check


def _template_kwargs(v):
    if not isinstance(v, (dict, ml_collections.ConfigDict)):
        return False
    try:
        return all(type(k) is str for k in v.keys())
    except TypeError:  # a ConfigDict with mixed key types cannot list its keys
        return False


# Every field of default_config() and what the documentation allows for it.
FIELD_SPECS = {
    "seed": _int_in(0, 2**32 - 1),
    "total_steps": _int_in(1),
    "checkpoint_every": _int_in(1),
    "keep_checkpoints": _int_in(1),
    "eval_every": _int_in(0),
    "log_every": _int_in(1),
    "export_hf": _is_bool,
    "max_consecutive_skips": _int_in(1),
    "student.path": _model_dir,
    "student.param_dtype": _one_of("float32", "bfloat16", "float16"),
    "student.compute_dtype": _one_of("float32", "bfloat16", "float16"),
    "student.scan_layers": _is_bool,
    "student.remat": _one_of("none", "full", "dots", "dots_no_batch"),
    "teacher.path": _model_dir,
    "teacher.param_dtype": _one_of("float32", "bfloat16", "float16"),
    "teacher.compute_dtype": _one_of("float32", "bfloat16", "float16"),
    "teacher.scan_layers": _is_bool,
    "teacher.tokenizer": _optional_dir,
    "init_from": _optional_path,
    "tokenizer": _optional_dir,
    "data.train_files": _prompt_files(1),
    "data.eval_files": _prompt_files(0),
    "data.prompts_per_step": _int_in(1),
    "data.max_prompt_length": _int_in(1),
    "data.shuffle": _is_bool,
    "data.num_epochs": _int_in(0),
    "data.chat_template_kwargs": _template_kwargs,
    "data.on_bad_row": _one_of("skip", "raise"),
    "data.max_eval_prompts": _int_in(0),
    "rollout.max_new_tokens": _int_in(1),
    "rollout.temperature": _real_in(0.0),
    "rollout.top_k": _int_in(0),
    "rollout.top_p": _real_in(0.0, 1.0, low_open=True),
    "rollout.samples_per_prompt": _int_in(1),
    "loss.name": _one_of("sampled_token", "full_reverse_kl", "topk_reverse_kl"),
    "loss.aggregation": _one_of("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    "loss.reward_scale": _real_in(),
    "loss.base_path": _optional_path,
    "loss.is_threshold": _real_in(0.0, low_open=True, allow_none=True),
    "loss.topk": _int_in(1),
    "loss.chunk_size": _int_in(1),
    "optimizer.learning_rate": _real_in(0.0, low_open=True),
    "optimizer.schedule": _one_of("constant", "cosine", "linear"),
    "optimizer.warmup_steps": _int_in(0),
    "optimizer.b1": _real_in(0.0, 1.0, high_open=True),
    "optimizer.b2": _real_in(0.0, 1.0, high_open=True),
    "optimizer.eps": _real_in(0.0, low_open=True),
    "optimizer.weight_decay": _real_in(0.0),
    "optimizer.grad_clip": _real_in(0.0, low_open=True),
    "effopd.enabled": _is_bool,
    "effopd.max_candidates": _int_in(1),
    "effopd.trigger": _int_in(1, also=("pow2",)),
    "effopd.val_files": _prompt_files(0),
    "effopd.val_max_prompts": _int_in(0),
    "effopd.val_max_new_tokens": _int_in(0),
    "effopd.val_temperature": _real_in(0.0),
    "eval.samples_per_prompt": _int_in(1),
    "eval.temperature": _real_in(0.0),
    "eval.max_new_tokens": _int_in(0),
    "mesh.data": _int_in(1, also=(-1,)),
    "mesh.fsdp": _int_in(1, also=(-1,)),
    "mesh.tensor": _int_in(1, also=(-1,)),
    "monitor.every": _int_in(0),
    "monitor.k": _int_in(1),
    "preemption.handle_signals": _is_bool,
    "preemption.grace_seconds": _real_in(0.0, low_open=True),
}
GROUPS = sorted({field.split(".")[0] for field in FIELD_SPECS if "." in field})


def _leaf_fields(tree: dict, prefix: str = "") -> list[str]:
    fields = []
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" != "data.chat_template_kwargs":
            fields += _leaf_fields(value, f"{prefix}{key}.")
        else:
            fields.append(f"{prefix}{key}")
    return fields


@pytest.fixture(scope="module")
def valid_config(tmp_path_factory):
    """default_config() with real paths: a model directory (config.json only) and a prompt file."""
    root = tmp_path_factory.mktemp("cfg")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = root / "prompts.jsonl"
    prompts.write_text(GOOD.decode() + "\n")
    c = config_lib.default_config()
    c.student.path = c.teacher.path = str(model)
    c.data.train_files = (str(prompts),)
    c.effopd.val_files = (str(prompts),)
    config_lib.validate_config(c)
    assert sorted(_leaf_fields(c.to_dict())) == sorted(FIELD_SPECS), "FIELD_SPECS must list every field"
    return c, str(model), str(prompts), str(root)


def _values(model: str, prompts: str, root: str):
    """Random values of random types, plus the values that sit on the edges of the ranges."""
    paths = st.sampled_from([model, prompts, root, "", ".", "/nonexistent/x.jsonl", prompts + ".txt"])
    edges = st.sampled_from(
        [0, 1, -1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**400, 0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e-300,
         math.nan, -math.nan, math.inf, -math.inf, True, False, None, "1", "nan", "pow2", "skip", "float32",
         "bfloat16", "dots", "cosine", "token-mean", "topk_reverse_kl", [], (), {}]
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


@st.composite
def mutations(draw, fields: list[str], values):
    """``{field: value or DELETE}``; a field may also be a whole group."""
    targets = draw(st.lists(st.sampled_from(fields + GROUPS), min_size=1, max_size=3, unique=True))
    return {t: draw(st.just(DELETE) | values) for t in targets}


DELETE = object()


def _apply(tree: dict, field: str, value) -> None:
    *parents, leaf = field.split(".")
    for name in parents:
        if not isinstance(tree, dict) or name not in tree:
            return  # the group itself was deleted or replaced by a value
        tree = tree[name]
    if not isinstance(tree, dict):
        return
    if value is DELETE:
        tree.pop(leaf, None)
    else:
        tree[leaf] = value


def _field_ok(field: str, value, mutated: dict) -> bool:
    if value is DELETE:
        return False
    if field in GROUPS:  # a whole group replaced: fine only if every field in it stays fine
        if not isinstance(value, dict):
            return False
        return all(f.split(".", 1)[1] in value and FIELD_SPECS[f](value[f.split(".", 1)[1]])
                   for f in FIELD_SPECS if f.startswith(field + "."))
    return FIELD_SPECS[field](value)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data_=st.data())
def test_random_config_mutations_fail_only_as_documented(valid_config, data_):
    base, model, prompts, root = valid_config
    tree = base.to_dict()
    fields = _leaf_fields(tree)
    mutated = data_.draw(mutations(fields, _values(model, prompts, root)))
    # Groups first, so that a replaced group's own fields are not then re-set.
    for field, value in sorted(mutated.items(), key=lambda kv: kv[0] not in GROUPS):
        _apply(tree, field, value)
    # type_safe=False: what a dict-built config or a hand-edited one can carry.
    config = ml_collections.ConfigDict(tree, type_safe=False)

    def read(field):
        node = config
        for part in field.split("."):
            node = node[part]
        return node

    fields_ok = all(_field_ok(f, v, mutated) for f, v in mutated.items())
    # The one rule across fields: EffOPD needs a validation set.
    cross_ok = True
    if fields_ok and read("effopd.enabled") and not read("effopd.val_files"):
        cross_ok = False
    try:
        config_lib.validate_config(config)
    except ValueError as e:
        message = str(e)
        named = re.match(r"config\.([\w.]+):", message)
        assert named, message
        field = named.group(1)
        assert not (fields_ok and cross_ok), f"refused a config whose mutated fields are all valid: {message}"
        culprits = set(mutated)
        if not cross_ok:
            culprits.add("effopd.val_files")
        assert any(field == m or field.startswith(m + ".") for m in culprits), (message, mutated)
    else:
        assert fields_ok and cross_ok, f"accepted {mutated}"


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
        ("loss.topk", 0),
        ("loss.is_threshold", math.nan),
        ("data.train_files", "prompts.jsonl"),
        ("data.max_eval_prompts", -1),
        ("data.num_epochs", 1.5),
        ("effopd.trigger", "4"),
        ("effopd.trigger", 0),
        ("effopd.val_temperature", math.nan),
        ("mesh.fsdp", 0),
        ("mesh.data", -1.0),
        ("monitor.k", 0),
        ("monitor.every", -2),
        ("log_every", 0),
        ("eval.max_new_tokens", -1),
        ("student.compute_dtype", "int8"),
        ("student.remat", "everything"),
        ("preemption.grace_seconds", math.nan),
    ],
)
def test_named_bad_values_are_refused_naming_the_field(valid_config, field, value):
    base, *_ = valid_config
    tree = base.to_dict()
    _apply(tree, field, value)
    config = ml_collections.ConfigDict(tree, type_safe=False)
    with pytest.raises(ValueError, match=re.escape(f"config.{field}: ")):
        config_lib.validate_config(config)


def test_type_locked_overrides_still_reach_validation(valid_config):
    """Assignments ml_collections lets through on a normal (type-safe) config are refused by the check."""
    base, *_ = valid_config
    for field, value in [("total_steps", True), ("total_steps", None), ("rollout.top_p", math.nan),
                         ("mesh.data", False)]:
        config = ml_collections.ConfigDict(base.to_dict())
        group, _, leaf = field.rpartition(".")
        (config[group] if group else config)[leaf] = value  # accepted by the type lock
        with pytest.raises(ValueError, match=re.escape(f"config.{field}: ")):
            config_lib.validate_config(config)
    config = ml_collections.ConfigDict(base.to_dict())
    config.rollout.top_p = 1  # an int where a float goes is fine (ml_collections makes it 1.0)
    config_lib.validate_config(config)
