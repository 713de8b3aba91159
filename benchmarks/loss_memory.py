"""Peak memory and time of the naive vs the sequence-chunked OPD loss (forward + backward).

Each measurement runs in its own child process, so ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
of the child is the peak resident memory of exactly one configuration. The loss is the authors'
training loss on top of the lm_head::

    naive:   logprobs = token_logprobs(hidden @ lm_head, tokens)              # [B, S, V] f32 logits
    chunked: logprobs = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=C)
    loss     = sampled_token_opd_loss(logprobs, teacher_logprobs, mask)

differentiated w.r.t. both ``hidden`` [B, S, H] and ``lm_head`` [H, V] (float32). With
``--loss kl`` the exact full-vocabulary reverse KL against a teacher (its own hidden states and
lm_head) is measured instead.

Memory is measured as the kernel's peak-RSS high-water mark (``ru_maxrss``) of the child, reset
(``/proc/self/clear_refs``) after imports, input generation and compilation, so the printed
"peak RSS" is the peak while the forward + backward runs, with the inputs (lm_head: 0.58 GiB in
float32 at these sizes) resident and the lm_head gradient (another 0.58 GiB) produced; the
child's whole-life peak up to that point is printed as "set-up peak".

Before executing, each child asks XLA for the compiled program's scratch size; if that plus the
current RSS does not fit in the machine's available memory (minus a safety margin, because the
machine is shared), the child does not run it and says so.

Usage::

    python benchmarks/loss_memory.py                       # batch 4, seq 2048, vocab 151936
    python benchmarks/loss_memory.py --batch 1 --loss kl
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GIB = 1024**3


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Resets this process's peak-RSS high-water mark to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child(args: argparse.Namespace) -> None:
    """Runs one configuration and prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from effopd_jax import losses

    jax.config.update("jax_default_matmul_precision", "highest")
    b, s, h, v = args.batch, args.seq, args.hidden, args.vocab
    rng = np.random.default_rng(0)

    def normal(shape, std):
        # Filled block by block in float32, so set-up never holds a float64 copy.
        out = np.empty(shape, np.float32)
        flat = out.reshape(shape[0], -1)
        for start in range(0, shape[0], 64):
            block = flat[start : start + 64]
            rng.standard_normal(block.shape, dtype=np.float32, out=block)
            block *= std
        return out

    hidden = jnp.asarray(normal((b, s, h), 1.0))
    lm_head = jnp.asarray(normal((h, v), 0.02))
    tokens = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    mask = jnp.asarray(np.arange(s)[None, :] >= s // 4).repeat(b, 0)  # first quarter = prompt
    teacher_logprobs = jnp.asarray(-rng.gamma(2.0, 2.0, (b, s)), jnp.float32)
    # Everything the loss reads is a jit argument: closed-over arrays would be baked into the
    # executable as constants (an extra copy of each).
    if args.loss == "kl":
        teacher_hidden = jnp.asarray(normal((b, s, h), 1.0))
        teacher_head = jnp.asarray(normal((h, v), 0.02))
        data = (tokens, mask, teacher_hidden, teacher_head)
    else:
        data = (tokens, mask, teacher_logprobs)

    if args.loss == "logprob":
        def loss_fn(hidden_, lm_head_, tokens_, mask_, teacher_logprobs_):
            if args.mode == "naive":
                logprobs = losses.token_logprobs(hidden_ @ lm_head_, tokens_)
            else:
                logprobs = losses.chunked_token_logprobs(
                    hidden_, lm_head_, tokens_, chunk_size=args.chunk_size,
                    vocab_block_size=args.vocab_block_size,
                )
            return losses.sampled_token_opd_loss(logprobs, teacher_logprobs_, mask_)[0]
    else:
        def loss_fn(hidden_, lm_head_, tokens_, mask_, teacher_hidden_, teacher_head_):
            del tokens_
            if args.mode == "naive":
                per_token = losses.token_reverse_kl(
                    hidden_ @ lm_head_, jax.lax.stop_gradient(teacher_hidden_ @ teacher_head_)
                )
            else:
                per_token = losses.chunked_reverse_kl(
                    hidden_, lm_head_, teacher_hidden_, teacher_head_,
                    chunk_size=args.chunk_size, vocab_block_size=args.vocab_block_size,
                )
            return losses.aggregate_token_losses(per_token, mask_, "seq-mean-token-mean")

    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(hidden, lm_head, *data).compile()
    compile_s = time.perf_counter() - t0
    scratch = compiled.memory_analysis().temp_size_in_bytes
    result = {
        "mode": args.mode, "loss": args.loss, "batch": b, "seq": s, "hidden": h, "vocab": v,
        "chunk_size": args.chunk_size if args.mode == "chunked" else None,
        "xla_scratch_gib": scratch / GIB, "compile_s": compile_s,
    }
    # Everything before this point (imports, random inputs, compilation) is set-up. Reset the
    # kernel's high-water mark to the current RSS so that ru_maxrss below is the peak of the
    # loss itself, with the inputs (hidden states, lm_head) still resident.
    gc.collect()
    # Hand memory that set-up freed (compiler scratch, numpy temporaries) back to the OS, so the
    # baseline does not depend on how much of it the allocator happened to keep.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    setup_peak = _peak_rss_bytes()
    setup_rss = _current_rss_bytes()
    _reset_peak_rss()
    result.update(setup_rss_gib=setup_rss / GIB, setup_peak_rss_gib=setup_peak / GIB)
    available = _available_bytes()
    # The gradients are as large as the differentiated inputs; count them too.
    needed = scratch + (hidden.nbytes + lm_head.nbytes)
    if needed > available - args.margin_gib * GIB:
        result.update(
            skipped=True,
            reason=(
                f"needs ~{needed / GIB:.1f} GiB beyond the {setup_rss / GIB:.2f} GiB already "
                f"resident, but only {available / GIB:.1f} GiB is available on this shared "
                f"machine (keeping a {args.margin_gib} GiB margin)"
            ),
        )
        print(json.dumps(result), flush=True)
        return
    t0 = time.perf_counter()
    loss, (d_hidden, d_head) = compiled(hidden, lm_head, *data)
    loss.block_until_ready()
    d_hidden.block_until_ready()
    d_head.block_until_ready()
    run_s = time.perf_counter() - t0
    # Read the peak now: the checks below allocate lm_head-sized temporaries of their own.
    peak_rss = _peak_rss_bytes()
    d_hidden_np = np.asarray(d_hidden)
    tag = f"{args.mode}{args.chunk_size if args.mode == 'chunked' else ''}"
    np.save(os.path.join(args.out_dir, f"{tag}_d_hidden.npy"), d_hidden_np)
    np.save(os.path.join(args.out_dir, f"{tag}_d_head_slice.npy"), np.asarray(d_head[:, :4096]))
    result.update(
        skipped=False, run_s=run_s, peak_rss_gib=peak_rss / GIB, loss=float(loss),
        d_hidden_norm=float(jnp.linalg.norm(d_hidden)), d_head_norm=float(jnp.linalg.norm(d_head)),
    )
    print(json.dumps(result), flush=True)


def _run_child(mode: str, batch: int, chunk_size: int, args: argparse.Namespace,
               out_dir: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(batch),
        "--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--chunk-size", str(chunk_size), "--vocab-block-size", str(args.vocab_block_size),
        "--loss", args.loss, "--margin-gib", str(args.margin_gib), "--out-dir", out_dir,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        # A kill by the OOM killer shows up as -9: report it as such rather than crash.
        return {"mode": mode, "batch": batch, "chunk_size": chunk_size, "skipped": True,
                "reason": f"child exited with {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _describe(r: dict) -> str:
    name = r["mode"] if r["mode"] == "naive" else f"chunked (chunk_size={r['chunk_size']})"
    head = f"  {name:28s}"
    if r.get("skipped"):
        return f"{head} NOT RUN: {r['reason']}"
    return (
        f"{head} peak RSS {r['peak_rss_gib']:.2f} GiB (resident before the loss "
        f"{r['setup_rss_gib']:.2f}; set-up peak {r['setup_peak_rss_gib']:.2f}; "
        f"XLA scratch {r['xla_scratch_gib']:.2f})  compile {r['compile_s']:.1f} s  "
        f"fwd+bwd {r['run_s']:.1f} s  loss {r['loss']:.7f}"
    )


def _compare(batch: int, args: argparse.Namespace) -> None:
    import numpy as np

    print(f"batch {batch}, seq {args.seq}, hidden {args.hidden}, vocab {args.vocab}, "
          f"loss={args.loss}, float32, grads w.r.t. hidden and lm_head, "
          f"vocab_block_size {args.vocab_block_size}; one child process each:", flush=True)
    with tempfile.TemporaryDirectory() as out_dir:
        naive = _run_child("naive", batch, 0, args, out_dir)
        print(_describe(naive), flush=True)
        for chunk_size in args.chunk_size:
            chunked = _run_child("chunked", batch, chunk_size, args, out_dir)
            print(_describe(chunked), flush=True)
            if chunked.get("skipped"):
                continue
            ok = chunked["peak_rss_gib"] <= 2.0
            line = f"    chunked peak <= 2 GiB: {ok}"
            if not naive.get("skipped"):
                d_naive = np.load(os.path.join(out_dir, "naive_d_hidden.npy"))
                d_chunk = np.load(os.path.join(out_dir, f"chunked{chunk_size}_d_hidden.npy"))
                h_naive = np.load(os.path.join(out_dir, "naive_d_head_slice.npy"))
                h_chunk = np.load(os.path.join(out_dir, f"chunked{chunk_size}_d_head_slice.npy"))
                rel = lambda a, b: float(  # noqa: E731
                    np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                ratio = chunked["peak_rss_gib"] / naive["peak_rss_gib"]
                print(f"    vs naive: |loss diff| {abs(naive['loss'] - chunked['loss']):.3e}, "
                      f"max rel diff d_hidden {rel(d_chunk, d_naive):.2e}, "
                      f"d_lm_head[:, :4096] {rel(h_chunk, h_naive):.2e}, |d_lm_head| "
                      f"{naive['d_head_norm']:.6e} vs {chunked['d_head_norm']:.6e}")
                line += f"; peak ratio chunked/naive {ratio:.3f} (<= 1/4: {ratio <= 0.25})"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--vocab-block-size", type=int, default=8192)
    parser.add_argument("--loss", choices=("logprob", "kl"), default="logprob")
    parser.add_argument("--margin-gib", type=float, default=3.0,
                        help="memory left free for the other users of the machine")
    parser.add_argument("--child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        args.batch = args.batch[0]
        args.chunk_size = args.chunk_size[0]
        _child(args)
        return
    for batch in args.batch:
        _compare(batch, args)


if __name__ == "__main__":
    main()
