"""One MoE layer, forward and forward+backward: grouped dispatch vs every expert on every token.

The layer is the sparse block of `effopd_jax.models.moe` without the attention around it:

    logits = x @ W_router (float32); experts, weights = top-k(softmax(logits)) (renormalised);
    y = sum_j weights_j * SwiGLU_{experts_j}(x)

computed three ways on the same random inputs (float32):

  blocked     `moe.local_expert_ffn(impl="blocked")`: assignments sorted by expert, each expert's
              rows padded to a block, one SwiGLU per used block (the CPU default);
  ragged_dot  `moe.local_expert_ffn(impl="ragged_dot")`: `jax.lax.ragged_dot` (the GPU/TPU path;
              on CPU XLA lowers it to a dense masked product over all groups, whose buffers grow
              as T k E H: about 10 GB resident for forward+backward at T=1024, 64 experts, top-8,
              H=1024, the peak the last line prints); `--no-ragged-dot` leaves it out;
  dense       `moe.dense_expert_ffn_reference`: every expert on every token, weighted by the
              routing (the test oracle, and what a naive MoE computes).

Timed: forward (the layer's output), and forward+backward (the gradient of sum(y * r), r fixed
random, w.r.t. x, the router and every expert weight). Before timing, the outputs and the
gradients are checked against the dense computation.

FLOPs actually done (matmuls only; forward+backward = 3x forward):
  useful      6 H I T k            (each of the T k assignments: three [H, I] matmuls)
  dense       6 H I T E            (every expert on every token)
  blocked     6 H I R_blocks       R_blocks = sum_e ceil(n_e / B) B: the rows of the blocks the
                                   routing filled (n_e tokens of expert e, block B); empty blocks
                                   of the static bound are skipped by `lax.cond`
  ragged_dot  6 H I (T k) E        on CPU (every sorted row times every expert); 6 H I T k on a
                                   backend with a real grouped kernel
plus the router's 2 T H E for all of them.

Timing: compile and one warm-up call each, then `--reps` rounds in which every implementation runs
once in turn (round robin, so load from other processes hits all alike); medians (and minima).

Run: `.venv/bin/python benchmarks/moe_layer.py [--tokens 1024 --hidden 1024 --inter 256
--experts 64 --top-k 8 --reps 3] [--no-ragged-dot] [--blocks 16 64]`
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax.models import moe


def layer_fn(expert_impl: str, block: int | None, top_k: int):
    """(x, router, w_gate, w_up, w_down) -> y [T, H] float32 for one implementation."""

    def layer(x, router, w_gate, w_up, w_down):
        routing = moe.route(jnp.dot(x, router, precision=jax.lax.Precision.HIGHEST), top_k, True)
        if expert_impl == "dense":
            return moe.dense_expert_ffn_reference(x, routing.experts, routing.weights, w_gate, w_up,
                                                  w_down, jnp.float32)
        return moe.local_expert_ffn(x, routing.experts, routing.weights, w_gate, w_up, w_down,
                                    dtype=jnp.float32, impl=expert_impl, block=block)

    return layer


def blocked_rows(experts: np.ndarray, num_experts: int, block: int) -> int:
    counts = np.bincount(experts.ravel(), minlength=num_experts)
    return int(np.sum(-(-counts // block) * block))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=256, help="each expert's intermediate size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--blocks", type=int, nargs="*", default=[],
                        help="also time the blocked path with these block sizes")
    parser.add_argument("--no-ragged-dot", dest="ragged_dot", action="store_false",
                        help="leave out jax.lax.ragged_dot (on CPU a dense masked product over all "
                             "groups, memory ~ T k E H)")
    args = parser.parse_args()
    T, H, I, E, k = args.tokens, args.hidden, args.inter, args.experts, args.top_k

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"MoE layer: tokens T={T}, hidden H={H}, expert intermediate I={I}, experts E={E}, "
          f"top-k={k}, float32", flush=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((H, E)) / np.sqrt(H), jnp.float32)
    w_gate = jnp.asarray(rng.standard_normal((E, H, I)) / np.sqrt(H), jnp.float32)
    w_up = jnp.asarray(rng.standard_normal((E, H, I)) / np.sqrt(H), jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((E, I, H)) / np.sqrt(I), jnp.float32)
    r = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    inputs = (x, router, w_gate, w_up, w_down)

    routing = moe.route(x @ router, k, True)
    experts = np.asarray(routing.experts)
    counts = np.bincount(experts.ravel(), minlength=E)
    print(f"routing: tokens per expert min {counts.min()}, median {int(np.median(counts))}, "
          f"max {counts.max()} (mean {T * k / E:.0f})", flush=True)

    default_block = moe.default_block_rows(T * k, E)
    contenders = {"dense": ("dense", None), f"blocked (B={default_block}, default)": ("blocked", None)}
    for block in args.blocks:
        if block != default_block:
            contenders[f"blocked (B={block})"] = ("blocked", block)
    if args.ragged_dot:
        contenders["ragged_dot"] = ("ragged_dot", None)

    useful = 6 * H * I * T * k
    router_flops = 2 * T * H * E

    def flops_done(impl: str, block: int | None) -> int:
        if impl == "dense":
            return 6 * H * I * T * E + router_flops
        if impl == "ragged_dot":
            groups = E if jax.default_backend() == "cpu" else 1
            return 6 * H * I * T * k * groups + router_flops
        return 6 * H * I * blocked_rows(experts, E, block or default_block) + router_flops

    fns = {}
    for name, (impl, block) in contenders.items():
        layer = layer_fn(impl, block, k)
        forward = jax.jit(layer)
        backward = jax.jit(jax.grad(lambda *a, layer=layer: jnp.sum(layer(*a) * r), argnums=range(5)))
        fns[name] = (forward, backward)

    # Same work: outputs and gradients against the dense computation (also the warm-up).
    compile_seconds = {}
    reference = None
    for name, (forward, backward) in fns.items():
        start = time.perf_counter()
        out = jax.block_until_ready(forward(*inputs))
        grads = jax.block_until_ready(backward(*inputs))
        compile_seconds[name] = time.perf_counter() - start
        if reference is None:
            reference = (out, grads)
            continue
        out_diff = float(jnp.max(jnp.abs(out - reference[0])))
        grad_diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                        for a, b in zip(grads, reference[1]))
        print(f"check {name}: max |y - y_dense| = {out_diff:.2e} (|y| max "
              f"{float(jnp.max(jnp.abs(reference[0]))):.2f}); max relative gradient diff "
              f"{grad_diff:.2e}", flush=True)
        if out_diff > 1e-3 or grad_diff > 1e-3:
            raise SystemExit(f"{name} does not compute the dense layer's result")
    for name, (forward, backward) in fns.items():  # one more warm-up each
        jax.block_until_ready(forward(*inputs))
        jax.block_until_ready(backward(*inputs))

    times = {name: {"fwd": [], "fwd+bwd": []} for name in fns}
    for _ in range(args.reps):
        for name, (forward, backward) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(forward(*inputs))
            times[name]["fwd"].append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(backward(*inputs))
            times[name]["fwd+bwd"].append(time.perf_counter() - start)

    dense_fwd = statistics.median(times["dense"]["fwd"])
    dense_bwd = statistics.median(times["dense"]["fwd+bwd"])
    print()
    print(f"useful expert FLOPs (6 H I T k): {useful / 1e9:.2f} GFLOP forward; router "
          f"{router_flops / 1e9:.3f} GFLOP; forward+backward = 3x")
    header = (f"{'implementation':<26} {'fwd GFLOP done':>14} {'/useful':>8} {'fwd ms (min)':>16} "
              f"{'fwd+bwd ms (min)':>18} {'fwd / dense':>11} {'fwd+bwd / dense':>15} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for name, (impl, block) in contenders.items():
        done = flops_done(impl, block)
        fwd, bwd = times[name]["fwd"], times[name]["fwd+bwd"]
        print(f"{name:<26} {done / 1e9:>14.2f} {done / (useful + router_flops):>8.2f} "
              f"{statistics.median(fwd) * 1e3:>8.0f} ({min(fwd) * 1e3:>5.0f}) "
              f"{statistics.median(bwd) * 1e3:>10.0f} ({min(bwd) * 1e3:>5.0f}) "
              f"{statistics.median(fwd) / dense_fwd:>11.3f} {statistics.median(bwd) / dense_bwd:>15.3f} "
              f"{compile_seconds[name]:>9.1f}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} ({args.reps} round-robin rounds); "
          f"peak resident memory of this process {peak_gb:.1f} GB")


if __name__ == "__main__":
    main()
