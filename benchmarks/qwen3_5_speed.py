"""Qwen3.5 hybrid speed: effopd_jax's `qwen3_5` family vs transformers (torch), side by side.

One random `Qwen3_5ForCausalLM` checkpoint (made by `transformers`, written with
`save_pretrained`) is loaded by both, fp32 on CPU:

  * ours:  `effopd_jax.models.load_hf` + `models.forward` under `jax.jit` (chunked gated delta
           rule for forward / forward+backward / prefill; the recurrent step for decode);
  * torch: `transformers.AutoModelForCausalLM` (sdpa attention; without the optional
           `flash-linear-attention` / `causal-conv1d` kernels transformers runs its reference
           torch implementation of the delta rule and the conv, as it warns), threads = cores.

Timed work:
  forward          logits `[batch, seq, vocab]` of random tokens (torch under `no_grad`);
  forward+backward next-token cross-entropy and its gradient w.r.t. every parameter;
  decode           greedy generation of new tokens after a short prompt, with each side's cache
                   (ours: `sampling.generate_padded`; torch: `model.generate(do_sample=False)`).
                   Decode tokens/s = batch * (N2 - N1) / (t(N2) - t(N1)) from two generation
                   lengths, so prefill and fixed overheads cancel.

Before timing, the script checks the two do the same work: max |logits| difference and the
greedy tokens. Timing: a compile / warm-up call each, then `--reps` rounds in which every
contender runs once in turn (round robin, so bursts of load from other processes hit both
alike); medians are reported with the minimum next to them, and the ratio ours / torch of
tokens/s (> 1: ours is faster).

Run (the project's .venv has transformers >= 5.2 with Qwen3.5; see benchmarks/README.md):
  .venv/bin/python -u benchmarks/qwen3_5_speed.py [--batch 4 --seq 256 --reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="default pattern: 3 linear, 1 full")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--linear-key-heads", type=int, default=4)
    parser.add_argument("--linear-value-heads", type=int, default=8)
    parser.add_argument("--linear-head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16, help="decode: prompt tokens")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(16, 48),
                        help="decode: the two generation lengths N1 N2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: one per core")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def write_checkpoint(path: str, args: argparse.Namespace) -> None:
    """A random Qwen3_5ForCausalLM with O(1) logits (embeddings 0.3, Linear 1/sqrt(fan_in),
    zero-centred norms 0.2, A_log = log U(0.1, 4), dt_bias 0.5, conv taps 1/sqrt(width))."""
    import torch
    import transformers

    config = transformers.Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        linear_num_key_heads=args.linear_key_heads, linear_num_value_heads=args.linear_value_heads,
        linear_key_head_dim=args.linear_head_dim, linear_value_head_dim=args.linear_head_dim,
        tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = transformers.Qwen3_5ForCausalLM(config).float()
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            randn = torch.randn(param.shape, generator=generator)
            if "embed_tokens" in name:
                value = 0.3 * randn
            elif name.endswith("A_log"):
                value = torch.log(torch.empty(param.shape).uniform_(0.1, 4.0, generator=generator))
            elif name.endswith("dt_bias"):
                value = 0.5 * randn
            elif "linear_attn.norm" in name:
                value = 1.0 + 0.2 * randn
            elif "norm" in name:
                value = 0.2 * randn
            elif "conv1d" in name:
                value = randn / np.sqrt(param.shape[-1])
            else:
                value = randn / np.sqrt(param.shape[1])
            param.copy_(value)
    model.save_pretrained(path)


def next_token_xent(logits, tokens):
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import torch
    import transformers

    from effopd_jax import models, sampling

    threads = args.torch_threads or os.cpu_count()
    torch.set_num_threads(threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"torch {torch.__version__} ({threads} threads), transformers {transformers.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(path, args)
        config, params = models.load_hf(path, param_dtype="float32", compute_dtype="float32")
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa").eval()
    print(f"config: hidden {config.hidden_size}, {config.num_hidden_layers} layers "
          f"({config.layer_types.count('linear_attention')} linear, "
          f"{config.layer_types.count('full_attention')} full), heads {config.num_attention_heads}/"
          f"{config.num_key_value_heads} x {config.head_dim}, linear heads "
          f"{config.linear_num_key_heads}/{config.linear_num_value_heads} x {config.linear_key_head_dim}, "
          f"intermediate {config.intermediate_size}, vocab {config.vocab_size}; "
          f"batch {args.batch} x seq {args.seq}, fp32")

    rng = np.random.RandomState(args.seed)
    tokens_np = rng.randint(0, args.vocab, (args.batch, args.seq))
    tokens = jnp.asarray(tokens_np)
    tokens_t = torch.as_tensor(tokens_np)

    # -- the work ---------------------------------------------------------------------------
    forward_jit = jax.jit(lambda p, x: models.forward(config, p, x))
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p, x: next_token_xent(models.forward(config, p, x), x)))

    def ours_forward():
        return jax.block_until_ready(forward_jit(params, tokens))

    def ours_forward_backward():
        return jax.block_until_ready(loss_and_grad(params, tokens))

    def torch_forward():
        with torch.no_grad():
            return torch_model(input_ids=tokens_t).logits

    def torch_forward_backward():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(input_ids=tokens_t).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, args.vocab), tokens_t[:, 1:].reshape(-1))
        loss.backward()
        return loss

    prompt_np = rng.randint(0, args.vocab, (args.batch, args.prompt))
    prompt_mask = np.ones_like(prompt_np, bool)

    def ours_generate(new: int):
        return lambda: jax.block_until_ready(sampling.generate_padded(
            config, params, prompt_np, prompt_mask, jax.random.key(0), max_new_tokens=new,
            temperature=0.0).tokens)

    def torch_generate(new: int):
        def run():
            with torch.no_grad():
                return torch_model.generate(
                    torch.as_tensor(prompt_np), attention_mask=torch.ones_like(torch.as_tensor(prompt_np)),
                    do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                    pad_token_id=0)
        return run

    # -- same work ----------------------------------------------------------------------------
    start = time.perf_counter()
    ours_logits = np.asarray(ours_forward())
    print(f"compile ours forward {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    ours_forward_backward()
    print(f"compile ours forward+backward {time.perf_counter() - start:.1f} s")
    torch_logits = torch_forward().numpy()
    print(f"same work: max |logits| difference {np.abs(ours_logits - torch_logits).max():.2e} "
          f"(logits std {torch_logits.std():.2f})")
    n1, n2 = args.new_tokens
    for new in (n1, n2):
        start = time.perf_counter()
        ours_tokens = np.asarray(ours_generate(new)())
        print(f"compile ours generate({new}) {time.perf_counter() - start:.1f} s")
    torch_tokens = torch_generate(n2)()[:, args.prompt:].numpy()
    print(f"same work: greedy tokens equal: {np.array_equal(ours_tokens, torch_tokens)} "
          f"({(ours_tokens == torch_tokens).mean():.3f} of {ours_tokens.size})")
    torch_forward_backward()  # warm-up

    # -- timing, round robin ------------------------------------------------------------------
    work = {
        ("forward", "ours"): ours_forward, ("forward", "torch"): torch_forward,
        ("forward+backward", "ours"): ours_forward_backward,
        ("forward+backward", "torch"): torch_forward_backward,
        (f"generate {n1}", "ours"): ours_generate(n1), (f"generate {n1}", "torch"): torch_generate(n1),
        (f"generate {n2}", "ours"): ours_generate(n2), (f"generate {n2}", "torch"): torch_generate(n2),
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in work}
    for rep in range(args.reps):
        for key, fn in work.items():
            times[key].append(timed(fn))
            print(f"  {key[0]} {key[1]}: {times[key][-1] * 1e3:.1f} ms", flush=True)
        print(f"round {rep + 1}/{args.reps} done (load average {os.getloadavg()[0]:.1f})")
        # The table so far after every round: a run stopped early still reports what it measured.
        print_table(args, times, n1, n2)


def print_table(args: argparse.Namespace, times: dict[tuple[str, str], list[float]], n1: int, n2: int) -> None:
    """Tokens/s of each contender (median; best over the rounds) and the ratio ours / torch."""
    med = {key: statistics.median(v) for key, v in times.items()}
    low = {key: min(v) for key, v in times.items()}
    tokens_per_call = args.batch * args.seq
    print()
    print("| work | ours tokens/s (median; best) | torch tokens/s (median; best) | ours / torch |")
    print("|---|---|---|---|")
    for what in ("forward", "forward+backward"):
        ours, theirs = tokens_per_call / med[(what, "ours")], tokens_per_call / med[(what, "torch")]
        print(f"| {what} ({args.batch} x {args.seq}) | {ours:,.0f}; {tokens_per_call / low[(what, 'ours')]:,.0f} "
              f"| {theirs:,.0f}; {tokens_per_call / low[(what, 'torch')]:,.0f} | {ours / theirs:.2f} |")
    new_tokens = args.batch * (n2 - n1)
    rates = {}
    for who in ("ours", "torch"):
        median_gap = med[(f"generate {n2}", who)] - med[(f"generate {n1}", who)]
        best_gap = low[(f"generate {n2}", who)] - low[(f"generate {n1}", who)]
        rates[who] = (new_tokens / median_gap, new_tokens / best_gap)
    print(f"| decode (batch {args.batch}, tokens {n1}->{n2} after a {args.prompt}-token prompt) "
          f"| {rates['ours'][0]:,.0f}; {rates['ours'][1]:,.0f} | {rates['torch'][0]:,.0f}; "
          f"{rates['torch'][1]:,.0f} | {rates['ours'][0] / rates['torch'][0]:.2f} |")
    print()
    for key, values in times.items():
        print(f"{key[0]:>18} {key[1]:>5}: median {med[key] * 1e3:9.1f} ms, best {low[key] * 1e3:9.1f} ms", flush=True)

if __name__ == "__main__":
    main()
