"""EffOPD on small synthetic problems: steps to reach the same held-out loss, with and without.

Two problems with a stable update direction, trained with minibatch Adam at a conservative
learning rate (the regime where extrapolating along the accumulated update should help):

  lsq  least squares, y = X w* + noise, X with correlated features ([4096, 64] train).
  mlp  a 2-layer tanh MLP student fitting a random teacher MLP plus noise.

Each run uses three disjoint splits: train (minibatches), val (EffOPD's score = −val loss) and
test (the measured loss). The target is the baseline's test loss at step ``--target-step``; we
print the first step at which each run reaches it, the ratio baseline / EffOPD, and the score
evaluations EffOPD spent (each one a forward pass over the val split).

  python benchmarks/effopd_synthetic.py [--seeds 5] [--steps 4096] [--target-step 3000]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effopd_jax.effopd import effopd


def make_lsq(key: jax.Array, n_train=4096, n_val=512, n_test=2048, dim=64):
    """Least squares with correlated features; params named like our MLP so the default filter applies."""
    k_mix, k_x, k_w, k_noise = jax.random.split(key, 4)
    mixing = jnp.eye(dim) + 0.3 * jax.random.normal(k_mix, (dim, dim)) / jnp.sqrt(dim)
    x = jax.random.normal(k_x, (n_train + n_val + n_test, dim)) @ mixing
    w_true = jax.random.normal(k_w, (dim, 1))
    y = x @ w_true + 0.1 * jax.random.normal(k_noise, (x.shape[0], 1))
    params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.zeros((dim, 1))}}}}

    def predict(p, inputs):
        return inputs @ p["layers_0"]["mlp"]["up_proj"]["kernel"]

    return params, predict, _splits(x, y, n_train, n_val)


def make_mlp(key: jax.Array, n_train=4096, n_val=512, n_test=2048, dim=16, hidden=64):
    """Teacher-student tanh MLP regression."""
    k_t1, k_t2, k_x, k_noise, k_s1, k_s2 = jax.random.split(key, 6)
    teacher = (jax.random.normal(k_t1, (dim, hidden)) / jnp.sqrt(dim), jax.random.normal(k_t2, (hidden, 1)) / jnp.sqrt(hidden))
    x = jax.random.normal(k_x, (n_train + n_val + n_test, dim))
    y = jnp.tanh(x @ teacher[0]) @ teacher[1] + 0.05 * jax.random.normal(k_noise, (x.shape[0], 1))
    params = {"layers_0": {"mlp": {
        "up_proj": {"kernel": jax.random.normal(k_s1, (dim, hidden)) / jnp.sqrt(dim)},
        "down_proj": {"kernel": 0.1 * jax.random.normal(k_s2, (hidden, 1)) / jnp.sqrt(hidden)},
    }}}

    def predict(p, inputs):
        mlp = p["layers_0"]["mlp"]
        return jnp.tanh(inputs @ mlp["up_proj"]["kernel"]) @ mlp["down_proj"]["kernel"]

    return params, predict, _splits(x, y, n_train, n_val)


def _splits(x, y, n_train, n_val):
    return {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
        "test": (x[n_train + n_val:], y[n_train + n_val:]),
    }


def run(problem, seed: int, *, use_effopd: bool, steps: int, learning_rate: float, batch: int):
    """Trains for ``steps`` Adam steps; returns test loss after each step [steps] and score evals."""
    params, predict, data = problem(jax.random.key(seed))
    mse = lambda p, xy: jnp.mean((predict(p, xy[0]) - xy[1]) ** 2)
    score = lambda p: -mse(p, data["val"])
    tx = optax.chain(optax.adam(learning_rate), effopd()) if use_effopd else optax.adam(learning_rate)
    n_train = data["train"][0].shape[0]

    def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (batch,), 0, n_train)
        grads = jax.grad(mse)(params, (data["train"][0][idx], data["train"][1][idx]))
        if use_effopd:
            updates, opt_state = tx.update(grads, opt_state, params, score_fn=score)
            searched = opt_state[1].last_search.step == opt_state[1].count
            evals = jnp.where(searched, opt_state[1].last_search.num_evals, 0)
            multiplier = jnp.where(searched, opt_state[1].last_search.accepted_multiplier, 0.0)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
            evals, multiplier = jnp.zeros((), jnp.int32), jnp.zeros(())
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (mse(params, data["test"]), evals, multiplier)

    keys = jax.random.split(jax.random.key(seed + 1000), steps)
    _, (test_loss, evals, multipliers) = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
    multipliers = np.asarray(multipliers)
    accepted = [float(m) for m in multipliers[multipliers > 0]]
    return np.asarray(test_loss), int(np.sum(evals)), accepted


def first_step_at_or_below(curve: np.ndarray, target: float) -> int | None:
    hits = np.nonzero(curve <= target)[0]
    return int(hits[0]) + 1 if hits.size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--target-step", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    problems = {"lsq": (make_lsq, 1e-3), "mlp": (make_mlp, 1e-3)}

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Adam, batch {args.batch}, "
          f"{args.steps} steps; target = baseline test loss at step {args.target_step}")
    for name, (problem, lr) in problems.items():
        print(f"\n[{name}] lr={lr:g}")
        print(f"{'seed':>4} {'target':>10} {'base steps':>10} {'effopd steps':>12} {'ratio':>6} "
              f"{'val evals':>9} {'final base':>10} {'final effopd':>12}  accepted multipliers (t=1,2,4,...)")
        ratios = []
        for seed in range(args.seeds):
            start = time.perf_counter()
            base, _, _ = run(problem, seed, use_effopd=False, steps=args.steps, learning_rate=lr, batch=args.batch)
            eff, evals, accepted = run(problem, seed, use_effopd=True, steps=args.steps, learning_rate=lr, batch=args.batch)
            target = float(base[args.target_step - 1])
            n_base = first_step_at_or_below(base, target)
            n_eff = first_step_at_or_below(eff, target)
            ratio = n_base / n_eff if n_eff else float("nan")
            if n_eff:
                ratios.append(ratio)
            print(f"{seed:>4} {target:>10.5f} {n_base:>10} {str(n_eff or 'not reached'):>12} {ratio:>6.2f} "
                  f"{evals:>9} {base[-1]:>10.5f} {eff[-1]:>12.5f}  {[f'{m:g}' for m in accepted]}"
                  f"  ({time.perf_counter() - start:.1f}s)")
        if ratios:
            print(f"[{name}] speed-up (baseline steps / EffOPD steps): mean {np.mean(ratios):.2f}, "
                  f"min {np.min(ratios):.2f}, max {np.max(ratios):.2f} over {len(ratios)} seeds")


if __name__ == "__main__":
    main()
