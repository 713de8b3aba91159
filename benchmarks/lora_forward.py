"""LoRA students: merged weights vs an unmerged forward, for the rollout and for the update.

    python benchmarks/lora_forward.py [--sizes demo medium] [--reps 5] [--rank 8]

A LoRA student W' = W + s·A·B can be run two ways:

merged    ``LoRA.merge`` forms W' once (per rollout, per update) and the model runs on it as on
          any params; the gradient reaches A and B through the merge (so the backward pass forms
          the full ``[in, out]`` weight gradient once per matrix, then projects it);
unmerged  ``lora.unmerged_forward``: every adapted layer computes ``x·W + s·(x·A)·B`` (two thin
          matmuls more per layer and token; no W' is formed; the weight gradients are the thin
          ones of A and B).

Timed, side by side in one process, each phase in round robin (merged, unmerged, merged, ...):

rollout  ``sampling.generate_padded`` of ``--rows`` prompts x ``--new-tokens`` tokens at T = 1;
         merged includes the merge itself (one per rollout, as the trainer does);
update   one jitted ``value_and_grad`` of the sampled-token OPD loss w.r.t. the adapters on a
         rollout of the same shape (merge inside, for the merged path).

Both paths are checked to compute the same thing first (greedy rollouts identical; loss and
gradients equal to float32 rounding). Prints the medians and the unmerged / merged ratios
(> 1: merged is faster). Sizes: ``demo`` is the demo's student (hidden 48, 2 layers, its
69-token vocabulary); ``medium`` a hidden-512, 4-layer Qwen3 shape with an 8192-token
vocabulary. float32 on CPU; run it when the machine is idle (``uptime``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from effopd_jax import lora, models, objectives, sampling  # noqa: E402
from effopd_jax.models.qwen import QwenConfig  # noqa: E402
from effopd_jax.objectives import LossSettings, OPDBatch  # noqa: E402

SIZES = {
    "demo": dict(vocab_size=69, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64),
}


def _config(size: str) -> QwenConfig:
    return QwenConfig(**SIZES[size], tie_word_embeddings=True, model_type="qwen3", eos_token_id=2, pad_token_id=0,
                      param_dtype=jnp.float32, dtype=jnp.float32)


def _time(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench(size: str, args) -> dict:
    config = _config(size)
    params = models.init_params(config, jax.random.key(0))
    adapter = lora.LoRA.for_model(config, rank=args.rank, alpha=2.0 * args.rank)
    adapters, frozen = adapter.split(params)
    # Trained-looking adapters (B != 0), so neither path multiplies by zeros.
    adapters = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), adapters)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (args.rows, args.prompt_len)), jnp.int32)
    prompt_mask = jnp.ones_like(prompts, bool)
    sample = functools.partial(sampling.generate_padded, max_new_tokens=args.new_tokens, eos_token_ids=(),
                               pad_token_id=0)

    def rollout_merged(temperature=1.0):
        return sample(config, adapter.merge(adapters, frozen), prompts, prompt_mask, jax.random.key(2),
                      temperature=temperature)

    augmented = lora.with_adapters(frozen, adapters)

    def rollout_unmerged(temperature=1.0):
        # The sampler's program is traced (on the first call with this params structure) inside the
        # interceptor, so it applies the adapters unmerged.
        with lora.unmerged(adapter.scale):
            return sample(config, augmented, prompts, prompt_mask, jax.random.key(2), temperature=temperature)

    greedy_m, greedy_u = rollout_merged(0.0), rollout_unmerged(0.0)
    same_tokens = bool(np.array_equal(np.asarray(greedy_m.tokens), np.asarray(greedy_u.tokens)))
    out = rollout_merged()
    batch = OPDBatch(prompt_ids=prompts, prompt_mask=prompt_mask, response_ids=out.tokens,
                     response_mask=out.mask, behaviour_logprobs=out.logprobs,
                     teacher_logprobs=out.logprobs - 0.1)
    loss = objectives.get_loss("sampled_token")
    settings = LossSettings(aggregation="seq-mean-token-mean", chunk_size=args.new_tokens, temperature=1.0,
                            reward_scale=1.0, is_threshold=5.0, topk=1)

    @jax.jit
    def grad_merged(trainable, frozen_params, batch):
        return jax.value_and_grad(lambda a: objectives.opd_loss(
            adapter.merge(a, frozen_params), batch, config=config, loss=loss, settings=settings)[0])(trainable)

    @jax.jit
    def grad_unmerged(trainable, frozen_params, batch):
        def loss_fn(a):
            with lora.unmerged(adapter.scale):
                return objectives.opd_loss(lora.with_adapters(frozen_params, a), batch, config=config, loss=loss,
                                           settings=settings)[0]
        return jax.value_and_grad(loss_fn)(trainable)

    (lm, gm), (lu, gu) = grad_merged(adapters, frozen, batch), grad_unmerged(adapters, frozen, batch)
    grad_diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(gu)))
    times = {key: [] for key in ("rollout_merged", "rollout_unmerged", "update_merged", "update_unmerged")}
    for _ in range(args.reps):
        times["rollout_merged"].append(_time(rollout_merged))
        times["rollout_unmerged"].append(_time(rollout_unmerged))
        times["update_merged"].append(_time(lambda: grad_merged(adapters, frozen, batch)))
        times["update_unmerged"].append(_time(lambda: grad_unmerged(adapters, frozen, batch)))
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "size": size, "same_greedy_tokens": same_tokens, "loss_diff": abs(float(lm) - float(lu)),
        "max_rel_grad_diff": grad_diff, **medians,
        "rollout_unmerged/merged": medians["rollout_unmerged"] / medians["rollout_merged"],
        "update_unmerged/merged": medians["update_unmerged"] / medians["update_merged"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["demo", "medium"], choices=sorted(SIZES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}; devices {jax.devices()}; rank {args.rank}, rows {args.rows}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, {args.reps} reps", flush=True)
    header = (f"{'size':>7} | {'rollout merged':>14} {'unmerged':>9} {'ratio':>6} | {'update merged':>13} "
              f"{'unmerged':>9} {'ratio':>6} | same greedy | rel grad diff")
    rows = [bench(size, args) for size in args.sizes]
    print(header)
    for r in rows:
        print(f"{r['size']:>7} | {r['rollout_merged']:13.3f}s {r['rollout_unmerged']:8.3f}s "
              f"{r['rollout_unmerged/merged']:6.2f} | {r['update_merged']:12.3f}s {r['update_unmerged']:8.3f}s "
              f"{r['update_unmerged/merged']:6.2f} | {str(r['same_greedy_tokens']):>11} | {r['max_rel_grad_diff']:.1e}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
