"""Prompt data: JSONL / Parquet files -> chat template -> token ids -> grain batches.

Pipeline (all host-side; the output feeds the rollout, which left-pads to a static length):

1. :func:`load_prompts` reads every row of one or more prompt files (``.jsonl`` / ``.parquet``),
   checks it, renders the student's chat template through its Hugging Face tokenizer
   (``apply_chat_template(..., add_generation_prompt=True, **chat_template_kwargs)``; Qwen3 with
   ``enable_thinking=False`` as the authors run it), tokenizes, and drops prompts longer than
   ``max_prompt_length`` tokens. Malformed rows are skipped and counted (first few reasons kept)
   or raise, per ``on_bad_row``. The counts come back as :class:`PromptFileStats`. Everything is
   done up front so a bad or empty dataset fails before anything compiles.
2. :func:`train_dataset` turns the kept examples into a ``grain.MapDataset`` of per-step batches:
   shuffled by seed with a different permutation every epoch, cut into global batches of
   ``prompts_per_step`` prompts (the last partial batch of each epoch is dropped, so each prompt
   appears at most once per epoch and exactly once when ``prompts_per_step`` divides the size),
   repeated for ``num_epochs`` (None: forever), and each global batch split into
   ``process_count`` contiguous, disjoint slices of which this process keeps
   ``process_index``'s. Step ``t``'s global batch is therefore the same for any process count.
3. :func:`train_iterator` wraps it as a ``grain.DatasetIterator`` whose ``get_state()`` (a small
   JSON dict) / ``set_state()`` save and restore the position exactly, so a resumed run
   continues at the next batch. It also works with orbax through ``grain.checkpoint``.

Accepted row formats (field names are configurable):

* ``{"prompt": "text", "answer": "42", "data_source": "gsm8k"}`` (a single user turn);
* ``{"messages": [{"role": "user", "content": "..."}, ...], "answer": ...}``;
* the verl Parquet layout the EffOPD authors train from: ``prompt`` is a list of chat messages
  and the answer is nested, ``answer_key="reward_model.ground_truth"``.

``answer`` may be a string or a number (an integer/float is kept as its decimal text);
``data_source`` is optional (``default_data_source`` fills it; it selects the grader,
:func:`effopd_jax.grading.grade`). Two optional fields feed the teachers
(:mod:`effopd_jax.teachers`): ``solution`` (``solution_key``; a reference solution a
self-distillation teacher reads in its privileged prompt; the bundled GSM8K file has one per row,
the authors' Parquet files keep it in ``extra_info.ref_solution``) and the routing tag
(``route_key``; by default the row's ``data_source``, the authors' per-row teacher tag is
``extra_info.opd_teacher``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import grain
import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
OnBadRow = Literal["skip", "raise"]
# Qwen3's non-thinking format, as the EffOPD authors run it; other templates ignore the variable.
DEFAULT_CHAT_TEMPLATE_KWARGS: Mapping[str, Any] = MappingProxyType({"enable_thinking": False})
# The ChatML roles Qwen's templates render; a message with any other role is malformed.
CHAT_ROLES = ("system", "user", "assistant", "tool")
# How many malformed-row reasons :class:`PromptFileStats` keeps for the error message / log.
MAX_REPORTED_BAD_ROWS = 5
_SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PromptExample:
    """One prompt after templating and tokenization.

    Attributes:
      example_id: position among the kept examples of this load (0..num_kept-1).
      origin: ``"path:line"`` (JSONL, 1-based) or ``"path:row"`` (Parquet, 0-based).
      prompt_token_ids: ``[prompt_len]`` int32, the templated prompt, ``prompt_len <= max_prompt_length``.
      prompt_text: the templated prompt string the ids encode.
      messages: the chat messages the template was applied to.
      answer: the reference answer, or None when the load did not require one.
      data_source: which dataset the row belongs to (selects the grader).
      solution: the row's reference solution (``solution_key``), or None when it has none.
      route_tag: the value that routes the row to a teacher (``route_key``; the ``data_source``
        by default), or None when the row has no such field.
    """

    example_id: int
    origin: str
    prompt_token_ids: np.ndarray
    prompt_text: str
    messages: Messages
    answer: str | None
    data_source: str
    solution: str | None = None
    route_tag: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class PromptBatch:
    """The prompts of one step on this process (a list-of-rows batch; lengths vary).

    Attributes:
      prompt_token_ids: ``batch`` arrays ``[prompt_len_i]`` int32 (not padded; see :func:`left_pad`).
      prompt_texts: templated prompt strings.
      messages: the chat messages of each prompt.
      answers: reference answers (None where not required).
      data_sources: per-prompt data source.
      example_ids: ``[batch]`` int64, :attr:`PromptExample.example_id` of each prompt.
      solutions: per-prompt reference solution (None where the row has none).
      route_tags: per-prompt routing tag (:attr:`PromptExample.route_tag`).
    """

    prompt_token_ids: list[np.ndarray]
    prompt_texts: list[str]
    messages: list[Messages]
    answers: list[str | None]
    data_sources: list[str]
    example_ids: np.ndarray
    solutions: list[str | None] = dataclasses.field(default_factory=list)
    route_tags: list[str | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    def repeat(self, times: int) -> PromptBatch:
        """Every prompt ``times`` times in a row (the rows of one prompt adjacent): the rows of a
        step with ``times`` samples per prompt."""
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")

        def rows(values):
            return [value for value in values for _ in range(times)]

        return PromptBatch(
            prompt_token_ids=rows(self.prompt_token_ids),
            prompt_texts=rows(self.prompt_texts),
            messages=rows(self.messages),
            answers=rows(self.answers),
            data_sources=rows(self.data_sources),
            example_ids=np.repeat(self.example_ids, times),
            solutions=rows(self.solutions),
            route_tags=rows(self.route_tags),
        )


def batch_examples(examples: Sequence[PromptExample]) -> PromptBatch:
    """Collects examples into a :class:`PromptBatch` (order kept)."""
    return PromptBatch(
        prompt_token_ids=[e.prompt_token_ids for e in examples],
        prompt_texts=[e.prompt_text for e in examples],
        messages=[e.messages for e in examples],
        answers=[e.answer for e in examples],
        data_sources=[e.data_source for e in examples],
        example_ids=np.asarray([e.example_id for e in examples], dtype=np.int64),
        solutions=[e.solution for e in examples],
        route_tags=[e.route_tag for e in examples],
    )


def left_pad(
    sequences: Sequence[np.ndarray | Sequence[int]], pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token id sequences to one static length.

    Args:
      sequences: ``batch`` sequences of token ids, each at most ``length`` long.
      pad_id: the id written in padding slots.
      length: the output length (static, e.g. ``max_prompt_length``, to avoid recompiles).

    Returns:
      ``tokens`` ``[batch, length]`` int32 and ``mask`` ``[batch, length]`` bool (True on real
      tokens, which sit right-aligned).
    """
    tokens = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        if n > length:
            raise ValueError(f"sequence {row} has {n} tokens, more than length={length}")
        if n:
            tokens[row, length - n :] = np.asarray(sequence, dtype=np.int32)
            mask[row, length - n :] = True
    return tokens, mask


@dataclasses.dataclass(frozen=True)
class PromptFileStats:
    """What :func:`load_prompts` read, dropped and kept.

    Attributes:
      files: the files read, in order.
      num_rows: rows read (including malformed ones).
      num_malformed: rows skipped as malformed (``on_bad_row="skip"``).
      malformed_examples: up to :data:`MAX_REPORTED_BAD_ROWS` ``"origin: reason"`` strings.
      num_too_long: well-formed prompts dropped for having more than ``max_prompt_length`` tokens.
      max_prompt_length: the length filter applied.
      num_kept: examples kept.
      longest_kept: the longest kept prompt, in tokens (0 when none is kept).
    """

    files: tuple[str, ...]
    num_rows: int
    num_malformed: int
    malformed_examples: tuple[str, ...]
    num_too_long: int
    max_prompt_length: int
    num_kept: int
    longest_kept: int

    def summary(self) -> str:
        """One line for the log."""
        text = (
            f"{self.num_kept}/{self.num_rows} prompts kept from {', '.join(self.files)}: "
            f"{self.num_too_long} longer than max_prompt_length={self.max_prompt_length} tokens, "
            f"{self.num_malformed} malformed; longest kept prompt {self.longest_kept} tokens"
        )
        if self.malformed_examples:
            text += "; first malformed: " + " | ".join(self.malformed_examples)
        return text


# ---------------------------------------------------------------------------------------------
# Reading and checking rows
# ---------------------------------------------------------------------------------------------


class _BadRow(ValueError):
    """A row that cannot be used; the message says why."""


# JSON's own whitespace (RFC 8259): a line of only these bytes is blank, not a row.
_JSON_WHITESPACE = b" \t\r\n"
_UTF8_BOM = b"\xef\xbb\xbf"


def _parse_jsonl_line(raw: bytes) -> Any:
    """One JSONL line (bytes) -> the decoded JSON value, or a :class:`_BadRow` saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _BadRow(f"not valid UTF-8 at byte {e.start} of the line (byte 0x{raw[e.start]:02x})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return _BadRow("invalid JSON (nested too deeply to parse)")
    except ValueError:
        # json.loads raises a plain ValueError for an integer literal longer than Python's
        # int-to-str conversion limit (sys.get_int_max_str_digits()).
        return _BadRow(f"invalid JSON (an integer literal has more than {sys.get_int_max_str_digits()} digits)")


def _read_parquet_rows(path: str) -> list[tuple[str, Any]]:
    """Parquet rows as Python dicts; a row whose values cannot be converted becomes a :class:`_BadRow`."""
    import pyarrow as pa  # noqa: PLC0415  (only needed for Parquet input)
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        # The whole file is unreadable (not Parquet, truncated footer, ...): there are no rows to
        # skip, so this is refused whatever `on_bad_row` says.
        raise ValueError(f"{path}: cannot be read as Parquet: {e}") from None
    rows: list[tuple[str, Any]] = []
    for batch in table.to_batches():
        try:
            converted: list[Any] = batch.to_pylist()
        except (ValueError, OverflowError, pa.ArrowException):
            # Some row holds a value Python cannot represent (e.g. a string column with invalid
            # UTF-8 bytes, a timestamp out of datetime's range): convert row by row to find it.
            converted = []
            for i in range(batch.num_rows):
                try:
                    converted.append(batch.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError as e:
                    converted.append(_BadRow(f"a string value is not valid UTF-8 ({e.reason} at byte {e.start})"))
                except (ValueError, OverflowError, pa.ArrowException) as e:
                    converted.append(_BadRow(f"a value cannot be converted ({type(e).__name__}: {e})"))
        rows.extend((f"{path}:{len(rows)}", row) for row in converted)
    return rows


def _read_rows(path: str) -> list[tuple[str, Any]]:
    """Returns ``(origin, row)`` pairs; a row that cannot be decoded becomes a :class:`_BadRow`.

    JSONL is read as bytes and decoded line by line, so one line of invalid UTF-8 or invalid
    JSON is one bad row rather than a failure of the whole file.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; use one of {_SUPPORTED_SUFFIXES}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    if suffix == ".parquet":
        return _read_parquet_rows(path)
    rows: list[tuple[str, Any]] = []
    with open(path, "rb") as f:
        # Iterating a binary file splits on b"\n" only; a CRLF line keeps its b"\r", which is
        # JSON whitespace. A lone b"\r" is not a line break (it is inside the line's JSON).
        for line_number, raw in enumerate(f, start=1):
            if line_number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]  # editors on Windows write a BOM; it is not data
            if not raw.strip(_JSON_WHITESPACE):
                continue  # blank lines (e.g. a trailing newline) are not rows
            rows.append((f"{path}:{line_number}", _parse_jsonl_line(raw)))
    return rows


def _lookup(row: Mapping[str, Any], dotted_key: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; raises KeyError when a level is missing or None."""
    value: Any = row
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value or value[part] is None:
            raise KeyError(dotted_key)
        value = value[part]
    return value


def _check_text(value: str, field: str) -> str:
    """Refuses strings the tokenizer cannot encode: lone surrogates (JSON ``"\\ud800"`` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadRow(f"'{field}' is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


def _check_messages(value: Any, field: str) -> Messages:
    if not isinstance(value, (list, tuple)):
        raise _BadRow(f"'{field}' must be a list of chat messages, got {type(value).__name__}")
    if not value:
        raise _BadRow(f"'{field}' is an empty list of chat messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _BadRow(f"'{field}[{i}]' must be an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _BadRow(
                f"'{field}[{i}]' needs a string 'role' and a string 'content', got "
                f"{type(role).__name__} and {type(content).__name__}"
            )
        if role not in CHAT_ROLES:
            # Qwen's chat templates silently drop turns with other roles.
            raise _BadRow(f"'{field}[{i}].role' must be one of {CHAT_ROLES}, got {role[:40]!r}")
        messages.append(
            {"role": _check_text(role, f"{field}[{i}].role"), "content": _check_text(content, f"{field}[{i}].content")}
        )
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise _BadRow(f"'{field}' has no user message with non-blank content")
    return messages


def _row_to_fields(
    row: Any,
    *,
    prompt_key: str,
    messages_key: str,
    answer_key: str,
    data_source_key: str,
    default_data_source: str,
    require_answer: bool,
) -> tuple[Messages, str | None, str]:
    """Validates one row and returns ``(messages, answer, data_source)``; raises :class:`_BadRow`."""
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, Mapping):
        raise _BadRow(f"a row must be an object, got {type(row).__name__}")
    if row.get(messages_key) is not None:
        messages = _check_messages(row[messages_key], messages_key)
    elif row.get(prompt_key) is not None:
        prompt = row[prompt_key]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _BadRow(f"'{prompt_key}' is empty")
            messages = [{"role": "user", "content": _check_text(prompt, prompt_key)}]
        elif isinstance(prompt, (list, tuple)):
            messages = _check_messages(prompt, prompt_key)
        else:
            raise _BadRow(f"'{prompt_key}' must be a string or a list of chat messages, got {type(prompt).__name__}")
    else:
        raise _BadRow(f"no '{prompt_key}' or '{messages_key}' field")

    answer: str | None = None
    try:
        raw_answer = _lookup(row, answer_key)
    except KeyError:
        if require_answer:
            raise _BadRow(f"no '{answer_key}' field") from None
    else:
        if isinstance(raw_answer, bool) or not isinstance(raw_answer, (str, int, float)):
            raise _BadRow(f"'{answer_key}' must be a string or a number, got {type(raw_answer).__name__}")
        if isinstance(raw_answer, float) and not math.isfinite(raw_answer):
            raise _BadRow(f"'{answer_key}' is not finite: {raw_answer}")
        answer = _check_text(str(raw_answer), answer_key)
        if require_answer and not answer.strip():
            raise _BadRow(f"'{answer_key}' is empty")

    data_source = row.get(data_source_key, default_data_source)
    if data_source is None:
        data_source = default_data_source
    if not isinstance(data_source, str):
        raise _BadRow(f"'{data_source_key}' must be a string, got {type(data_source).__name__}")
    if not data_source.strip():
        raise _BadRow(f"'{data_source_key}' is empty")
    return messages, answer, _check_text(data_source, data_source_key)


def _optional_text(row: Mapping[str, Any], key: str) -> str | None:
    """The string at ``key`` (dotted for nested fields), or None when it is missing, null or blank;
    any other type makes the row malformed (:class:`_BadRow`)."""
    try:
        value = _lookup(row, key)
    except KeyError:
        return None
    if not isinstance(value, str):
        raise _BadRow(f"'{key}' must be a string, got {type(value).__name__}")
    value = _check_text(value, key)
    return value if value.strip() else None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """``transformers.AutoTokenizer.from_pretrained(path)`` for a local directory, offline."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    from transformers import AutoTokenizer  # noqa: PLC0415  (heavy import, only when used)

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    *,
    use_chat_template: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
) -> str:
    """The prompt text the model sees: the chat template with the generation prompt appended.

    Args:
      tokenizer: a Hugging Face tokenizer with a chat template.
      messages: the chat turns, ``[{"role": ..., "content": ...}, ...]``.
      use_chat_template: False uses the prompt verbatim; it must then be one user message (base
        models, synthetic tasks).
      chat_template_kwargs: extra template variables; None means
        :data:`DEFAULT_CHAT_TEMPLATE_KWARGS` (``enable_thinking=False``), ``{}`` means none.
      chat_template: a Jinja template used instead of the tokenizer's own (None: the tokenizer's).
    """
    if not use_chat_template:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise _BadRow("without a chat template the prompt must be a single user message")
        return messages[0]["content"]
    import jinja2  # noqa: PLC0415  (transformers renders chat templates with jinja2)

    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            **({} if chat_template is None else {"chat_template": chat_template}),
            **dict(DEFAULT_CHAT_TEMPLATE_KWARGS if chat_template_kwargs is None else chat_template_kwargs),
        )
    except jinja2.TemplateError as e:  # e.g. a template that rejects the role order
        raise _BadRow(f"the chat template rejected the messages: {e}") from None


def load_prompts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    messages_key: str = "messages",
    answer_key: str = "answer",
    data_source_key: str = "data_source",
    default_data_source: str = "math",
    require_answer: bool = True,
    use_chat_template: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    add_special_tokens: bool = False,
    on_bad_row: OnBadRow = "skip",
    max_examples: int | None = None,
    solution_key: str = "solution",
    route_key: str | None = None,
) -> tuple[list[PromptExample], PromptFileStats]:
    """Reads, checks, templates, tokenizes and length-filters every row of the prompt files.

    Args:
      paths: one file or several (concatenated in the given order); ``.jsonl`` or ``.parquet``.
      tokenizer: the student's Hugging Face tokenizer (it owns the chat template).
      max_prompt_length: prompts with more tokens than this are dropped and counted.
      prompt_key / messages_key / answer_key / data_source_key: field names; ``answer_key`` may
        be dotted for nested fields (``"reward_model.ground_truth"``).
      default_data_source: the data source of rows without one.
      require_answer: a row without an answer is malformed (True) or kept with ``answer=None``.
      use_chat_template: apply the tokenizer's chat template (False: the prompt text verbatim).
      chat_template_kwargs: extra template variables; None means
        :data:`DEFAULT_CHAT_TEMPLATE_KWARGS` (Qwen3's non-thinking format), ``{}`` means none.
      add_special_tokens: let the tokenizer add BOS/EOS around the text. The chat template already
        writes its special tokens, so the default is False.
      on_bad_row: ``"skip"`` malformed rows (counted, first reasons kept) or ``"raise"`` on the first.
      max_examples: keep only the first this-many kept examples (None: all).
      solution_key: the field of a row's reference solution (dotted for nested fields, e.g.
        ``"extra_info.ref_solution"``); kept as :attr:`PromptExample.solution`.
      route_key: the field whose value routes the row to a teacher (dotted for nested fields);
        None: the row's ``data_source``. Kept as :attr:`PromptExample.route_tag`.

    Returns:
      ``(examples, stats)``: the kept examples in file order and what was dropped.

    Raises:
      FileNotFoundError: a file does not exist.
      ValueError: an unsupported file type; a ``.parquet`` file that cannot be read as Parquet at
        all (refused whatever ``on_bad_row`` says: there are no rows to skip); a malformed row
        with ``on_bad_row="raise"`` (``"path:line: malformed row: reason"``); or no example left
        after filtering (the message names the files, the counts and the first reasons). Nothing
        else is raised for any file content.

    What is a row, and which rows are malformed:

    * JSONL is read as bytes and split on ``\n`` only. A line of only JSON whitespace
      (space, tab, ``\r``, ``\n``) is blank and not a row; every other line is one row. CRLF line
      endings, a UTF-8 byte-order mark at the start of the file, and a last line without a
      newline are accepted. A line that is not valid UTF-8 (``"not valid UTF-8 at byte N of the
      line"``) or not valid JSON (including nesting too deep to parse and integer literals over
      Python's digit limit) is malformed on its own; the other lines are still read.
      ``NaN`` / ``Infinity`` literals parse, and are then refused where a number must be finite.
    * Parquet: every table row is one row (0-based origin). A row holding a value Python cannot
      decode (a string column with invalid UTF-8 bytes, ...) is malformed on its own.
    * A row must be an object (a JSON number, string, list or null is malformed).
    * The prompt is ``messages_key`` if present and not null, else ``prompt_key``: either a
      string with non-whitespace text, or a non-empty list of ``{"role", "content"}`` objects
      with string ``content`` and ``role`` in :data:`CHAT_ROLES`, at least one of them a user
      message with non-blank content. Anything else (a number, an object, an empty list, a
      message with non-string content, unknown role) is malformed; so is a string holding a lone
      UTF-16 surrogate (a JSON ``"\\ud800"`` escape), which no tokenizer can encode.
    * ``answer_key``: a string, an integer (kept as its decimal text) or a finite float; booleans,
      lists, objects, NaN / infinity and (when required) blank strings are malformed; a missing
      or null answer is malformed only when ``require_answer``.
    * ``data_source_key``: missing or null takes ``default_data_source``; otherwise it must be a
      non-blank string.
    * ``solution_key`` and ``route_key`` are optional: missing, null or blank gives None; any
      value that is not a string is malformed.
    * The chat template may also refuse a row (a ``jinja2.TemplateError``): malformed.

    Malformed rows are skipped and counted in :attr:`PromptFileStats.num_malformed` (the first
    :data:`MAX_REPORTED_BAD_ROWS` reasons kept), or raise with ``on_bad_row="raise"``; well-formed
    prompts longer than ``max_prompt_length`` tokens are counted in ``num_too_long``. So
    ``num_kept + num_malformed + num_too_long == num_rows`` when ``max_examples`` is None.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = tuple(os.fspath(p) for p in paths)
    if not files:
        raise ValueError("no prompt files given")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if on_bad_row not in ("skip", "raise"):
        raise ValueError(f"on_bad_row must be 'skip' or 'raise', got {on_bad_row!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")

    # Every file must exist before any is read, so a typo in the last one fails fast.
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file not found: {path}")
    rows = [row for path in files for row in _read_rows(path)]

    malformed: list[str] = []
    parsed: list[tuple[str, Messages, str | None, str, str, str | None, str | None]] = []
    for origin, row in rows:
        try:
            messages, answer, data_source = _row_to_fields(
                row,
                prompt_key=prompt_key,
                messages_key=messages_key,
                answer_key=answer_key,
                data_source_key=data_source_key,
                default_data_source=default_data_source,
                require_answer=require_answer,
            )
            solution = _optional_text(row, solution_key)
            route_tag = data_source if route_key is None else _optional_text(row, route_key)
            text = render_prompt(
                tokenizer,
                messages,
                use_chat_template=use_chat_template,
                chat_template_kwargs=chat_template_kwargs,
            )
        except _BadRow as e:
            if on_bad_row == "raise":
                raise ValueError(f"{origin}: malformed row: {e}") from None
            malformed.append(f"{origin}: {e}")
            continue
        parsed.append((origin, messages, answer, data_source, text, solution, route_tag))

    # One batched call: the Rust tokenizer is much faster on a list than row by row.
    texts = [p[4] for p in parsed]
    token_ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []

    examples: list[PromptExample] = []
    num_too_long = 0
    for (origin, messages, answer, data_source, text, solution, route_tag), ids in zip(parsed, token_ids):
        if len(ids) > max_prompt_length:
            num_too_long += 1
            continue
        examples.append(
            PromptExample(
                example_id=len(examples),
                origin=origin,
                prompt_token_ids=np.asarray(ids, dtype=np.int32),
                prompt_text=text,
                messages=messages,
                answer=answer,
                data_source=data_source,
                solution=solution,
                route_tag=route_tag,
            )
        )
    if max_examples is not None:
        examples = examples[:max_examples]
    stats = PromptFileStats(
        files=files,
        num_rows=len(rows),
        num_malformed=len(malformed),
        malformed_examples=tuple(malformed[:MAX_REPORTED_BAD_ROWS]),
        num_too_long=num_too_long,
        max_prompt_length=max_prompt_length,
        num_kept=len(examples),
        longest_kept=max((len(e.prompt_token_ids) for e in examples), default=0),
    )
    if not examples:
        raise ValueError(
            f"no prompts left in {', '.join(files)}: {stats.num_rows} rows read, "
            f"{stats.num_malformed} malformed (on_bad_row='skip'), {stats.num_too_long} longer than "
            f"max_prompt_length={max_prompt_length} tokens"
            + (f"; first malformed: {' | '.join(stats.malformed_examples)}" if malformed else "")
        )
    return examples, stats


def load_eval_set(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_examples: int | None = None,
    **load_kwargs: Any,
) -> tuple[list[PromptExample], PromptFileStats]:
    """An evaluation / validation set: every kept row, in file order, no shuffling.

    The same checks and length filter as training (the authors build their validation set with
    the training data config, docs/effopd_rule.md#validation-set); answers are required. ``max_examples`` keeps the first
    N. Other keyword arguments go to :func:`load_prompts`.
    """
    if "require_answer" in load_kwargs:
        raise ValueError("load_eval_set always requires answers; do not pass require_answer")
    return load_prompts(
        paths,
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_examples=max_examples,
        require_answer=True,
        **load_kwargs,
    )


# ---------------------------------------------------------------------------------------------
# grain pipeline
# ---------------------------------------------------------------------------------------------


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415  (only when the caller leaves the split to JAX)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    return process_index, process_count


def _process_slice(start: int, stop: int) -> Callable[[Sequence[PromptExample]], PromptBatch]:
    def take(global_batch: Sequence[PromptExample]) -> PromptBatch:
        return batch_examples(global_batch[start:stop])

    return take


def train_dataset(
    examples: Sequence[PromptExample],
    *,
    prompts_per_step: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """A ``grain.MapDataset`` whose element ``t`` is this process's :class:`PromptBatch` of step ``t``.

    Args:
      examples: from :func:`load_prompts`.
      prompts_per_step: global batch size in prompts (all processes together); must be divisible
        by ``process_count`` and at most ``len(examples)``.
      seed: shuffle seed in ``[0, 2**32)``; every epoch gets its own permutation derived from it.
      shuffle: False keeps file order in every epoch.
      num_epochs: passes over the data; None repeats forever.
      process_index / process_count: this process's slot; default ``jax.process_index()`` /
        ``jax.process_count()``.

    Returns:
      A dataset of ``num_epochs * (len(examples) // prompts_per_step)`` batches (or unbounded),
      each of ``prompts_per_step // process_count`` prompts.
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    if not examples:
        raise ValueError("examples is empty")
    if prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
    if prompts_per_step % process_count:
        raise ValueError(
            f"prompts_per_step={prompts_per_step} is not divisible by the process count {process_count}"
        )
    if prompts_per_step > len(examples):
        raise ValueError(
            f"prompts_per_step={prompts_per_step} is larger than the {len(examples)} prompts kept, "
            "so no full batch can be formed"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")

    per_process = prompts_per_step // process_count
    dataset = grain.MapDataset.source(list(examples))
    if shuffle:
        # grain reshuffles each epoch with the permutation seed `base + epoch`. Mixing the user
        # seed first keeps runs with neighbouring seeds (s, s + 1) from seeing the same epoch
        # orders shifted by one epoch.
        base_seed = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
        dataset = dataset.shuffle(seed=base_seed)
    # Batching before `repeat` batches each epoch separately (the remainder is dropped per epoch).
    dataset = dataset.batch(prompts_per_step, drop_remainder=True, batch_fn=list)
    dataset = dataset.repeat(num_epochs)
    start = process_index * per_process
    return dataset.map(_process_slice(start, start + per_process))


def train_iterator(
    examples: Sequence[PromptExample],
    *,
    prompts_per_step: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An iterator over :func:`train_dataset` with checkpointable state.

    ``iterator.get_state()`` is a JSON-serialisable dict (the index of the next batch);
    ``iterator.set_state(state)`` on an iterator built with the same arguments makes the next
    ``next(iterator)`` return exactly the batch that followed when the state was taken. Save it
    with the run checkpoint (``ocp.args.JsonSave(iterator.get_state())``, or
    ``grain.checkpoint.CheckpointSave(iterator)`` in an orbax ``Composite``).
    The iterator raises ``StopIteration`` after ``num_epochs`` epochs.
    """
    dataset = train_dataset(
        examples,
        prompts_per_step=prompts_per_step,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    # The elements are already tokenized in memory: prefetch threads would only add overhead
    # (and threads that hold the GIL while the trainer dispatches device work).
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def steps_per_epoch(num_examples: int, prompts_per_step: int) -> int:
    """Full global batches per epoch (the remainder of each epoch is dropped)."""
    return num_examples // prompts_per_step
