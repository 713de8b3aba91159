"""Column addition with explicit carries: the demo's synthetic verifiable reasoning task.

A problem is two non-negative integers ``a + b``. The reference solution adds them column by
column, least-significant digit first, one line per column, writing the carry in explicitly,
and ends with the sum in ``\\boxed{}``::

    prompt:   374+258
    response: 4+8+0=12
              7+5+1=13
              3+2+1=6
              \\boxed{632}

Line ``i`` is ``x_i+y_i+c_i=s_i`` with ``x_i, y_i`` the i-th digits from the right (0 past the
end of the shorter operand), ``c_0 = 0``, ``s_i = x_i + y_i + c_i`` and ``c_{i+1} = s_i // 10``.
The boxed sum is ``s_last`` followed by the units digits ``s_i mod 10`` of the earlier lines in
reverse order. Every line is a local function of two prompt digits and the previous line, so a
tiny decoder can learn it; the number of columns (``max_digits``) sets the difficulty, which is
what separates a bigger teacher from a smaller student after the same short warm-up.

The module also builds the matching character-level tokenizer (Hugging Face ``tokenizers``,
Qwen special tokens and chat template) and the exact-match answer checker.

CLI: ``python -m examples.demo.tasks --out_dir DIR [--seed 0 --n_train ... ]`` writes
``DIR/{train,validation,test}.jsonl`` and ``DIR/tokenizer/{tokenizer.json,tokenizer_config.json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import string
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models

from effopd_jax import grading

DATA_SOURCE = "synthetic_arith"
SPLITS = ("train", "validation", "test")

# Qwen's special tokens. As in Qwen2.5/Qwen3 instruct checkpoints, generation stops at
# `<|im_end|>` (eos) and batches are padded with `<|endoftext|>` (pad); there is no bos.
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)
# Multi-character pieces kept whole, so the chat scaffolding and the answer marker cost one
# token each instead of one per character (short sequences are what make the CPU demo fast).
WORD_TOKENS = ("system", "user", "assistant", "\\boxed{")
# Every character a prompt, response or chat turn may contain. Characters outside it have no id:
# the BPE model (no `unk`, like Qwen's) would drop them, so the generator refuses such text.
ALPHABET = string.digits + string.ascii_lowercase + " \n" + "+-*/=(){}[]\\.,:;?!_^<>|'"

# Qwen's ChatML layout without a default system turn: every message is
# `<|im_start|>{role}\n{content}<|im_end|>\n`; the generation prompt is `<|im_start|>assistant\n`.
# Extra template kwargs (e.g. Qwen3's `enable_thinking`) are accepted and ignored.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BOXED_PREFIX = "\\boxed{"


@dataclasses.dataclass(frozen=True)
class AdditionProblem:
    """One problem ``a + b`` with ``a, b >= 0``; its texts are pure functions of ``(a, b)``."""

    a: int
    b: int

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AdditionProblem.{name}: must be a non-negative int, got {value!r}")

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def num_columns(self) -> int:
        """Lines in the derivation: the digit count of the longer operand."""
        return max(len(str(self.a)), len(str(self.b)))

    @property
    def response(self) -> str:
        """The reference derivation (see the module docstring), ending in ``\\boxed{a+b}``."""
        a_digits = str(self.a)[::-1]
        b_digits = str(self.b)[::-1]
        lines = []
        units = []
        carry = 0
        column_sum = 0
        for i in range(self.num_columns):
            x = int(a_digits[i]) if i < len(a_digits) else 0
            y = int(b_digits[i]) if i < len(b_digits) else 0
            column_sum = x + y + carry
            lines.append(f"{x}+{y}+{carry}={column_sum}")
            units.append(str(column_sum % 10))
            carry = column_sum // 10
        # The last line's full sum carries the final carry; earlier lines contribute units digits.
        total = str(column_sum) + "".join(reversed(units[:-1]))
        return "\n".join(lines) + f"\n{BOXED_PREFIX}{total}}}"

    def to_row(self) -> dict[str, object]:
        """The JSONL record: the fields the data pipeline and SFT read, plus the difficulty."""
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "response": self.response,
            "data_source": DATA_SOURCE,
            "num_columns": self.num_columns,
        }


def _operand_range(num_digits: int) -> tuple[int, int]:
    """Inclusive ``[low, high]`` of the integers with exactly ``num_digits`` digits (0 has 1)."""
    return (0 if num_digits == 1 else 10 ** (num_digits - 1)), 10**num_digits - 1


def sample_problems(
    rng: random.Random, count: int, min_digits: int, max_digits: int
) -> list[AdditionProblem]:
    """``count`` distinct problems; each operand's digit count is uniform in [min, max] digits.

    Duplicates are redrawn, so the small (quickly exhausted) digit-count classes end up
    somewhat under-represented when ``count`` is large; the splits stay disjoint either way.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"min_digits/max_digits: need 1 <= min <= max, got {min_digits}, {max_digits}")
    low = _operand_range(min_digits)[0]
    high = _operand_range(max_digits)[1]
    capacity = (high - low + 1) ** 2
    # Rejection sampling slows down sharply as the space fills; half of it is plenty for a demo.
    if count > capacity // 2:
        raise ValueError(
            f"count: {count} distinct problems requested but operands with {min_digits}..{max_digits} "
            f"digits give only {capacity} (at most half may be drawn); raise max_digits"
        )
    seen: set[tuple[int, int]] = set()
    problems = []
    while len(problems) < count:
        a = rng.randint(*_operand_range(rng.randint(min_digits, max_digits)))
        b = rng.randint(*_operand_range(rng.randint(min_digits, max_digits)))
        if (a, b) not in seen:
            seen.add((a, b))
            problems.append(AdditionProblem(a, b))
    return problems


def _check_alphabet(text: str, field: str) -> None:
    unknown = sorted(set(text) - set(ALPHABET))
    if unknown:
        raise ValueError(f"{field}: characters {unknown!r} are not in the tokenizer's alphabet")


def make_task_files(
    out_dir: str,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    *,
    min_digits: int = 1,
    max_digits: int = 3,
) -> dict[str, str]:
    """Writes ``out_dir/{train,validation,test}.jsonl``; returns ``{split: path}``.

    Deterministic for ``(seed, n_train, n_val, n_test, min_digits, max_digits)``: all problems
    come from one ``random.Random(seed)`` stream, drawn distinct, then cut into the splits in
    order, so the three splits are disjoint. Each line is a JSON object with ``prompt``,
    ``answer``, ``response`` (reference derivation for SFT), ``data_source`` and ``num_columns``.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: must be a non-negative int, got {value!r}")
    rng = random.Random(seed)
    problems = sample_problems(rng, n_train + n_val + n_test, min_digits, max_digits)
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val)}
    bounds["test"] = (n_train + n_val, n_train + n_val + n_test)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split in SPLITS:
        start, stop = bounds[split]
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for problem in problems[start:stop]:
                row = problem.to_row()
                _check_alphabet(row["prompt"] + row["response"], f"{split} row {problem.prompt!r}")
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def build_tokenizer() -> Tokenizer:
    """The character-level tokenizer: specials, then word pieces, then single characters.

    A BPE model with an all-character vocabulary and no merges splits plain text into single
    characters; the word pieces and special tokens are added tokens, matched before the model
    runs. The ``Fuse`` decoder concatenates pieces, so ``decode(encode(text)) == text`` for
    every text over :data:`ALPHABET`. Ids: 0 ``<|endoftext|>``, 1 ``<|im_start|>``,
    2 ``<|im_end|>``, then the characters, then the word pieces.
    """
    vocab: dict[str, int] = {}
    for piece in (*SPECIAL_TOKENS, *ALPHABET):
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    return tokenizer


def save_tokenizer(out_dir: str, model_max_length: int = 256) -> str:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``; returns ``out_dir``.

    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it as a fast tokenizer with
    Qwen's eos (``<|im_end|>``), pad (``<|endoftext|>``), no bos, and the ChatML template.
    The config names ``PreTrainedTokenizerFast`` rather than ``Qwen2Tokenizer`` on purpose:
    transformers 5's ``Qwen2Tokenizer`` replaces the pre-tokenizer with Qwen's byte-level one,
    which would not keep this vocabulary's spaces and newlines.
    """
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return out_dir


def check_answer(response_text: str, answer: str) -> bool:
    """True iff the last ``\\boxed{...}`` in ``response_text`` equals ``answer`` exactly.

    Extraction is :func:`effopd_jax.grading.extract_boxed` (brace-matched; the *last* box
    decides, and a missing or unclosed last box is wrong), and both sides are compared after
    stripping surrounding whitespace: the same rule as ``grading.grade_exact``, which the
    trainer's evaluation applies to ``data_source="synthetic_*"`` rows, so the demo scores
    answers one way everywhere.
    """
    if not isinstance(response_text, str):
        raise ValueError(f"response_text: must be a str, got {type(response_text).__name__}")
    if not isinstance(answer, str):
        raise ValueError(f"answer: must be a str, got {type(answer).__name__}")
    boxed = grading.extract_boxed(response_text)
    return boxed is not None and boxed.strip() == answer.strip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=20000)
    parser.add_argument("--n_val", type=int, default=256)
    parser.add_argument("--n_test", type=int, default=512)
    parser.add_argument("--min_digits", type=int, default=1)
    parser.add_argument("--max_digits", type=int, default=3)
    args = parser.parse_args(argv)
    paths = make_task_files(
        args.out_dir, args.seed, args.n_train, args.n_val, args.n_test,
        min_digits=args.min_digits, max_digits=args.max_digits,
    )
    paths["tokenizer"] = save_tokenizer(os.path.join(args.out_dir, "tokenizer"))
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
