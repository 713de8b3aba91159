"""One-command accelerator suite: decode bandwidth, prefill / update MFU, an OPD step, memory plan.

For when a GPU (or TPU) is lent; never part of CI. On Qwen3-0.6B- and Qwen3-1.7B-shaped random
models (the published architectures, `effopd_jax.published_configs`; random weights) in
bfloat16 it measures, and prints as one table:

  * decode: `sampling.generate_padded` on `--decode-batch` prompts of `--decode-prompt` tokens,
    `--decode-new` new tokens (EOS off, temperature 1). tokens/s = batch * new / t(call); the
    decode step is (t(new) - t(1)) / (new - 1), and its bytes are every matmul weight once
    (bf16, the tied lm-head included) plus the whole static bf16 KV cache; bytes / step time
    as a fraction of the device's memory bandwidth.
  * prefill: a jitted `models.forward` (hidden states, no lm-head) over
    `[--prefill-batch, --prefill-len]`; MFU = model FLOPs / time / the device's dense bf16 peak,
    with model FLOPs = 2 * matmul weights * tokens + causal attention 2 * batch * heads *
    len^2 * head_dim per layer (the half of the square a causal mask keeps, QK^T and PV).
  * update: from one full OPD step of the trainer (`Trainer.train_one_step`; student 0.6B-shaped,
    teacher 1.7B-shaped, fp32 master weights, bf16 compute, scanned layers, full remat,
    `rollout.weight_dtype="bfloat16"`): the step's `update_seconds` against 3x the student's
    forward FLOPs over the step's rows (lm-head on response tokens only, as the chunked loss
    computes it); remat's recomputation is not counted (MFU, not hardware FLOP utilisation).
    The step's time breakdown is the trainer's own `Stopwatch` laps.
  * memory: `plan.make_plan` (rollout, scoring and update programs compiled for this device;
    `--smoke`: the rollout program only)
    estimate of the largest program's peak vs the device's measured `peak_bytes_in_use`
    (`memory_stats()`) after the OPD steps (measured first, so the model benchmarks after them
    do not raise the peak).

Peaks: a table by device kind (`DEVICE_PEAKS`: dense bf16 TFLOP/s and memory bandwidth) or the
flags `--peak-tflops` / `--peak-bandwidth` (TB/s); without either the fractions print `n/a`.

Run:  python benchmarks/gpu_suite.py            (~5 minutes on one H100/H200)
      python benchmarks/gpu_suite.py --smoke    (tiny shapes: checks the script runs, e.g. on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_TOKENIZER_DIR = os.path.join(REPO_ROOT, "third_party", "qwen3_tokenizer")
GSM8K_FILE = os.path.join(REPO_ROOT, "third_party", "gsm8k", "gsm8k_test_100.jsonl")

# Dense (no sparsity) bf16 matmul peak in TFLOP/s and memory bandwidth in TB/s, by a substring
# of `jax.Device.device_kind` (first match wins: the more specific names come first).
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),       # SXM
    ("GH200", 989.0, 4.0),
    ("A100-SXM4-80GB", 312.0, 2.04),
    ("A100", 312.0, 1.56),       # 40GB
    ("L40S", 362.0, 0.864),
    ("L4", 121.0, 0.3),
    ("TPU v6", 918.0, 1.64),
    ("TPU v5p", 459.0, 2.76),
    ("TPU v5 lite", 197.0, 0.82),
    ("TPU v5e", 197.0, 0.82),
    ("TPU v4", 275.0, 1.2),
)


def device_peaks(kind: str, tflops: float | None, bandwidth: float | None) -> tuple[float | None, float | None]:
    """(FLOP/s, bytes/s) of the device: the flags if given, else `DEVICE_PEAKS`, else None."""
    for name, table_tflops, table_bandwidth in DEVICE_PEAKS:
        if name.lower() in kind.lower():
            tflops = table_tflops if tflops is None else tflops
            bandwidth = table_bandwidth if bandwidth is None else bandwidth
            break
    return (None if tflops is None else tflops * 1e12), (None if bandwidth is None else bandwidth * 1e12)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The suite's work sizes (`--smoke` shrinks every one)."""

    models: tuple[str, ...]
    decode_batch: int
    decode_prompt: int
    decode_new: int
    prefill_batch: int
    prefill_len: int
    step_rows: int
    step_prompt: int
    step_new: int
    reps: int
    plan_groups: tuple[str, ...] = ("rollout", "scoring", "update")


FULL = Shapes(models=("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B"), decode_batch=32, decode_prompt=128, decode_new=256,
              prefill_batch=8, prefill_len=2048, step_rows=32, step_prompt=256, step_new=256, reps=3)
SMOKE = Shapes(models=("tiny-a", "tiny-a"), decode_batch=2, decode_prompt=8, decode_new=4,
               prefill_batch=2, prefill_len=16, step_rows=2, step_prompt=256, step_new=4, reps=1,
               plan_groups=("rollout",))  # the plan's compiles dominate a CPU smoke run


def model_config(name: str, *, param_dtype: Any = jnp.bfloat16, dtype: Any = jnp.bfloat16):
    """A published Qwen3 architecture (or a tiny one for `--smoke`) as a `QwenConfig`."""
    from effopd_jax import published_configs
    from effopd_jax.models.qwen import QwenConfig
    from effopd_jax.testing import tiny_qwen3_config

    if name.startswith("tiny"):
        hidden = 32 if name == "tiny-a" else 48
        config = tiny_qwen3_config(hidden_size=hidden, num_layers=2, intermediate_size=2 * hidden)
        return dataclasses.replace(config, param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype))
    return QwenConfig.from_hf(published_configs.hf_config(name), param_dtype=param_dtype, dtype=dtype)


def matmul_weights(config) -> int:
    """Weights in a matmul per token: q/k/v/o, gate/up/down of every layer, and the lm-head."""
    attn = config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attn + mlp) + config.hidden_size * config.vocab_size


def forward_flops(config, batch: int, seq: int, *, lm_head_tokens: int) -> float:
    """Model FLOPs of a forward over `[batch, seq]` (causal attention: half the square), with the
    lm-head applied to `lm_head_tokens` tokens."""
    body = matmul_weights(config) - config.hidden_size * config.vocab_size
    attention = 2 * batch * config.num_attention_heads * seq * seq * config.head_dim * config.num_hidden_layers
    return 2.0 * body * batch * seq + attention + 2.0 * config.hidden_size * config.vocab_size * lm_head_tokens


def best_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of `reps` blocking calls of `fn` (after one warm-up call)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Decode and prefill of one model
# ---------------------------------------------------------------------------------------------
def model_figures(name: str, shapes: Shapes, peak_flops: float | None, peak_bandwidth: float | None) -> dict:
    from effopd_jax import models, sampling

    config = model_config(name)
    params = models.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)

    # Decode.
    batch, prompt, new = shapes.decode_batch, shapes.decode_prompt, shapes.decode_new
    ids = rng.integers(1, config.vocab_size, (batch, prompt)).astype(np.int32)
    mask = np.ones((batch, prompt), bool)

    def generate(new_tokens: int) -> Callable[[], Any]:
        return lambda: sampling.generate_padded(config, params, ids, mask, jax.random.key(1),
                                                max_new_tokens=new_tokens, temperature=1.0).tokens

    log(f"{name}: decode {batch} x ({prompt} + {new})")
    call = best_seconds(generate(new), shapes.reps)
    first = best_seconds(generate(1), shapes.reps)
    step = max(call - first, 1e-9) / (new - 1)
    kv_bytes = 2 * 2 * config.num_hidden_layers * batch * (prompt + new) * config.num_key_value_heads * config.head_dim
    step_bytes = 2 * matmul_weights(config) + kv_bytes

    # Prefill (hidden states: the lm-head is applied to one token per row in a rollout).
    pbatch, plen = shapes.prefill_batch, shapes.prefill_len
    pids = jnp.asarray(rng.integers(1, config.vocab_size, (pbatch, plen)).astype(np.int32))
    prefill = jax.jit(lambda p, x: models.forward(config, p, x, return_hidden_states=True))
    log(f"{name}: prefill {pbatch} x {plen}")
    prefill_seconds = best_seconds(lambda: prefill(params, pids), shapes.reps)
    prefill_flops = forward_flops(config, pbatch, plen, lm_head_tokens=0)
    return {
        "decode_tokens_per_s": batch * new / call,
        "decode_step_ms": 1e3 * step,
        "decode_step_mb": step_bytes / 1e6,
        "decode_bandwidth_fraction": None if peak_bandwidth is None else step_bytes / step / peak_bandwidth,
        "prefill_tokens_per_s": pbatch * plen / prefill_seconds,
        "prefill_mfu": None if peak_flops is None else prefill_flops / prefill_seconds / peak_flops,
    }


# ---------------------------------------------------------------------------------------------
# One full OPD step and the memory plan
# ---------------------------------------------------------------------------------------------
def opd_step_figures(shapes: Shapes, workdir: str, peak_flops: float | None) -> dict:
    from effopd_jax import plan as plan_lib
    from effopd_jax import train
    from effopd_jax.config import default_config
    from effopd_jax.testing import write_random_checkpoint

    student_name, teacher_name = shapes.models
    # Written in bf16 (half the bytes); the trainer holds the student's master weights in fp32.
    student_path = write_random_checkpoint(os.path.join(workdir, "student"), model_config(student_name), seed=1,
                                           tokenizer_dir=QWEN3_TOKENIZER_DIR)
    teacher_path = write_random_checkpoint(os.path.join(workdir, "teacher"), model_config(teacher_name), seed=2,
                                           tokenizer_dir=QWEN3_TOKENIZER_DIR)
    c = default_config()
    c.seed = 0
    c.total_steps = 1000
    c.checkpoint_every = 1000
    c.eval_every = 0
    c.export_hf = False
    c.student.update(path=student_path, param_dtype="float32", compute_dtype="bfloat16", scan_layers=True,
                     remat="full")
    c.teachers[0].update(path=teacher_path, param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True)
    c.data.update(train_files=(GSM8K_FILE,), prompts_per_step=shapes.step_rows, max_prompt_length=shapes.step_prompt)
    c.rollout.update(max_new_tokens=shapes.step_new, temperature=1.0, samples_per_prompt=1,
                     weight_dtype="bfloat16")
    c.mesh.update(data=-1, fsdp=1, tensor=1)

    log(f"memory plan ({', '.join(shapes.plan_groups)} programs)")
    planned = plan_lib.make_plan(c, plan_lib.local_target(jax.devices()[:1]), devices=jax.devices()[:1],
                                 log=lambda line: log(line), groups=shapes.plan_groups)
    log("OPD step: building the trainer")
    trainer = train.Trainer(c, os.path.join(workdir, "run"), devices=jax.devices()[:1], log=lambda *a, **k: None)
    records = []
    for index in range(1 + shapes.reps):  # the first step compiles
        record = trainer.train_one_step()
        log(f"OPD step {index}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.endswith("_seconds")))
        if index:
            records.append(record)
    stats = jax.devices()[0].memory_stats() or {}
    trainer.close()

    student = model_config(student_name)
    rows, length = shapes.step_rows, shapes.step_prompt + shapes.step_new
    update_flops = 3 * forward_flops(student, rows, length, lm_head_tokens=rows * shapes.step_new)
    seconds = {k: float(np.median([r[k] for r in records])) for k in records[0] if k.endswith("_seconds")}
    return {
        "seconds": seconds,
        "update_mfu": None if peak_flops is None else update_flops / seconds["update_seconds"] / peak_flops,
        "update_tokens_per_s": rows * length / seconds["update_seconds"],
        "plan_peak_bytes": planned.programs[planned.largest].peak_bytes,
        "plan_largest": planned.largest,
        "measured_peak_bytes": stats.get("peak_bytes_in_use"),
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check that the suite runs (CPU is fine)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: DEVICE_PEAKS)")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="memory bandwidth in TB/s")
    parser.add_argument("--skip-step", action="store_true", help="leave out the OPD step and the memory plan")
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    device = jax.devices()[0]
    peak_flops, peak_bandwidth = device_peaks(device.device_kind, args.peak_tflops, args.peak_bandwidth)
    started = time.perf_counter()
    log(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; peaks: "
        f"{'n/a' if peak_flops is None else f'{peak_flops / 1e12:.0f} TFLOP/s'} bf16, "
        f"{'n/a' if peak_bandwidth is None else f'{peak_bandwidth / 1e12:.2f} TB/s'}")

    step = None
    if not args.skip_step:
        with tempfile.TemporaryDirectory(prefix="effopd_gpu_suite_") as workdir:
            step = opd_step_figures(shapes, workdir, peak_flops)
    names = tuple(dict.fromkeys(shapes.models))  # smoke: student and teacher share one shape
    figures = {name: model_figures(name, shapes, peak_flops, peak_bandwidth) for name in names}

    print(f"\n== gpu_suite: {device.device_kind}, bf16 random models{' (SMOKE shapes)' if args.smoke else ''}; "
          f"{time.perf_counter() - started:.0f} s ==")
    print(f"decode: batch {shapes.decode_batch}, prompt {shapes.decode_prompt}, {shapes.decode_new} new, T=1 | "
          f"prefill: {shapes.prefill_batch} x {shapes.prefill_len} | OPD step: {shapes.step_rows} rows x "
          f"({shapes.step_prompt} + {shapes.step_new}), student {shapes.models[0]} / teacher {shapes.models[1]}")
    rows = [("decode tokens/s", lambda f: f"{f['decode_tokens_per_s']:.0f}"),
            ("decode step ms", lambda f: f"{f['decode_step_ms']:.2f}"),
            ("decode bytes/step MB", lambda f: f"{f['decode_step_mb']:.0f}"),
            ("decode % mem bandwidth", lambda f: _percent(f["decode_bandwidth_fraction"])),
            ("prefill tokens/s", lambda f: f"{f['prefill_tokens_per_s']:.0f}"),
            ("prefill MFU", lambda f: _percent(f["prefill_mfu"]))]
    print(f"{'':<30}" + "".join(f"{name:>20}" for name in names))
    for label, cell in rows:
        print(f"{label:<30}" + "".join(f"{cell(figures[name]):>20}" for name in names))
    if step is not None:
        print(f"{'update MFU (OPD step)':<30}{_percent(step['update_mfu']):>20}{'(student)':>20}")
        print(f"{'update tokens/s':<30}{step['update_tokens_per_s']:>20.0f}")
        for key, value in step["seconds"].items():
            print(f"{'OPD step ' + key:<30}{value:>20.3f}")
        measured = step["measured_peak_bytes"]
        print(f"{'memory plan peak GB':<30}{step['plan_peak_bytes'] / 1e9:>20.2f}  (largest program: {step['plan_largest']})")
        print(f"{'measured peak_bytes_in_use GB':<30}{'n/a' if measured is None else f'{measured / 1e9:.2f}':>20}"
              + ("" if measured is None else f"  (plan / measured {step['plan_peak_bytes'] / measured:.2f})"))


if __name__ == "__main__":
    main()
