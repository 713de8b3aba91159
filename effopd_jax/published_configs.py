"""Published model architectures by Hugging Face repository id: ``config.json`` without weights.

    published_configs.names()                    # ('Qwen/Qwen2.5-0.5B', ..., 'Qwen/Qwen3-8B')
    hf = published_configs.hf_config("Qwen/Qwen3-1.7B")
    model_config = models.config_from_hf(hf, param_dtype="float32", dtype="bfloat16")

A config names the models it was written for (``student.hf_name``, ``teachers[i].hf_name``); the
memory plan (``effopd_jax.plan``) takes a model's shapes from here when its ``path`` is empty, so
a shipped config plans as it is, without a checkpoint. The table is ``published_configs.json``
in this package: the architecture fields of each repository's ``config.json`` (Apache-2.0), the
same numbers as ``third_party/qwen_configs/qwen_configs.json`` (dense), ``qwen_moe_configs.json``
(mixture of experts, e.g. ``Qwen/Qwen3-30B-A3B``) and ``qwen3_5_configs.json`` (the Qwen3.5
entries, in their published multimodal layout) in the repository together (see their README for
the sources and notes; a test checks they agree).

Jax-free on purpose: the config schema reads :func:`names` to check ``hf_name`` fields.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published_configs.json")


@functools.cache
def _table() -> dict[str, dict[str, Any]]:
    with open(TABLE_FILE, encoding="utf-8") as f:
        return json.load(f)


def names() -> tuple[str, ...]:
    """The repository ids with a bundled config, sorted."""
    return tuple(sorted(_table()))


def hf_config(name: str) -> dict[str, Any]:
    """A copy of the bundled ``config.json`` fields of ``name`` (e.g. ``"Qwen/Qwen3-4B"``).

    Raises:
      ValueError: no config is bundled under ``name`` (the message lists the known names).
    """
    table = _table()
    if name not in table:
        raise ValueError(f"no bundled config for {name!r}; known: {', '.join(names())}")
    return dict(table[name])
