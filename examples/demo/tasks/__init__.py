"""Synthetic verifiable tasks for the embedded demo (data files, tokenizer, answer checker)."""

from examples.demo.tasks.arithmetic import (
    AdditionProblem,
    build_tokenizer,
    check_answer,
    make_task_files,
    save_tokenizer,
)

__all__ = [
    "AdditionProblem",
    "build_tokenizer",
    "check_answer",
    "make_task_files",
    "save_tokenizer",
]
