"""Forward and forward+backward time: effopd_jax's Qwen vs Tunix's Qwen3 vs transformers (torch).

One random Qwen3 checkpoint (made by `transformers`, written with `save_pretrained`) is loaded
into each implementation, all in fp32:

  * ours:   `effopd_jax.models.load_hf` + `models.forward`, under `jax.jit`
            (with `--ours-variants`, unrolled layers and/or `scan_layers=True`);
  * tunix:  `tunix.models.qwen3.params.create_model_from_safe_tensors`, the NNX module split
            into (graphdef, params) and merged inside `jax.jit`;
  * torch:  `transformers.AutoModelForCausalLM` (sdpa attention), `torch.set_num_threads` = cores.

Timed work, on the same `[batch, seq]` random tokens:
  forward          logits `[batch, seq, vocab]` (fp32); torch under `torch.no_grad()`;
  forward+backward the loss `mean_t -log softmax(logits[:, t])[tokens[:, t + 1]]` (next-token
                   cross-entropy) and its gradient with respect to every parameter.

Before timing, the script checks that the implementations do the same work: max |logits| diff,
the loss values, and max |d loss / d embedding| diff against torch.

Timing: compile (the first call, reported) and one more warm-up call, then `--reps` rounds in
which every implementation runs once in turn (round robin, so a burst of load from other
processes hits all of them alike). Medians are reported, with the minimum next to them.

Achieved FLOP/s counts matmul FLOPs only (`_peers.qwen_forward_flops`: 2 * matmul weights *
tokens + 4 * layers * batch * heads * seq^2 * head_dim for the full attention square);
forward+backward counts 3x the forward. The machine's ceiling is the best FLOP/s of a jitted
fp32 `[n, n] @ [n, n]` (`_peers.measure_matmul_flops`, also in torch).

Run (see benchmarks/README.md for the environment):
  .venv-bench/bin/python benchmarks/forward_backward.py [--batch 8 --seq 256 --reps 5]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The loss every implementation differentiates
# ---------------------------------------------------------------------------------------------
def next_token_xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy.

    loss = mean_{b, t < seq-1} -log softmax(logits[b, t])[tokens[b, t + 1]].

    Args:
      logits: [batch, seq, vocab] float32.
      tokens: [batch, seq] int32.
    Returns:
      scalar float32.
    """
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(target_log_probs)


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Contender:
    """One implementation, ready to time.

    `forward()` and `forward_backward()` run one step and block until the result is ready.
    `logits` [batch, seq, vocab], `loss` and `embed_grad` [vocab, hidden] come from the warm-up
    calls and feed the same-work check.
    """

    name: str
    forward: Callable[[], Any]
    forward_backward: Callable[[], Any]
    logits: np.ndarray
    loss: float
    embed_grad: np.ndarray
    compile_s: dict[str, float]


def jax_contender(
    name: str,
    apply_logits: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    tokens: jax.Array,
    embed_grad_of: Callable[[Any], jax.Array],
) -> Contender:
    """Jits `apply_logits(params, tokens) -> [batch, seq, vocab]` and the loss' value_and_grad."""
    forward = jax.jit(apply_logits)

    def loss_fn(p, t):
        return next_token_xent(apply_logits(p, t), t)

    forward_backward = jax.jit(jax.value_and_grad(loss_fn))

    start = time.perf_counter()
    logits = jax.block_until_ready(forward(params, tokens))
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    loss, grads = jax.block_until_ready(forward_backward(params, tokens))
    compile_fwd_bwd = time.perf_counter() - start
    # One more untimed call each, so allocator and thread-pool warm-up is not in the first rep.
    jax.block_until_ready(forward(params, tokens))
    jax.block_until_ready(forward_backward(params, tokens))
    return Contender(
        name=name,
        forward=lambda: jax.block_until_ready(forward(params, tokens)),
        forward_backward=lambda: jax.block_until_ready(forward_backward(params, tokens)),
        logits=np.asarray(logits),
        loss=float(loss),
        embed_grad=np.asarray(embed_grad_of(grads)),
        compile_s={"fwd": compile_fwd, "fwd+bwd": compile_fwd_bwd},
    )


def ours_contender(path: str, tokens: jax.Array, scan_layers: bool) -> Contender:
    """effopd_jax's Qwen in fp32 (parameters and compute), no remat."""
    from effopd_jax import models

    config, params = models.load_hf(path, param_dtype=jnp.float32, scan_layers=scan_layers,
                                    compute_dtype=jnp.float32)
    if config.remat != "none":
        raise ValueError(f"expected no remat in the loaded config, got remat={config.remat!r}")
    def apply_logits(p, t):
        return models.forward(config, p, t)

    return jax_contender(
        f"ours ({'scan' if scan_layers else 'unrolled'})", apply_logits, params, tokens,
        lambda grads: grads["embed_tokens"]["embedding"])


def tunix_contender(path: str, tokens: jax.Array) -> Contender:
    """Tunix's NNX `Qwen3` in fp32, as (graphdef, params, rest) merged inside `jax.jit`
    (the functional pattern; `nnx.jit` would add per-call graph traversal in Python)."""
    from flax import nnx

    model = _peers.load_tunix_qwen3(path, dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch, seq = tokens.shape
    positions, attention_mask = _peers.tunix_causal_inputs(batch, seq)

    def apply_logits(p, t):
        logits, _ = nnx.merge(graphdef, p, rest)(t, positions, None, attention_mask)
        return logits

    return jax_contender(
        "tunix", apply_logits, params, tokens,
        lambda grads: grads["embedder"]["input_embedding"][...])


def torch_contender(path: str, tokens_np: np.ndarray) -> Contender:
    """transformers' `Qwen3ForCausalLM` in fp32 on CPU (sdpa attention)."""
    import torch
    import torch.nn.functional as F

    model = _peers.load_torch_qwen3(path)
    tokens = torch.from_numpy(tokens_np.astype(np.int64))
    vocab = model.config.vocab_size

    def forward():
        with torch.no_grad():
            return model(input_ids=tokens).logits

    def forward_backward():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach()

    start = time.perf_counter()
    logits = forward()
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    loss = forward_backward()
    compile_fwd_bwd = time.perf_counter() - start
    forward()
    forward_backward()
    return Contender(
        name="torch",
        forward=forward,
        forward_backward=forward_backward,
        logits=logits.numpy(),
        loss=float(loss),
        embed_grad=model.model.embed_tokens.weight.grad.numpy().copy(),
        compile_s={"fwd": compile_fwd, "fwd+bwd": compile_fwd_bwd},
    )


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def print_same_work_check(contenders: Sequence[Contender], reference: Contender) -> None:
    print(f"\n== same work: max |diff| against {reference.name} "
          f"(max |logits| {np.max(np.abs(reference.logits)):.3f}, "
          f"max |d loss/d embed| {np.max(np.abs(reference.embed_grad)):.3e}) ==")
    print(f"{'impl':<16} {'logits':>10} {'loss':>10} {'loss diff':>10} {'d embed':>10}")
    for c in contenders:
        print(f"{c.name:<16} {_max_abs_diff(c.logits, reference.logits):10.2e} {c.loss:10.6f} "
              f"{abs(c.loss - reference.loss):10.2e} {_max_abs_diff(c.embed_grad, reference.embed_grad):10.2e}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--ours-variants", default="unrolled,scan",
                        help="comma list of 'unrolled' and 'scan' (scan_layers=True)")
    parser.add_argument("--skip", default="", help="comma list of 'tunix', 'torch' to leave out")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads; 0 = all cores (os.cpu_count())")
    parser.add_argument("--matmul-n", type=int, default=2048, help="size of the ceiling matmul")
    args = parser.parse_args(argv)
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    variants = [v for v in args.ours_variants.split(",") if v]
    for v in variants:
        if v not in ("unrolled", "scan"):
            raise ValueError(f"--ours-variants: unknown variant {v!r} (use 'unrolled', 'scan')")
    skip = _peers.parse_skip(args.skip)
    _peers.set_up_and_print_environment(skip, torch_threads=args.torch_threads)

    spec = _peers.TinyQwen3Spec(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate_size=args.intermediate, vocab_size=args.vocab,
        tie_word_embeddings=args.tie_word_embeddings)
    with tempfile.TemporaryDirectory(prefix="effopd_fwdbwd_") as path:
        hf_config = _peers.write_tiny_qwen3_checkpoint(path, spec, seed=0)
        tokens_np = np.random.default_rng(0).integers(
            0, args.vocab, (args.batch, args.seq), dtype=np.int64).astype(np.int32)
        tokens = jnp.asarray(tokens_np)
        fwd_flops = _peers.qwen_forward_flops(hf_config, args.batch, args.seq)
        print(f"config: {dataclasses.asdict(spec)}")
        print(f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens, fp32; "
              f"matmul weights {_peers.matmul_params(hf_config) / 1e6:.2f} M; "
              f"forward {fwd_flops / 1e9:.1f} GFLOP, forward+backward {3 * fwd_flops / 1e9:.1f} GFLOP")

        contenders: list[Contender] = []
        for v in variants:
            contenders.append(ours_contender(path, tokens, scan_layers=(v == "scan")))
        if "tunix" not in skip:
            contenders.append(tunix_contender(path, tokens))
        if "torch" not in skip:
            contenders.append(torch_contender(path, tokens_np))

    reference = contenders[-1]
    print_same_work_check(contenders, reference)

    print("\n== first call (compile for JAX) seconds ==")
    for c in contenders:
        print(f"{c.name:<16} fwd {c.compile_s['fwd']:7.2f}   fwd+bwd {c.compile_s['fwd+bwd']:7.2f}")

    ceilings = _peers.measure_matmul_flops(args.matmul_n, reps=5, with_torch="torch" not in skip)
    bandwidth = _peers.measure_copy_bandwidth()
    print(f"\n== machine: fp32 matmul {args.matmul_n}^3 best "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in ceilings.items())
          + f"; memory pass {bandwidth / 1e9:.1f} GB/s ==")

    times: dict[str, dict[str, list[float]]] = {c.name: {"fwd": [], "fwd+bwd": []} for c in contenders}
    for _ in range(args.reps):
        for c in contenders:
            times[c.name]["fwd"] += _peers.time_calls(c.forward, 1)
        for c in contenders:
            times[c.name]["fwd+bwd"] += _peers.time_calls(c.forward_backward, 1)

    peak = max(ceilings.values())
    print(f"\n== timings over {args.reps} round-robin reps (median [min] seconds; "
          f"FLOP/s from the median; % of the best machine matmul {peak / 1e9:.1f} GFLOP/s) ==")
    print(f"{'impl':<16} {'fwd s':>16} {'GFLOP/s':>8} {'%':>5}   {'fwd+bwd s':>16} {'GFLOP/s':>8} {'%':>5}")
    medians: dict[str, dict[str, float]] = {}
    for c in contenders:
        row = f"{c.name:<16}"
        medians[c.name] = {}
        for kind, flops in (("fwd", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
            med = _peers.median(times[c.name][kind])
            medians[c.name][kind] = med
            row += (f" {med:8.3f} [{min(times[c.name][kind]):5.3f}] {flops / med / 1e9:8.1f} "
                    f"{100 * flops / med / peak:5.1f}  ")
        print(row)

    print("\n== time ratios (median / median; < 1 means ours is faster) ==")
    peers = [c.name for c in contenders if not c.name.startswith("ours")]
    for c in contenders:
        if not c.name.startswith("ours"):
            continue
        for peer in peers:
            print(f"{c.name + ' / ' + peer:<26}: fwd {medians[c.name]['fwd'] / medians[peer]['fwd']:5.2f}   "
                  f"fwd+bwd {medians[c.name]['fwd+bwd'] / medians[peer]['fwd+bwd']:5.2f}")
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
