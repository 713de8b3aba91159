"""The documentation is inside the repository and its cross-references resolve.

Every ``docs/<page>.md#<anchor>`` cited by code or markdown names an existing page and heading
(GitHub's heading slugs), relative markdown links between pages resolve, and no tracked file
points at material outside the repository.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers_tiny import REPO_ROOT

DOC_REFERENCE = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+\.md)(?:#([\w-]+))?\)")


def _tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [p for p in listed if p.endswith((".py", ".md", ".sh", ".toml", "Makefile", ".txt", ".json"))
            and not p.startswith("third_party/qwen3_tokenizer/") and os.path.exists(os.path.join(REPO_ROOT, p))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: str) -> set[str]:
    with open(page, encoding="utf-8") as f:
        lines = f.read().splitlines()
    in_code = False
    anchors = set()
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_slug_rule():
    assert _slug("Implementation in effopd_jax") == "implementation-in-effopd_jax"
    assert _slug("One OPD step, as data") == "one-opd-step-as-data"
    assert _slug("Inside `flax.nnx.Optimizer` or `TrainState`, as they are") == \
        "inside-flaxnnxoptimizer-or-trainstate-as-they-are"


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    out = {}
    for path in _tracked_text_files():
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8", errors="replace") as f:
            out[path] = f.read()
    return out


def test_every_cited_docs_page_and_anchor_exists(files):
    cited = 0
    for path, text in files.items():
        for page, anchor in DOC_REFERENCE.findall(text):
            full = os.path.join(REPO_ROOT, "docs", page)
            assert os.path.isfile(full), f"{path} cites docs/{page}, which does not exist"
            if anchor:
                assert anchor in _anchors(full), f"{path} cites docs/{page}#{anchor}: no such heading"
            cited += 1
    assert cited > 20  # the library's docstrings cite the docs pages


def test_relative_markdown_links_resolve(files):
    for path, text in files.items():
        if not path.endswith(".md"):
            continue
        for target, anchor in MARKDOWN_LINK.findall(text):
            if "://" in target:
                continue
            full = os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(path), target))
            assert os.path.isfile(full), f"{path} links to {target}, which does not exist"
            if anchor:
                assert anchor in _anchors(full), f"{path} links to {target}#{anchor}: no such heading"


# Where the project's steering notes live beside a checkout (spelled in pieces so that this file
# does not match itself).
OUTSIDE = ("../" + "shared", "/work/" + "shared", "effopd_" + "spec.md")


def test_nothing_points_outside_the_repository(files):
    for path, text in files.items():
        for needle in OUTSIDE:
            assert needle not in text, f"{path} refers to {needle!r}, outside the repository"
