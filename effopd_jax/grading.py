"""Answer checking: ``\\boxed{}`` extraction, math-verify grading, exact match, mean@n / pass@k.

What the EffOPD authors run (docs/effopd_rule.md#grading, docs/paper_runs.md#benchmark-evaluation):

* the model's answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) in the
  decoded response, brace-matched; a response without one scores 0;
* in the in-training validation that scores EffOPD candidates, that content is truncated to 300
  characters before grading (``max_answer_chars=300`` here; the final benchmark evaluation does
  not truncate, ``max_answer_chars=None``);
* the content is correct iff math-verify says
  ``verify(parse("\\boxed{<ground truth>}"), parse("\\boxed{<answer>}"))``;
* reported metrics over ``n`` samples per problem: mean@n (= average pass@1, the fraction of all
  samples that are correct) and pass@n (the fraction of problems with at least one correct
  sample).

The synthetic demo tasks are graded by exact string match instead (:func:`grade_exact`); the
dispatch on ``data_source`` is :func:`grade`.

math-verify bounds its parse / compare time with ``signal.alarm`` (SIGALRM), which Python only
allows on the main thread; elsewhere math-verify raises ``ValueError``. :func:`grade_math`
therefore uses the signal timeouts on the main thread and disables them on other threads (a
one-time warning says so): there, a pathological expression is not interrupted, so callers that
grade off the main thread and need a hard time bound should grade in a worker process.

Everything here is host-side Python/NumPy (strings in, floats out); nothing is traced by JAX.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

# Commands whose braced argument holds the final answer. `\fbox` is what some models emit.
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Truncation the authors apply to the extracted answer in training-time validation (docs/effopd_rule.md#grading).
TRAIN_VALIDATION_MAX_ANSWER_CHARS = 300
# `data_source` values starting with this prefix are graded by exact match (the synthetic tasks).
EXACT_MATCH_SOURCE_PREFIX = "synthetic"

_off_main_thread_warned = False


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def _braced_argument(text: str, open_brace: int) -> str | None:
    """Returns the text between ``text[open_brace] == "{"`` and its matching ``}``.

    A backslash escapes the next character, so ``\\{``, ``\\}`` (literal braces) and ``\\\\``
    (a LaTeX line break) do not change the depth. Returns None when the brace is never closed
    (e.g. a response cut off by the token limit).
    """
    depth = 0
    i = open_brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
        i += 1
    return None


def extract_boxed(text: str, max_answer_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, brace-matched.

    The last occurrence of either command decides: when its argument is missing (the command is
    not followed by ``{``, possibly after spaces) or never closed, the result is None; an earlier
    box is not used instead (a truncated final answer is no answer). Commands that merely share
    the prefix (``\\boxedx``) are not boxes.

    Args:
      text: a decoded model response.
      max_answer_chars: if set, the content is cut to its first ``max_answer_chars`` characters
        (the authors use 300 in training-time validation, :data:`TRAIN_VALIDATION_MAX_ANSWER_CHARS`).

    Returns:
      The content between the braces (not stripped), or None if there is no complete box.
    """
    if max_answer_chars is not None and max_answer_chars < 1:
        raise ValueError(f"max_answer_chars must be >= 1 or None, got {max_answer_chars}")
    last_command_end = -1
    last_start = -1
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start >= 0:
            end = start + len(command)
            # `\boxedfoo` is another command; a box is followed by `{`, a space or the end.
            if end >= len(text) or not text[end].isalpha():
                break
            start = text.rfind(command, 0, start)
        if start > last_start:
            last_start, last_command_end = start, start + len(command)
    if last_start < 0:
        return None
    open_brace = last_command_end
    while open_brace < len(text) and text[open_brace] == " ":
        open_brace += 1
    if open_brace >= len(text) or text[open_brace] != "{":
        return None
    content = _braced_argument(text, open_brace)
    if content is not None and max_answer_chars is not None:
        content = content[:max_answer_chars]
    return content


# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------


def _math_verify_timeout(timeout_seconds: int | None) -> int | None:
    """The timeout math-verify may use on this thread (None: no SIGALRM-based limit)."""
    global _off_main_thread_warned
    if timeout_seconds is None:
        return None
    if threading.current_thread() is threading.main_thread():
        return timeout_seconds
    if not _off_main_thread_warned:
        logger.warning(
            "grade_math called off the main thread: math-verify's SIGALRM timeouts are unavailable "
            "here, so parsing/verification runs without a time limit."
        )
        _off_main_thread_warned = True
    return None


def math_answers_equal(ground_truth: str, answer: str, *, timeout_seconds: int | None = 5) -> bool:
    """``verify(parse("\\boxed{ground_truth}"), parse("\\boxed{answer}"))`` with math-verify.

    Parse failures, comparison errors and timeouts all count as "not equal" (math-verify logs
    them); this never raises for any string input.

    Args:
      ground_truth: the reference answer (LaTeX or plain, without the box).
      answer: the extracted model answer (without the box).
      timeout_seconds: per parse / compare limit on the main thread (see module docstring).
    """
    # Imported on use: math-verify pulls in sympy (~1 s), which most of the library never needs.
    import math_verify  # noqa: PLC0415
    from math_verify.errors import TimeoutException  # noqa: PLC0415

    timeout = _math_verify_timeout(timeout_seconds)
    try:
        gold = math_verify.parse("\\boxed{" + ground_truth + "}", parsing_timeout=timeout)
        pred = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(math_verify.verify(gold, pred, timeout_seconds=timeout))
    # math-verify catches its own errors and timeouts and returns []/False; this is the last line
    # of defence. TimeoutException derives from BaseException, hence listed explicitly.
    except (Exception, TimeoutException):
        logger.debug("math-verify failed on ground truth %r / answer %r", ground_truth, answer, exc_info=True)
        return False


def grade_math(
    response: str,
    ground_truth: str,
    *,
    max_answer_chars: int | None = None,
    timeout_seconds: int | None = 5,
) -> float:
    """1.0 if the last boxed answer in ``response`` equals ``ground_truth`` by math-verify, else 0.0.

    Args:
      response: the decoded model response (special tokens already removed).
      ground_truth: the reference answer, e.g. ``"18"`` or ``"\\frac{1}{2}"``.
      max_answer_chars: truncation of the extracted answer (300 in training-time validation).
      timeout_seconds: math-verify's per-call limit on the main thread; None disables it.
    """
    answer = extract_boxed(response, max_answer_chars)
    if answer is None:
        return 0.0
    return 1.0 if math_answers_equal(ground_truth, answer, timeout_seconds=timeout_seconds) else 0.0


def grade_exact(
    response: str,
    ground_truth: str,
    *,
    extract: Literal["boxed", "full"] = "boxed",
) -> float:
    """1.0 if the answer equals ``ground_truth`` as a string (surrounding whitespace ignored).

    Args:
      response: the decoded model response.
      ground_truth: the expected answer string.
      extract: ``"boxed"`` compares the last ``\\boxed{}`` content (no box scores 0);
        ``"full"`` compares the whole response.
    """
    if extract == "boxed":
        answer = extract_boxed(response)
        if answer is None:
            return 0.0
    elif extract == "full":
        answer = response
    else:
        raise ValueError(f"extract must be 'boxed' or 'full', got {extract!r}")
    return 1.0 if answer.strip() == ground_truth.strip() else 0.0


def grade(
    response: str,
    ground_truth: str,
    data_source: str,
    *,
    max_answer_chars: int | None = None,
    timeout_seconds: int | None = 5,
) -> float:
    """Grades one response by its data source.

    ``data_source`` starting with ``"synthetic"`` (the demo tasks): :func:`grade_exact` on the
    boxed answer. Anything else is a math source (gsm8k, math, aime24, DeepMath, ...):
    :func:`grade_math`.
    """
    if data_source.startswith(EXACT_MATCH_SOURCE_PREFIX):
        return grade_exact(response, ground_truth)
    return grade_math(
        response, ground_truth, max_answer_chars=max_answer_chars, timeout_seconds=timeout_seconds
    )


def grade_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    data_sources: Sequence[str],
    *,
    max_answer_chars: int | None = None,
    timeout_seconds: int | None = 5,
) -> np.ndarray:
    """:func:`grade` over parallel lists; returns ``[len(responses)]`` float32 of 0/1."""
    if not len(responses) == len(ground_truths) == len(data_sources):
        raise ValueError(
            f"responses ({len(responses)}), ground_truths ({len(ground_truths)}) and "
            f"data_sources ({len(data_sources)}) must have the same length"
        )
    scores = [
        grade(r, g, s, max_answer_chars=max_answer_chars, timeout_seconds=timeout_seconds)
        for r, g, s in zip(responses, ground_truths, data_sources)
    ]
    return np.asarray(scores, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Metrics over [problems, samples]
# ---------------------------------------------------------------------------------------------


def _as_correctness(correct: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    array = np.asarray(correct, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"correct must be [problems, samples] with both > 0, got shape {array.shape}")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError("correct must hold only 0/1 (or False/True) values")
    return array


def mean_at_n(correct: np.ndarray | Sequence[Sequence[float]]) -> float:
    """mean@n = average pass@1: ``sum(correct) / (problems * n)``.

    Args:
      correct: ``[problems, n]`` 0/1 correctness of each sample.
    """
    return float(_as_correctness(correct).mean())


def pass_at_k(correct: np.ndarray | Sequence[Sequence[float]], k: int) -> float:
    """Unbiased pass@k from ``n >= k`` samples per problem, averaged over problems.

    Per problem with ``c`` correct out of ``n``: ``1 - C(n - c, k) / C(n, k)``, the probability
    that a uniformly drawn ``k``-subset of the samples holds at least one correct one.

    Args:
      correct: ``[problems, n]`` 0/1 correctness of each sample.
      k: subset size, ``1 <= k <= n``.
    """
    array = _as_correctness(correct)
    n = array.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    num_correct = array.sum(axis=1).astype(np.int64)
    total = math.comb(n, k)
    per_problem = [1.0 - math.comb(n - int(c), k) / total for c in num_correct]
    return float(np.mean(per_problem))


def pass_at_n(correct: np.ndarray | Sequence[Sequence[float]]) -> float:
    """pass@n: the fraction of problems with at least one correct sample among their ``n``."""
    array = _as_correctness(correct)
    return float(array.max(axis=1).mean())
