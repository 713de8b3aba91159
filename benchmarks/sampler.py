"""Rollout throughput: effopd_jax's sampler vs transformers `generate` (torch) vs Tunix's `Sampler`.

One random Qwen3 checkpoint (made by `transformers`, written with `save_pretrained`,
`_peers.write_tiny_qwen3_checkpoint`) is loaded into each implementation, all fp32:

  * ours:   `effopd_jax.models.load_hf` + `effopd_jax.sampling.generate` (prefill + jitted
            `lax.while_loop` decode over a static KV cache);
  * torch:  `transformers.AutoModelForCausalLM.generate` (sdpa attention, dynamic cache);
  * tunix:  `tunix.generate.sampler.Sampler` over Tunix's NNX `Qwen3`
            (`tunix.models.qwen3.params.create_model_from_safe_tensors`).

Timed work: `--batch` prompts of `--prompt-len` random token ids, `--new-tokens` new tokens each,
EOS disabled (every row runs to the end), ancestral sampling at temperature `--temperature`
(default 1.0, the OPD rollout setting) with no top-k / top-p; `--temperature 0` times greedy.
Throughput = batch * new_tokens / wall time of the whole call (prefill, decode, host transfer).

Before timing, a same-work check runs all three greedily for `--check-tokens` tokens and prints
how many generated tokens agree with transformers'.

Rollout weight dtypes (`--weight-dtypes`, default bfloat16): ours runs a second time with its
params cast once (`effopd_jax.rollout.cast_rollout_params`, what `config.rollout.weight_dtype`
does each step), compute and KV cache still fp32; printed as `ours[bf16]`, with its ratio to ours.

Decode bandwidth (ours): decode step time = (t(new_tokens) - t(1)) / (new_tokens - 1), i.e. the
call minus its prefill, per token. A decode step reads every matmul weight once
(`_peers.matmul_params` * bytes per weight) and the whole static KV cache
(2 * layers * batch * (prompt + new) * kv_heads * head_dim * 4 bytes); bytes / step time is put
next to the machine's read bandwidth (`measure_read_bandwidth`, a jitted sum: the ceiling of a
step that reads) and its copy bandwidth (`_peers.measure_copy_bandwidth`, read + write).
Goals printed next to the figures: >= 4x transformers, >= 1.5x Tunix, >= 60% of read bandwidth.

Timing: one compile/warm-up call per implementation, then `--reps` rounds in which each runs once
in turn (round robin, so load bursts from other processes hit all alike); medians reported with
the minimum next to them.

Run (see benchmarks/README.md for the environment):
  .venv-bench/bin/python benchmarks/sampler.py [--batch 8 --prompt-len 64 --new-tokens 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402


@dataclasses.dataclass
class Contender:
    """One implementation: `generate(new_tokens, temperature, seed) -> tokens [batch, new]`
    (numpy, blocking)."""

    name: str
    generate: Callable[[int, float, int], np.ndarray]
    weight_itemsize: int = 4  # bytes per weight as the decode step reads them


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------
def ours_contender(path: str, prompts: list[list[int]], weight_dtype: str = "") -> Contender:
    """Ours; with `weight_dtype` the params are cast first (`rollout.cast_rollout_params`, what
    `config.rollout.weight_dtype` does once per step), compute and cache stay fp32."""
    from effopd_jax import models, rollout, sampling

    config, params = models.load_hf(path, param_dtype=jnp.float32, compute_dtype=jnp.float32)
    params = rollout.cast_rollout_params(params, weight_dtype)

    def generate(new_tokens: int, temperature: float, seed: int) -> np.ndarray:
        out = sampling.generate(
            config, params, prompts, max_new_tokens=new_tokens, temperature=temperature, seed=seed,
            eos_token_ids=(), cache_dtype=jnp.float32)
        return out.tokens  # host numpy: the call has blocked on the result

    return Contender(f"ours[{_short(weight_dtype)}]" if weight_dtype else "ours", generate,
                     jnp.dtype(weight_dtype or jnp.float32).itemsize)


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def torch_contender(path: str, prompts: list[list[int]]) -> Contender:
    import torch

    model = _peers.load_torch_qwen3(path)
    input_ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed
    attention_mask = torch.ones_like(input_ids)

    def generate(new_tokens: int, temperature: float, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        sampling_kwargs = (dict(do_sample=False) if temperature == 0.0
                           else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0))
        with torch.no_grad():
            out = model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **sampling_kwargs)
        return out[:, input_ids.shape[1]:].numpy()

    return Contender("transformers", generate)


class _IdTokenizer:
    """The tokenizer interface Tunix's `Sampler` needs (encode/decode/bos_id/eos_id/pad_id) over
    space-separated token ids, so it samples from exactly our prompt ids. No BOS is added
    (`bos_id()` is falsy); EOS is an id outside the vocabulary, so no row ever stops early."""

    def __init__(self, vocab_size: int):
        self._eos = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return 0


def tunix_contender(path: str, prompts: list[list[int]], hf_config: dict, new_tokens: int) -> Contender:
    from tunix.generate import sampler as tunix_sampler

    model = _peers.load_tunix_qwen3(path, dtype=jnp.float32)
    prompt_len = len(prompts[0])
    vocab = int(hf_config["vocab_size"])
    cache_config = tunix_sampler.CacheConfig(
        cache_size=prompt_len + new_tokens,
        num_layers=int(hf_config["num_hidden_layers"]),
        num_kv_heads=int(hf_config["num_key_value_heads"]),
        head_dim=int(hf_config["head_dim"]),
    )
    sampler = tunix_sampler.Sampler(model, _IdTokenizer(vocab), cache_config)
    texts = [" ".join(map(str, p)) for p in prompts]

    def generate(steps: int, temperature: float, seed: int) -> np.ndarray:
        kwargs = dict(temperature=0.0) if temperature == 0.0 else dict(temperature=temperature, top_p=1.0)
        out = sampler(texts, max_generation_steps=steps, max_prompt_length=prompt_len,
                      eos_tokens=[vocab], seed=seed, **kwargs)
        return np.stack([np.asarray(t)[:steps] for t in out.tokens])

    return Contender("tunix", generate)


def measure_read_bandwidth(num_bytes: int = 256 * 2 ** 20, reps: int = 5) -> float:
    """Best achieved bytes/s of a jitted fp32 `sum(x)` over a `num_bytes` array (one read, no
    write): the ceiling of a step that mostly reads weights. `_peers.measure_copy_bandwidth`
    counts a read plus a write per byte, so a read-mostly step can exceed it."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return num_bytes / min(_peers.time_calls(lambda: total(x).block_until_ready(), reps))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check-tokens", type=int, default=16, help="greedy tokens of the same-work check")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--weight-dtypes", default="bfloat16",
                        help="comma list of rollout weight dtypes (config.rollout.weight_dtype) to time ours "
                             "with as well, next to fp32; '' for none")
    parser.add_argument("--skip", default="", help="comma list of 'tunix', 'torch' to leave out")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads; 0 = all cores (os.cpu_count())")
    args = parser.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "reps", "check_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (the decode step time needs a decode step)")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    skip = _peers.parse_skip(args.skip)
    _peers.set_up_and_print_environment(skip, torch_threads=args.torch_threads)

    spec = _peers.TinyQwen3Spec(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate_size=args.intermediate, vocab_size=args.vocab)
    # Ids from 1: Tunix treats id 0 (its pad id) in a prompt as padding.
    prompts = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt_len)).tolist()
    new = args.new_tokens
    with tempfile.TemporaryDirectory(prefix="effopd_sampler_") as path:
        hf_config = _peers.write_tiny_qwen3_checkpoint(path, spec, seed=0)
        weight_dtypes = [d for d in args.weight_dtypes.split(",") if d]
        contenders = [ours_contender(path, prompts)] + [ours_contender(path, prompts, d) for d in weight_dtypes]
        if "torch" not in skip:
            contenders.append(torch_contender(path, prompts))
        if "tunix" not in skip:
            contenders.append(tunix_contender(path, prompts, hf_config, new))
    mode = "greedy" if args.temperature == 0 else f"sampling T={args.temperature}, no top-k/top-p"
    print(f"config: {dataclasses.asdict(spec)}")
    print(f"batch {args.batch}, prompt {args.prompt_len}, {new} new tokens, EOS disabled, {mode}, fp32; "
          f"matmul weights {_peers.matmul_params(hf_config) / 1e6:.2f} M")

    # Same work: greedy tokens against transformers'.
    check = {c.name: c.generate(args.check_tokens, 0.0, 0) for c in contenders}
    if "transformers" in check:
        print(f"\n== same work: greedy, {args.check_tokens} tokens x {args.batch} rows, "
              "fraction equal to transformers' ==")
        for name, tokens in check.items():
            if name != "transformers":
                print(f"{name:<14} {np.mean(tokens == check['transformers']):.3f}")

    # Compile / warm-up calls (ours also compiles its 1-token call for the prefill estimate).
    print("\n== first call (compile for JAX) seconds ==")
    for c in contenders:
        start = time.perf_counter()
        tokens = c.generate(new, args.temperature, 0)
        print(f"{c.name:<14} {time.perf_counter() - start:7.2f}")
        if tokens.shape != (args.batch, new):
            raise RuntimeError(f"{c.name} returned tokens of shape {tokens.shape}, expected {(args.batch, new)}")
    ours_variants = [c for c in contenders if c.name.startswith("ours")]
    for c in ours_variants:  # compile the 1-token call (the prefill estimate)
        c.generate(1, args.temperature, 0)

    bandwidth = _peers.measure_copy_bandwidth()
    read_bandwidth = measure_read_bandwidth()

    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    prefill_times: dict[str, list[float]] = {c.name: [] for c in ours_variants}
    for rep in range(args.reps):
        for c in contenders:
            times[c.name] += _peers.time_calls(lambda: c.generate(new, args.temperature, rep + 1), 1)
        for c in ours_variants:
            prefill_times[c.name] += _peers.time_calls(lambda: c.generate(1, args.temperature, rep + 1), 1)

    tokens_per_call = args.batch * new
    medians = {name: _peers.median(t) for name, t in times.items()}
    print(f"\n== throughput over {args.reps} round-robin reps (median [min] seconds per call; "
          f"{tokens_per_call} new tokens per call) ==")
    print(f"{'impl':<14} {'seconds':>17} {'tokens/s':>10}")
    for name, t in times.items():
        print(f"{name:<14} {medians[name]:8.3f} [{min(t):6.3f}] {tokens_per_call / medians[name]:10.1f}")

    print("\n== ratios (ours tokens/s / peer tokens/s; > 1 means ours is faster; goals: >= 4x transformers, "
          ">= 1.5x tunix) ==")
    goals = {"transformers": 4.0, "tunix": 1.5}
    for mine in ours_variants:
        for name in medians:
            if not name.startswith("ours"):
                ratio = medians[name] / medians[mine.name]
                verdict = f"  (goal {goals[name]:.1f}x: {'met' if ratio >= goals[name] else 'not met'})"
                print(f"{mine.name} / {name:<12}: {ratio:6.2f}x{verdict}")
    if len(ours_variants) > 1:
        for mine in ours_variants[1:]:
            print(f"{mine.name} / ours (fp32 weights): {medians['ours'] / medians[mine.name]:6.2f}x "
                  "(> 1: the cast weights pay on this machine)")

    cache_bytes = 4 * 2 * args.layers * args.batch * (args.prompt_len + new) * args.kv_heads * args.head_dim
    print("\n== ours: decode step memory traffic (goal: >= 60% of the read bandwidth) ==")
    print(f"machine: copy bandwidth {bandwidth / 1e9:.2f} GB/s (read+write counted), read bandwidth "
          f"{read_bandwidth / 1e9:.2f} GB/s (jitted sum over 256 MiB)")
    print("decode step = (t(call) - t(1-token call)) / (new_tokens - 1); bytes/step = every matmul weight once "
          "(in the weight dtype) + the whole static fp32 KV cache")
    print(f"{'impl':<14} {'1-token call ms':>15} {'step ms':>8} {'weights MB':>10} {'KV MB':>6} "
          f"{'GB/s':>6} {'% read bw':>9} {'% copy bw':>9}")
    for c in ours_variants:
        prefill = _peers.median(prefill_times[c.name])
        step = (medians[c.name] - prefill) / (new - 1)
        weight_bytes = c.weight_itemsize * _peers.matmul_params(hf_config)
        achieved = (weight_bytes + cache_bytes) / step
        print(f"{c.name:<14} {prefill * 1e3:15.1f} {step * 1e3:8.2f} {weight_bytes / 1e6:10.1f} "
              f"{cache_bytes / 1e6:6.1f} {achieved / 1e9:6.2f} {100 * achieved / read_bandwidth:8.0f}% "
              f"{100 * achieved / bandwidth:8.0f}%")
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
