"""Answer checking: boxed extraction, math-verify grading on real GSM8K answers, metrics."""

from __future__ import annotations

import itertools
import json
import pathlib
import threading
from decimal import Decimal

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from effopd_jax import grading
from helpers_tiny import REPO_ROOT

GSM8K_FILE = pathlib.Path(REPO_ROOT) / "third_party" / "gsm8k" / "gsm8k_test_100.jsonl"


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    rows = [json.loads(line) for line in GSM8K_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 100
    return rows


def _response(row: dict, boxed: str) -> str:
    """A realistic response: the reference reasoning (without its `####` line) and a boxed answer."""
    reasoning = "\n".join(line for line in row["solution"].splitlines() if not line.startswith("####"))
    return (
        f"Let's solve this step by step.\n{reasoning.strip()}\n"
        f"Therefore, the final answer is $\\boxed{{{boxed}}}$."
    )


# ---------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("no box here, the answer is 42", None),
        ("", None),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\fbox{2}", "2"),  # the last of either command wins
        ("\\fbox{2} then \\boxed{1}", "1"),
        ("\\boxed {5}", "5"),  # spaces before the brace are allowed in LaTeX
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{a \\} b}", "a \\} b"),
        ("\\boxed{x \\\\ y}", "x \\\\ y"),  # `\\` is a line break, not an escaped brace
        ("\\boxed{ 12 }", " 12 "),  # content is returned unstripped
        ("\\boxed{}", ""),
        ("\\boxed{1} and then \\boxed{2", None),  # last box cut off: no answer, no fallback
        ("\\boxed 5", None),  # no braced argument
        ("\\boxedfoo{3}", None),  # another command that shares the prefix
        ("\\boxed{4} \\boxedfoo{3}", "4"),
    ],
)
def test_extract_boxed_cases(text, expected):
    assert grading.extract_boxed(text) == expected


def test_extract_boxed_truncation():
    content = "1" * 400
    assert grading.extract_boxed(f"\\boxed{{{content}}}") == content
    truncated = grading.extract_boxed(
        f"\\boxed{{{content}}}", max_answer_chars=grading.TRAIN_VALIDATION_MAX_ANSWER_CHARS
    )
    assert truncated == "1" * 300
    assert grading.extract_boxed("\\boxed{12}", max_answer_chars=300) == "12"
    with pytest.raises(ValueError, match="max_answer_chars"):
        grading.extract_boxed("\\boxed{1}", max_answer_chars=0)


# Balanced LaTeX-ish content: plain characters (no braces/backslashes) and nested `{...}` groups.
_plain = st.text(
    alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=8
)
_balanced = st.recursive(
    _plain,
    lambda inner: st.builds(lambda a, b, c: a + "{" + b + "}" + c, _plain, inner, _plain),
    max_leaves=6,
)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(prefix=_plain, content=_balanced, suffix=_plain, earlier=_balanced)
def test_extract_boxed_returns_last_balanced_argument(prefix, content, suffix, earlier):
    text = f"{prefix}\\boxed{{{earlier}}} {prefix}\\boxed{{{content}}}{suffix}"
    assert grading.extract_boxed(text) == content


# ---------------------------------------------------------------------------------------------
# grade_math on real GSM8K answers
# ---------------------------------------------------------------------------------------------


def test_grader_accepts_every_gsm8k_reference_answer(gsm8k_rows):
    scores = [grading.grade(_response(r, r["answer"]), r["answer"], r["data_source"]) for r in gsm8k_rows]
    assert scores == [1.0] * 100
    # Same with the authors' training-time truncation of the extracted answer.
    scores = [
        grading.grade_math(_response(r, r["answer"]), r["answer"], max_answer_chars=300) for r in gsm8k_rows
    ]
    assert scores == [1.0] * 100


def _wrong_digits(answer: str) -> str:
    reversed_digits = answer[::-1].lstrip("0").rstrip(".")
    if reversed_digits and Decimal(reversed_digits) != Decimal(answer):
        return reversed_digits
    return answer + "7"  # e.g. "5" or "11": reversing does not change the value


def test_grader_rejects_perturbed_gsm8k_answers(gsm8k_rows):
    for row in gsm8k_rows:
        answer = row["answer"]  # 99 integers and one "3.5"
        value = Decimal(answer)
        for wrong in (str(value + 1), _wrong_digits(answer), str(value * 10), str(-value)):
            assert Decimal(wrong) != value
            score = grading.grade(_response(row, wrong), answer, "gsm8k")
            assert score == 0.0, (answer, wrong)


def test_grader_requires_a_box(gsm8k_rows):
    row = gsm8k_rows[0]
    unboxed = _response(row, row["answer"]).replace("\\boxed", "")
    assert grading.extract_boxed(unboxed) is None
    assert grading.grade_math(unboxed, row["answer"]) == 0.0
    # The last box counts, not an earlier correct one.
    assert grading.grade_math(f"\\boxed{{{row['answer']}}} ... no wait, \\boxed{{0}}", row["answer"]) == 0.0


@pytest.mark.parametrize(
    "ground_truth, answer, expected",
    [
        ("18", "18.0", 1.0),
        ("1000", "1,000", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("18", "\\$18", 1.0),
        ("18", "19", 0.0),
        ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
        ("x^2", "x \\cdot x", 1.0),
        ("18", "this is not math {{", 0.0),
    ],
)
def test_grade_math_equivalences(ground_truth, answer, expected):
    assert grading.grade_math(f"so \\boxed{{{answer}}}", ground_truth) == expected


def test_grade_math_off_main_thread():
    import math_verify

    results: dict[str, object] = {}

    def work():
        # math-verify's own SIGALRM timeout refuses to run here: this is what grade_math handles.
        try:
            math_verify.parse("\\boxed{1}", parsing_timeout=5)
            results["raw"] = "no error"
        except ValueError as e:
            results["raw"] = e
        results["right"] = grading.grade_math("\\boxed{\\frac{6}{4}}", "1.5")
        results["wrong"] = grading.grade_math("\\boxed{2}", "1.5")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert isinstance(results["raw"], ValueError)
    assert results["right"] == 1.0
    assert results["wrong"] == 0.0


@pytest.mark.parametrize("error", ["timeout", "crash"])
def test_grade_math_failures_score_zero(monkeypatch, error):
    import math_verify
    from math_verify.errors import TimeoutException

    def failing_verify(*args, **kwargs):
        raise TimeoutException("slow") if error == "timeout" else RuntimeError("boom")

    monkeypatch.setattr(math_verify, "verify", failing_verify)
    assert grading.grade_math("\\boxed{1}", "1") == 0.0


# ---------------------------------------------------------------------------------------------
# exact match and dispatch
# ---------------------------------------------------------------------------------------------


def test_grade_exact():
    assert grading.grade_exact("reversed: \\boxed{c b a}", "c b a") == 1.0
    assert grading.grade_exact("\\boxed{ c b a }", "c b a") == 1.0
    assert grading.grade_exact("\\boxed{c  b a}", "c b a") == 0.0
    assert grading.grade_exact("c b a", "c b a") == 0.0  # no box
    assert grading.grade_exact(" c b a\n", "c b a", extract="full") == 1.0
    assert grading.grade_exact("c b a.", "c b a", extract="full") == 0.0
    with pytest.raises(ValueError, match="extract"):
        grading.grade_exact("x", "x", extract="last")


def test_grade_dispatches_on_data_source():
    response = "\\boxed{1/2}"
    assert grading.grade(response, "0.5", "gsm8k") == 1.0  # math-verify: 1/2 == 0.5
    assert grading.grade(response, "0.5", "synthetic/copy") == 0.0  # exact: "1/2" != "0.5"
    assert grading.grade(response, "1/2", "synthetic/copy") == 1.0


def test_grade_batch():
    scores = grading.grade_batch(["\\boxed{3}", "\\boxed{4}", "none"], ["3", "3", "3"], ["math"] * 3)
    np.testing.assert_array_equal(scores, np.array([1.0, 0.0, 0.0], dtype=np.float32))
    with pytest.raises(ValueError, match="same length"):
        grading.grade_batch(["a"], ["a", "b"], ["math"])


# ---------------------------------------------------------------------------------------------
# mean@n / pass@k
# ---------------------------------------------------------------------------------------------


def _brute_force_pass_at_k(correct: np.ndarray, k: int) -> float:
    """Average over problems of the fraction of k-subsets of samples holding a correct one."""
    per_problem = []
    for row in correct:
        subsets = list(itertools.combinations(range(len(row)), k))
        per_problem.append(np.mean([any(row[i] for i in s) for s in subsets]))
    return float(np.mean(per_problem))


def test_mean_and_pass_at_n():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    assert grading.mean_at_n(correct) == pytest.approx(5 / 12)
    assert grading.pass_at_n(correct) == pytest.approx(2 / 3)
    assert grading.pass_at_k(correct, 4) == pytest.approx(2 / 3)
    assert grading.pass_at_k(correct, 1) == pytest.approx(grading.mean_at_n(correct))


def test_pass_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    correct = rng.random((7, 6)) < 0.3
    for k in range(1, 7):
        assert grading.pass_at_k(correct, k) == pytest.approx(_brute_force_pass_at_k(correct, k), abs=1e-12)


def test_metric_input_checks():
    with pytest.raises(ValueError, match="problems, samples"):
        grading.mean_at_n(np.zeros(3))
    with pytest.raises(ValueError, match="0/1"):
        grading.pass_at_n(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="k must be"):
        grading.pass_at_k(np.ones((2, 3)), 4)
