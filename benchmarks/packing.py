"""Padded vs packed rows: teacher scoring and the update on long-tailed response lengths.

A step of `--rows` rows with prompts of `--prompt` slots and responses of up to `--new-tokens`
whose lengths are drawn from a log-normal (median `--median`), so most rows are short and a few
long, as in RL rollouts. The same random Qwen3-shaped model scores them (teacher token log-probs)
and takes one update (sampled-token loss, AdamW), micro-batched by `--micro-batch` rows either
way: padded micro-batches of whole rows vs packed micro-batches of rows of `prompt + new_tokens`
tokens. Each program is compiled and run once before timing; the figures are the median of
`--reps` runs, printed side by side with their ratio, and the packed log-probs are checked
against the padded ones.

Usage::

    python benchmarks/packing.py                  # 32 rows, 64 + 1024 tokens, median 120
    python benchmarks/packing.py --attention direct
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effopd_jax import batching, models, objectives
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.rollout import Rollout
from effopd_jax.teachers import score_packed, score_token_logprobs
from effopd_jax.trainer import FullFineTuning, TrainState, update_step


def _rollout(rows: int, prompt: int, new_tokens: int, median: float, vocab: int, seed: int) -> Rollout:
    rng = np.random.RandomState(seed)
    prompt_lengths = rng.randint(prompt // 2, prompt + 1, rows)
    response_lengths = np.clip(np.round(rng.lognormal(np.log(median), 1.0, rows)), 1, new_tokens).astype(int)
    prompt_mask = np.arange(prompt)[None] >= (prompt - prompt_lengths)[:, None]
    response_mask = np.arange(new_tokens)[None] < response_lengths[:, None]
    ids = lambda shape, mask: np.where(mask, rng.randint(1, vocab, shape), 0).astype(np.int32)
    return Rollout(jnp.asarray(ids((rows, prompt), prompt_mask)), jnp.asarray(prompt_mask),
                   jnp.asarray(ids((rows, new_tokens), response_mask)), jnp.asarray(response_mask),
                   jnp.asarray(np.where(response_mask, -1.0, 0.0), jnp.float32))


def _time(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--median", type=float, default=120.0, help="median response length")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--attention", default="blockwise")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    config = QwenConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=32, dtype=jnp.float32,
                        tie_word_embeddings=True, attention_impl=args.attention)
    params = models.init_params(config, jax.random.key(0))
    out = _rollout(args.rows, args.prompt, args.new_tokens, args.median, config.vocab_size, seed=0)
    p, r, _ = batching.sequence_lengths(out.prompt_mask, out.response_mask)
    plan = batching.plan_packing(np.asarray(p), np.asarray(r), prompt_length=args.prompt,
                                 max_new_tokens=args.new_tokens, micro_batch_size=args.micro_batch, shards=1)
    real = int(np.asarray(p).sum() + np.asarray(r).sum())
    padded_micro = args.rows // args.micro_batch
    print(f"{args.rows} rows, {args.prompt} + {args.new_tokens} slots, {real} real tokens "
          f"({real / (args.rows * (args.prompt + args.new_tokens)):.1%} of the padded slots); response lengths "
          f"median {int(np.median(np.asarray(r)))}, max {int(np.asarray(r).max())}; micro-batches of "
          f"{args.micro_batch}: padded {padded_micro}, packed {int(plan.num_micro_batches)} "
          f"(efficiency {batching.packing_efficiency(plan):.1%}); attention {args.attention}", flush=True)

    padded_score = jax.jit(functools.partial(score_token_logprobs, config, temperature=1.0, chunk_size=256,
                                             micro_batch_size=args.micro_batch))
    packed_score = jax.jit(functools.partial(score_packed, config, output="token_logprobs", temperature=1.0,
                                             chunk_size=256))
    padded_lp = np.asarray(padded_score(params, out))
    packed_lp = np.asarray(packed_score(params, out, plan))
    mask = np.asarray(out.response_mask)
    print(f"packed vs padded log-probs: max |diff| {np.abs(packed_lp - padded_lp)[mask].max():.2e}")

    optimizer = optax.adamw(1e-5)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                       jax.random.key_data(jax.random.key(0)), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    batch = OPDBatch(*out, teacher_logprobs=jnp.asarray(padded_lp))
    update = jax.jit(functools.partial(
        update_step, optimizer=optimizer, model_config=config, parameterization=FullFineTuning(),
        loss=objectives.get_loss("sampled_token"), settings=LossSettings(chunk_size=256),
        micro_batch_size=args.micro_batch))

    rows = [
        ("teacher scoring", _time(lambda: padded_score(params, out), args.reps),
         _time(lambda: packed_score(params, out, plan), args.reps)),
        ("update", _time(lambda: update(state, batch, {}), args.reps),
         _time(lambda: update(state, batch, {}, plan), args.reps)),
    ]
    print(f"{'':>16} {'padded s':>9} {'packed s':>9} {'padded / packed':>16}")
    for name, padded, packed in rows:
        print(f"{name:>16} {padded:9.3f} {packed:9.3f} {padded / packed:15.2f}x")


if __name__ == "__main__":
    main()
