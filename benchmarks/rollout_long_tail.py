"""Long-tailed rollouts: the static engine vs the continuous-batching engine at the same concurrency.

Responses of an RL step have a long-tailed length distribution: most end early, a few run to the
cap. The static engine decodes a batch until its longest row ends, so at ``S`` concurrent
sequences it runs the step's rows in waves of ``S`` and every wave costs its longest row. The
continuous engine (``rollout.engine="continuous"``) keeps ``S`` slots busy, refilling a slot
with the next prompt as soon as its row ends.

The model is a random Qwen3-shaped model rewired to count (``effopd_jax.testing.counting``), so
each prompt fixes its response length exactly: lengths are drawn from a log-normal
(``--median``, ``--sigma``), clipped to ``[1, --max-new]``, and enforced by EOS. Sampling is
ancestral at temperature 1 (the OPD rollout setting); every layer does its real work (random
attention and MLP weights).

Contenders, all at ``--slots`` concurrent sequences (``S``):

* ``static``: ``sampling.generate_padded`` on waves of ``S`` rows (each wave's rows keep their
  index in the step, ``row_ids``, so they draw the same tokens as in the continuous engine);
* ``continuous``: ``ContinuousEngine`` with ``slots = S`` (defaults: ``decode_steps=32``,
  ``prefill_rows=1``);
* ``continuous, 1 step/call``: ``decode_steps=1``, one host round trip per token (shows what
  the host<->device granularity costs);
* ``continuous, prefill 4``: ``prefill_rows=4`` (refills in fours: fewer prefill calls, slots
  idle while they wait);
* with ``--static-full``, also the static engine on all rows at once (``rows`` concurrent
  sequences: its KV cache is rows/S times larger).

Same work: before timing, every contender's tokens are checked equal to the continuous
engine's (per-row keys make them identical), so tokens/s compares like with like.

Figures: tokens/s = response tokens / wall time of the whole call (median over ``--reps``
round-robin repetitions, minimum next to it), speed-up over ``static``; decode steps run (a
static wave runs until its longest row ends) and wall time per decode step (prefills included),
which split the speed-up into fewer steps and cheaper steps; slot occupancy (useful
slot-steps / slot-steps run); the continuous engine's host round trips (prefill and decode
calls) and the share of its wall time the host spent scheduling rather than waiting for the
device; memory from XLA's compiled memory analysis of each contender's programs on this
backend (peak = arguments + outputs + temporaries - aliased, of its largest program) and the KV
cache alone.

Run:  python -u benchmarks/rollout_long_tail.py [--rows 256 --slots 32 --max-new 512]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effopd_jax import data, models, rollout, sampling  # noqa: E402
from effopd_jax import sharding as sharding_lib  # noqa: E402
from effopd_jax.models.qwen import QwenConfig  # noqa: E402
from effopd_jax.testing.counting import counting_params, prompts_for_lengths  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="rows (prompts) of the step")
    parser.add_argument("--slots", type=int, default=16, help="concurrent sequences of both engines")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length (prompts are 50-100%% of it)")
    parser.add_argument("--max-new", type=int, default=256, help="response length cap")
    parser.add_argument("--median", type=float, default=24.0, help="median response length")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the response lengths")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512, help="> --max-new (the counting model's range)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--static-full", action="store_true", help="also time the static engine on all rows at once")
    parser.add_argument("--skip-variants", action="store_true", help="time only static vs continuous")
    return parser.parse_args(argv)


def program_memory(programs) -> tuple[str, int]:
    """(name, peak bytes) of the largest compiled program: arguments + outputs + temporaries - aliased."""
    best = ("", 0)
    for program in programs:
        stats = program.lower().compile().memory_analysis()
        peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                - stats.alias_size_in_bytes)
        best = max(best, (program.name, peak), key=lambda x: x[1])
    return best


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.vocab <= args.max_new + 1:
        raise SystemExit("--vocab must exceed --max-new + 1 (the counting model counts up to the EOS)")
    if args.rows % args.slots:
        raise SystemExit("--rows must be a multiple of --slots (the static engine's waves)")
    config = QwenConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, dtype=jnp.float32,
                        max_position_embeddings=args.prompt_len + args.max_new + 8)
    params = counting_params(config, args.seed)
    eos = args.vocab - 1
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(args.median), args.sigma, args.rows)), 1, args.max_new).astype(int)
    prompt_lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.rows)
    prompts = prompts_for_lengths(lengths, eos_token_id=eos, vocab_size=args.vocab, prompt_lengths=prompt_lengths,
                                  seed=args.seed)
    settings = sampling.SamplingSettings(max_new_tokens=args.max_new, temperature=1.0, eos_token_ids=(eos,))
    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    key = jax.random.key(args.seed)
    waves = [list(range(w, w + args.slots)) for w in range(0, args.rows, args.slots)]
    wave_max = [int(lengths[w].max()) for w in waves]

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads x {args.head_dim}, "
          f"vocab {args.vocab}, float32 ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M params)")
    print(f"step: {args.rows} rows, prompts {args.prompt_len // 2}-{args.prompt_len} tokens, responses log-normal "
          f"(median {args.median:g}, sigma {args.sigma:g}) clipped to [1, {args.max_new}]: mean {lengths.mean():.1f}, "
          f"p50 {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
          f"{lengths.sum()} response tokens")
    print(f"concurrency {args.slots}: static in {len(waves)} waves (mean of wave maxima {np.mean(wave_max):.1f} "
          f"steps), page size {args.page_size}\n")

    ids, mask = data.left_pad(prompts, settings.pad_token_id, args.prompt_len)
    generate_wave = functools.partial(
        sampling.generate_padded, config, params, max_new_tokens=args.max_new, temperature=1.0,
        eos_token_ids=(eos,), mesh=mesh)

    def static_waves():
        outs = [generate_wave(ids[w], mask[w], key, row_ids=np.asarray(w, np.int32)) for w in waves]
        return np.concatenate([np.asarray(o.tokens) for o in outs]), np.concatenate([np.asarray(o.mask) for o in outs])

    def static_full():
        out = generate_wave(ids, mask, key)
        return np.asarray(out.tokens), np.asarray(out.mask)

    def continuous(**options):
        engine = rollout.make_rollout_engine(
            "continuous", model_config=config, settings=settings, mesh=mesh, prompt_length=args.prompt_len,
            options={"slots": args.slots, "page_size": args.page_size, **options})

        def call():
            out = engine.generate(params, prompts, key)
            return np.asarray(out.response_ids), np.asarray(out.response_mask)

        return engine, call

    contenders = {"static": (None, static_waves)}
    contenders["continuous"] = continuous()
    if not args.skip_variants:
        contenders["continuous, 1 step/call"] = continuous(decode_steps=1)
        contenders["continuous, prefill 4"] = continuous(prefill_rows=4)
    if args.static_full:
        contenders[f"static, all {args.rows} rows"] = (None, static_full)

    # Compile, warm up, and check that every contender samples the same tokens.
    reference = None
    for name, (_, call) in contenders.items():
        start = time.perf_counter()
        tokens, response_mask = call()
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
        np.testing.assert_array_equal(response_mask.sum(1), lengths, err_msg=f"{name}: lengths not as designed")
        if reference is None:
            reference = tokens
        np.testing.assert_array_equal(tokens, reference, err_msg=f"{name}: other tokens than static")
    print("  same work: every contender sampled the same tokens, response lengths as designed\n")

    times = {name: [] for name in contenders}
    stats = {}
    for _ in range(args.reps):
        for name, (engine, call) in contenders.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            if engine is not None:
                stats[name] = dict(engine.last_stats)

    # Memory: each contender's programs, compiled for this backend.
    static_engine = rollout.make_rollout_engine("static", model_config=config, settings=settings, mesh=mesh,
                                                prompt_length=args.prompt_len)
    kv_per_position = 2 * args.layers * args.kv_heads * args.head_dim * 4
    memory = {"static": (program_memory(static_engine.programs(args.slots)),
                         args.slots * (args.prompt_len + args.max_new) * kv_per_position)}
    for name, (engine, _) in contenders.items():
        if engine is not None:
            pool = (args.slots * engine.pages_per_row + 1) * args.page_size * kv_per_position
            memory[name] = (program_memory(engine.programs(args.rows)), pool)
    if args.static_full:
        memory[f"static, all {args.rows} rows"] = (program_memory(static_engine.programs(args.rows)),
                                                    args.rows * (args.prompt_len + args.max_new) * kv_per_position)

    total = int(lengths.sum())
    base = np.median(times["static"])
    static_occupancy = total / (args.slots * sum(wave_max))
    print("| contender | tokens/s (median) | best | speed-up | decode steps | ms / decode step | slot occupancy "
          "| host calls | host share | peak program memory | KV cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in contenders:
        median, best = np.median(times[name]), np.min(times[name])
        s = stats.get(name)
        if s is None:
            occupancy = static_occupancy if name == "static" else total / (args.rows * lengths.max())
            calls, host = f"{len(waves) if name == 'static' else 1}", "-"
            # A wave (or the whole batch) decodes until its longest row ends.
            steps = sum(wave_max) if name == "static" else int(lengths.max())
        else:
            steps = int(s["decode_steps"])
            occupancy = s["slot_occupancy"]
            calls = f"{s['host_calls']:.0f}"
            host = f"{s['host_seconds'] / s['seconds']:.0%}"
        (program, peak), kv = memory.get(name, memory["static"])
        print(f"| {name} | {total / median:,.0f} | {total / best:,.0f} | {base / median:.2f}x | {steps} "
              f"| {1e3 * median / steps:.1f} | {occupancy:.0%} "
              f"| {calls} | {host} | {peak / 2**20:.1f} MiB ({program}) | {kv / 2**20:.1f} MiB |")
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
