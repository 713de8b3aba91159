"""Cost of the foresight monitor (effopd_jax.monitor).

Two measurements, printed:

1. Randomized vs exact SVD on one ``--svd-rows`` x ``--svd-cols`` matrix (default 2048 x 8192,
   the shape of a Qwen3-1.7B MLP matrix): median time of the jitted exact
   ``jnp.linalg.svd(full_matrices=False)`` and of ``monitor.truncated_svd(method="randomized")``
   for each k in ``--ks``, their ratio, and the relative error of the top-k singular values
   against the exact ones. The matrix has a decaying spectrum σ_j = 0.97^j plus noise, like
   cumulative weight updates.

2. One monitor pass relative to one training step of the same model: a randomly initialised
   Qwen3 (``effopd_jax.models``, ``--hidden/--layers/...``), a jitted training step
   (forward + backward of the next-token cross-entropy on random ``[batch, seq]`` tokens + an
   AdamW update via optax), and a jitted ``monitor.monitor_step`` (all 7 attention/MLP matrices of
   every layer, ΔW from a perturbed copy of the params) for each k in ``--ks``, with the
   randomized top-k SVD (the live default) and, with ``--full-spectrum``, the exact-SVD mode.
   The ratio monitor/step says what fraction of one step a pass costs; a pass every N steps
   costs that ratio / N of the training time.

Timing: one compile call (reported) and one warm-up call, then the median (and min) of
``--reps`` calls, each blocked until ready; in part 2 the step and the monitor passes are timed
round robin, so a burst of load from other processes hits all of them alike.

CPU note: LAPACK (QR, SVD) comes from scipy's OpenBLAS, whose own thread pool busy-waits for
cores that XLA's threads (and other processes) hold; on a small shared CPU that makes a
1536 x 18 QR ~100x slower (0.1 s instead of 1 ms). This script therefore sets
OPENBLAS_NUM_THREADS=1 unless it is already set (printed at start); XLA still parallelises the rest.

Run:  .venv/bin/python benchmarks/monitor_cost.py [--reps 3] [--svd-rows 2048 --svd-cols 8192]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/jax load OpenBLAS; see above

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effopd_jax import models, monitor
from effopd_jax.models.qwen import QwenConfig


def time_compiled(jitted, args: tuple, reps: int) -> tuple[float, float, float, object]:
    """(compile seconds, median seconds, min seconds, last output) of a jitted function.

    Compiled ahead of time (``lower().compile()``), so no run is spent on warm-up: the exact SVD
    of a 2048 x 8192 matrix takes minutes on a small shared CPU.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), min(times), out


def bench_svd(rows: int, cols: int, ks: list[int], reps: int) -> None:
    print(f"== randomized vs exact SVD, {rows} x {cols} float32 ==")
    rng = np.random.default_rng(0)
    r = min(rows, cols)
    # A = U diag(σ) Vᵀ + noise, σ_j = 0.97^j: built in two thin factors to keep it cheap.
    u, _ = np.linalg.qr(rng.standard_normal((rows, r)).astype(np.float32))
    sigma = (0.97 ** np.arange(r)).astype(np.float32)
    v = rng.standard_normal((r, cols)).astype(np.float32) / np.sqrt(cols)
    a = jnp.asarray((u * sigma) @ v + 1e-3 * rng.standard_normal((rows, cols)).astype(np.float32))

    exact = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False, compute_uv=True))
    compile_s, med_exact, min_exact, (_, s_exact, _) = time_compiled(exact, (a,), reps)
    s_exact = np.asarray(s_exact)
    print(f"exact jnp.linalg.svd (U, S, Vt):  median {med_exact:8.3f} s  (min {min_exact:.3f}, compile {compile_s:.2f} s, {reps} runs)")
    key = jax.random.PRNGKey(1)
    for k in ks:
        fn = jax.jit(lambda x, key, k=k: monitor.truncated_svd(x, k, key, method="randomized"))
        compile_s, med, mn, res = time_compiled(fn, (a, key), max(reps, 3))
        s_k = np.asarray(res.s)
        err = np.max(np.abs(s_k - s_exact[:k]) / s_exact[:k])
        print(
            f"randomized k={k:<3d} (l={k + 10}, q=2):     median {med:8.3f} s  (min {mn:.3f}, compile {compile_s:.2f} s)"
            f"  speed-up x{med_exact / med:7.1f}  max rel err top-k σ {err:.2e}"
        )


def bench_monitor_vs_step(args: argparse.Namespace) -> None:
    config = QwenConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, tie_word_embeddings=False,
        param_dtype=jnp.float32, dtype=jnp.float32 if args.compute_dtype == "float32" else jnp.bfloat16,
        scan_layers=args.scan_layers,
    )
    layout = models.layout(config)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.seq), 0, args.vocab)
    params = models.init_params(config, jax.random.PRNGKey(1))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kernels = monitor.module_kernels(params, layout)
    n_monitored = sum(x.size for x in kernels.values())
    print(
        f"\n== monitor pass vs training step: Qwen hidden={args.hidden} layers={args.layers}"
        f" heads={args.heads}/{args.kv_heads} head_dim={args.head_dim} intermediate={args.intermediate}"
        f" vocab={args.vocab} scan_layers={args.scan_layers} compute={args.compute_dtype};"
        f" {n_params / 1e6:.1f} M params, {n_monitored / 1e6:.1f} M monitored; batch {args.batch} x seq {args.seq} =="
    )

    optimizer = optax.adamw(1e-4, weight_decay=0.01)

    def loss_fn(p, ids):
        logits = models.forward(config, p, ids)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    @jax.jit
    def train_step(p, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = optimizer.init(params)

    # A realistic ΔW: a few AdamW steps' worth of random perturbation on every leaf.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params_t = jax.tree.unflatten(
        treedef, [x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )
    state = monitor.init_monitor_state(params, layout)
    candidates: dict[str, Callable[[], object]] = {"training step (fwd+bwd+AdamW)": lambda: train_step(params, opt_state, tokens)}
    modes = [(k, False) for k in args.ks] + ([(max(args.ks), True)] if args.full_spectrum else [])
    for k, full in modes:
        config_m = monitor.MonitorConfig(k=k, full_spectrum=full)
        # Time the steady-state pass (with reference bases, so overlaps are computed too).
        state_ref, _ = monitor.monitor_step(state, params_t, jax.random.PRNGKey(3), config=config_m, layout=layout)
        mode = "exact SVD, full spectrum" if full else f"svd auto, l={k + config_m.oversample}, q={config_m.power_iters}"
        candidates[f"monitor pass k={k} ({mode})"] = (
            lambda s=state_ref, c=config_m: monitor.monitor_step(s, params_t, jax.random.PRNGKey(4), config=c, layout=layout)
        )
    # Compile + warm up each, then time them round robin so load bursts hit all alike.
    first = {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
        jax.block_until_ready(fn())
    times = {name: [] for name in candidates}
    for _ in range(args.reps):
        for name, fn in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    step_name = next(iter(candidates))
    med_step = statistics.median(times[step_name])
    for name in candidates:
        med, mn = statistics.median(times[name]), min(times[name])
        ratio = "" if name == step_name else f"  = {med / med_step:6.3f} x one training step (min/min {mn / min(times[step_name]):.3f})"
        print(f"{name:<42s} median {med:8.3f} s  (min {mn:.3f}, first call {first[name]:.2f} s){ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed runs of the model part")
    parser.add_argument("--svd-reps", type=int, default=1, help="timed runs of the exact SVD")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--svd-rows", type=int, default=2048)
    parser.add_argument("--svd-cols", type=int, default=8192)
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--scan-layers", action="store_true")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--full-spectrum", action="store_true", help="also time the exact-SVD monitor mode")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices: {jax.devices()}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    if not args.skip_model:
        bench_monitor_vs_step(args)
    if not args.skip_svd:
        bench_svd(args.svd_rows, args.svd_cols, args.ks, args.svd_reps)


if __name__ == "__main__":
    main()
