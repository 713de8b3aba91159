"""Tests for effopd_jax.losses against independent float64 numpy / torch references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from effopd_jax import losses

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ----------------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_reverse_kl(student_logits, teacher_logits) -> np.ndarray:
    ls, lt = np_log_softmax(student_logits), np_log_softmax(teacher_logits)
    return (np.exp(ls) * (ls - lt)).sum(-1)


def np_topk_reverse_kl(student_logits, teacher_logits, k) -> np.ndarray:
    """Coarse-grained KL built by explicitly summing probabilities into k + 1 buckets."""
    ls, lt = np_log_softmax(student_logits), np_log_softmax(teacher_logits)
    ps, pt = np.exp(ls), np.exp(lt)
    order = np.argsort(-ls, axis=-1, kind="stable")
    top = order[..., :k]
    ps_top, pt_top = np.take_along_axis(ps, top, -1), np.take_along_axis(pt, top, -1)
    kl = (ps_top * (np.log(ps_top) - np.log(pt_top))).sum(-1)
    if k < ls.shape[-1]:
        tail = order[..., k:]
        ps_tail = np.take_along_axis(ps, tail, -1).sum(-1)
        pt_tail = np.take_along_axis(pt, tail, -1).sum(-1)
        kl = kl + ps_tail * (np.log(ps_tail) - np.log(pt_tail))
    return kl


def np_aggregation_weights(mask: np.ndarray, aggregation: str) -> np.ndarray:
    """c[i, t] such that the aggregated loss is sum_it c_it * l_it."""
    m = mask.astype(np.float64)
    n = m.sum(-1, keepdims=True)
    num_seqs = max((n > 0).sum(), 1)
    if aggregation == "token-mean":
        return m / max(m.sum(), 1)
    if aggregation == "seq-mean-token-mean":
        return m / np.maximum(n, 1) / num_seqs
    return m / num_seqs


def gather(logits, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]


def random_problem(seed=0, batch=3, seq=7, vocab=11):
    """Logits, tokens and a mask with prompt (leading) and padding (trailing) zeros."""
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (batch, seq, vocab)).astype(np.float32)
    teacher = rng.normal(0, 2, (batch, seq, vocab)).astype(np.float32)
    base = rng.normal(0, 2, (batch, seq, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = np.zeros((batch, seq), bool)
    for i in range(batch):
        start = i % 3
        end = seq - (2 * i) % 4
        mask[i, start:end] = True
    return student, teacher, base, tokens, mask


# ----------------------------------------------------------------------------------------------
# token_reverse_kl
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["random", "extreme"])
def test_token_reverse_kl_matches_numpy_and_torch(scale):
    rng = np.random.default_rng(1)
    shape = (2, 5, 257)
    if scale == "random":
        s = rng.normal(0, 3, shape).astype(np.float32)
        t = rng.normal(0, 3, shape).astype(np.float32)
    else:  # logits at +-50: log-probs down to ~-100
        s = rng.choice([-50.0, 50.0], shape).astype(np.float32) * rng.uniform(0.5, 1, shape)
        t = rng.choice([-50.0, 50.0], shape).astype(np.float32) * rng.uniform(0.5, 1, shape)
        s, t = s.astype(np.float32), t.astype(np.float32)
    got = np.asarray(jax.jit(losses.token_reverse_kl)(s, t))
    assert got.dtype == np.float32 and got.shape == shape[:2]
    ref_np = np_reverse_kl(s, t)
    ts, tt = torch.from_numpy(s).double(), torch.from_numpy(t).double()
    ref_torch = (
        torch.nn.functional.kl_div(
            torch.log_softmax(tt, -1), torch.log_softmax(ts, -1), reduction="none",
            log_target=True,
        )
        .sum(-1)
        .numpy()
    )
    np.testing.assert_allclose(ref_np, ref_torch, rtol=1e-12)
    assert ref_np.min() > 0.1  # the references are not degenerate
    np.testing.assert_allclose(got, ref_np, rtol=1e-5)
    np.testing.assert_allclose(got, ref_torch, rtol=1e-5)


def test_token_reverse_kl_gradient_is_analytic():
    # d KL / d z_s = p_s * (log p_s - log p_t - KL); d KL / d z_t = p_t - p_s.
    s, t, *_ = random_problem(seed=2)
    g_s, g_t = jax.grad(lambda a, b: losses.token_reverse_kl(a, b).sum(), argnums=(0, 1))(s, t)
    ls, lt = np_log_softmax(s), np_log_softmax(t)
    ps, pt = np.exp(ls), np.exp(lt)
    kl = (ps * (ls - lt)).sum(-1, keepdims=True)
    np.testing.assert_allclose(g_s, ps * (ls - lt - kl), atol=2e-6)
    np.testing.assert_allclose(g_t, pt - ps, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# sampled_token_opd_loss: values and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_sampled_loss_gradient_is_the_policy_gradient(aggregation):
    student, teacher, base, tokens, mask = random_problem(seed=3)
    rng = np.random.default_rng(4)
    reward_scale, threshold = 1.25, 1.5
    s_np = np.take_along_axis(np_log_softmax(student), tokens[..., None], -1)[..., 0]
    t_np = np.take_along_axis(np_log_softmax(teacher), tokens[..., None], -1)[..., 0]
    b_np = np.take_along_axis(np_log_softmax(base), tokens[..., None], -1)[..., 0]
    behaviour = (s_np + rng.normal(0, 0.7, s_np.shape)).astype(np.float32)

    def loss_fn(logits):
        return losses.sampled_token_opd_loss(
            gather(logits, tokens), gather(teacher, tokens), mask,
            base_logprobs=gather(base, tokens), reward_scale=reward_scale,
            behaviour_logprobs=behaviour, is_threshold=threshold, aggregation=aggregation,
        )

    (loss, _), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(student)

    advantage = reward_scale * (t_np - b_np) - (s_np - b_np)
    weight = np.minimum(np.exp(s_np - behaviour), threshold)
    assert (weight[mask] == threshold).any() and (weight[mask] < threshold).any()
    coef = np_aggregation_weights(mask, aggregation)
    expected_loss = np.sum(coef * -weight * advantage)
    onehot = np.eye(student.shape[-1])[tokens]
    probs = np.exp(np_log_softmax(student))
    expected_grad = (-coef * weight * advantage)[..., None] * (onehot - probs)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6, rtol=1e-4)
    assert np.all(np.asarray(grad)[~mask] == 0.0)


def test_reward_scale_one_with_base_equals_standard_opd():
    student, teacher, base, tokens, mask = random_problem(seed=5)
    s, t, b = gather(student, tokens), gather(teacher, tokens), gather(base, tokens)

    def standard(s_):
        return losses.sampled_token_opd_loss(s_, t, mask)[0]

    def with_base(s_):
        return losses.sampled_token_opd_loss(s_, t, mask, base_logprobs=b, reward_scale=1.0)[0]

    v1, g1 = jax.value_and_grad(standard)(s)
    v2, g2 = jax.value_and_grad(with_base)(s)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-7)
    # ...and reward_scale != 1 actually changes it (the test above is not vacuous).
    v3 = losses.sampled_token_opd_loss(s, t, mask, base_logprobs=b, reward_scale=1.25)[0]
    assert abs(float(v3) - float(v1)) > 1e-3


def test_aggregation_modes_hand_computed():
    # Per-token losses (on-policy, w = 1): l = -(T - s) = s - T.
    token_losses = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    s = np.full_like(token_losses, -1.0)
    t = s - token_losses
    expected = {"token-mean": 10 / 4, "seq-mean-token-mean": (2 + 4) / 2,
                "seq-mean-token-sum": (6 + 4) / 2}
    for aggregation, value in expected.items():
        loss, metrics = losses.sampled_token_opd_loss(s, t, mask, aggregation=aggregation)
        np.testing.assert_allclose(loss, value, rtol=1e-6)
        np.testing.assert_allclose(
            losses.aggregate_token_losses(token_losses, mask, aggregation), value, rtol=1e-6
        )
    np.testing.assert_allclose(metrics["sampled_reverse_kl"], 2.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["advantage_mean"], -2.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["advantage_std"], np.std([1, 2, 3, 4]), rtol=1e-6)
    np.testing.assert_allclose(metrics["num_tokens"], 4.0)
    np.testing.assert_allclose(metrics["is_weight_mean"], 1.0)
    np.testing.assert_allclose(metrics["is_weight_max"], 1.0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregation_weights_split_over_row_groups_give_the_whole_batch_loss(aggregation):
    """sum(weights * l) / normaliser == aggregate_token_losses, and == the numpy weights; summed
    over any split of the rows (micro-batches) it is still the whole batch's loss and gradient."""
    rng = np.random.default_rng(3)
    token_losses = rng.normal(size=(6, 5)).astype(np.float32)
    mask = rng.random((6, 5)) < 0.6
    mask[2] = False                                   # an empty row
    weights, normaliser = losses.aggregation_weights(jnp.asarray(mask), aggregation)
    np.testing.assert_allclose(np.asarray(weights) / float(normaliser), np_aggregation_weights(mask, aggregation),
                               rtol=1e-6)
    whole = losses.aggregate_token_losses(token_losses, mask, aggregation)
    np.testing.assert_allclose(float(jnp.sum(weights * token_losses) / normaliser), float(whole), rtol=1e-6)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    split = sum(float(jnp.sum(weights[p] * token_losses[p])) for p in parts) / float(normaliser)
    np.testing.assert_allclose(split, float(whole), rtol=1e-6)
    # The sampled-token loss split the same way: terms per part, one normaliser, one metrics pass.
    s = rng.normal(-2, 1, (6, 5)).astype(np.float32)
    t = rng.normal(-2, 1, (6, 5)).astype(np.float32)
    grad_whole = jax.grad(lambda x: losses.sampled_token_opd_loss(x, t, mask, aggregation=aggregation)[0])(s)

    def part_loss(x, p):
        terms, _ = losses.sampled_token_opd_token_terms(x, t[p], mask[p])
        return jnp.sum(weights[p] * terms) / normaliser

    grad_split = np.concatenate([np.asarray(jax.grad(part_loss)(s[p], p)) for p in parts])
    np.testing.assert_allclose(grad_split, np.asarray(grad_whole), rtol=1e-5, atol=1e-7)
    stats = [losses.sampled_token_opd_token_terms(s[p], t[p], mask[p])[1] for p in parts]
    joined = {k: jnp.concatenate([st[k] for st in stats]) for k in stats[0]}
    expected = losses.sampled_token_opd_loss(s, t, mask, aggregation=aggregation)[1]
    got = losses.sampled_token_opd_metrics(joined, mask)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(float(got[key]), float(expected[key]), rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padding_changes_nothing(aggregation):
    student, teacher, base, tokens, mask = random_problem(seed=6)
    s, t, b = (np.asarray(gather(x, tokens)) for x in (student, teacher, base))
    behaviour = s + 0.3

    def run(s_, t_, b_, beh_, m_):
        def f(x):
            return losses.sampled_token_opd_loss(
                x, t_, m_, base_logprobs=b_, reward_scale=1.25, behaviour_logprobs=beh_,
                aggregation=aggregation, discount=0.5,
            )
        return jax.value_and_grad(f, has_aux=True)(s_)

    (v0, m0), g0 = run(s, t, b, behaviour, mask)

    # Three extra padded columns and one extra all-padding row, all filled with garbage.
    def pad(x, fill):
        x = np.concatenate([x, np.full((x.shape[0], 3), fill, x.dtype)], 1)
        return np.concatenate([x, np.full((1, x.shape[1]), fill, x.dtype)], 0)

    (v1, m1), g1 = run(pad(s, np.nan), pad(t, np.inf), pad(b, -1e30), pad(behaviour, np.nan),
                       pad(mask, False))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for key in m0:
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6, err_msg=key)
    g1 = np.asarray(g1)
    np.testing.assert_allclose(g1[: s.shape[0], : s.shape[1]], g0, rtol=1e-6, atol=1e-8)
    assert np.all(g1[-1] == 0) and np.all(g1[:, -3:] == 0)


def test_all_masked_gives_zero_not_nan():
    s = np.full((2, 4), np.nan, np.float32)
    mask = np.zeros((2, 4), bool)
    for aggregation in AGGREGATIONS:
        (loss, metrics), grad = jax.value_and_grad(
            lambda x: losses.sampled_token_opd_loss(x, s, mask, behaviour_logprobs=s,
                                                    aggregation=aggregation),
            has_aux=True,
        )(s)
        assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
        assert all(np.isfinite(v) for v in metrics.values())
        assert float(metrics["num_tokens"]) == 0.0


def test_importance_weight_truncation():
    s = np.array([[-1.0, -2.0, -3.0, -4.0, -0.5]], np.float32)
    t = np.array([[-1.5, -1.0, -3.5, -2.0, -0.7]], np.float32)
    # log-ratios s - behaviour: -1, 0, 1, 3 (exp 20.1 > 5), 200 (clamped at 20, then 5).
    behaviour = s - np.array([[-1.0, 0.0, 1.0, 3.0, 200.0]], np.float32)
    mask = np.ones_like(s, bool)
    expected_w = np.minimum(np.exp(np.array([-1.0, 0.0, 1.0, 3.0, 20.0])), 5.0)
    advantage = (t - s)[0]

    def f(x, threshold):
        return losses.sampled_token_opd_loss(x, t, mask, behaviour_logprobs=behaviour,
                                             is_threshold=threshold, aggregation="token-mean")

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(s, 5.0)
    np.testing.assert_allclose(loss, np.mean(-expected_w * advantage), rtol=1e-6)
    # The weight is a constant: d loss / d s = -w A / n, with no d w / d s term.
    np.testing.assert_allclose(grad[0], -expected_w * advantage / 5, rtol=1e-6)
    np.testing.assert_allclose(metrics["is_weight_max"], 5.0)
    np.testing.assert_allclose(metrics["is_weight_mean"], expected_w.mean(), rtol=1e-6)
    # No truncation: the clamp at +-20 still keeps it finite.
    (loss, metrics), _ = jax.value_and_grad(f, has_aux=True)(s, None)
    np.testing.assert_allclose(metrics["is_weight_max"], np.exp(20.0), rtol=1e-5)
    assert np.isfinite(loss)


def test_ppo_clipping_with_old_logprobs():
    eps, dual = 0.2, 3.0
    old = np.full((1, 6), -1.0, np.float32)
    s = old + np.log(np.array([[1.5, 0.5, 1.1, 0.9, 1.5, 5.0]], np.float32))
    t = old + np.array([[1.0, -1.0, 1.0, -1.0, -1.0, -1.0]], np.float32)  # A = T - old
    mask = np.ones_like(s, bool)

    def f(x, dual_clip):
        return losses.sampled_token_opd_loss(
            x, t, mask, old_logprobs=old, clip_eps=eps, dual_clip_ratio=dual_clip,
            aggregation="token-mean",
        )

    ratio = np.exp((s - old)[0])
    adv = (t - old)[0]
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    # Tokens 0 (A>0, rho>1+eps) and 1 (A<0, rho<1-eps) are clipped: no gradient there.
    grad_unclipped = -adv * ratio / 6
    expected_grad = np.where([False, False, True, True, True, True], grad_unclipped, 0.0)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(s, None)
    np.testing.assert_allclose(loss, per_token.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad[0], expected_grad, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(metrics["clip_fraction"], 2 / 6, rtol=1e-6)
    # Dual clip bounds token 5 (A<0, rho=5 > c=3) at -A*c and removes its gradient.
    per_token_dual = per_token.copy()
    per_token_dual[5] = min(per_token[5], -adv[5] * dual)
    assert per_token_dual[5] < per_token[5]
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(s, dual)
    np.testing.assert_allclose(loss, per_token_dual.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad[0, 5], 0.0)
    np.testing.assert_allclose(metrics["clip_fraction"], 3 / 6, rtol=1e-6)
    # With s == old (first update on a rollout) the clipped loss equals the on-policy loss.
    on_policy = losses.sampled_token_opd_loss(old, t, mask, aggregation="token-mean")[0]
    np.testing.assert_allclose(f(old, dual)[0], on_policy, rtol=1e-6)


def test_discounted_reward_to_go_hand_computed():
    s = np.zeros((1, 5), np.float32)
    t = np.array([[9.0, 1.0, 9.0, 2.0, 3.0]], np.float32)  # rewards T - s
    mask = np.array([[0, 1, 0, 1, 1]], bool)  # position 2 is masked: skipped, not discounted
    _, metrics = losses.sampled_token_opd_loss(s, t, mask, discount=0.5)
    returns = np.array([1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0])
    np.testing.assert_allclose(metrics["advantage_mean"], returns.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["advantage_std"], returns.std(), rtol=1e-6)


def test_invalid_arguments_raise():
    x = np.zeros((2, 3), np.float32)
    m = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        losses.sampled_token_opd_loss(x, np.zeros((2, 4)), m)
    with pytest.raises(ValueError, match="aggregation"):
        losses.sampled_token_opd_loss(x, x, m, aggregation="mean")
    with pytest.raises(ValueError, match="reward_scale"):
        losses.sampled_token_opd_loss(x, x, m, reward_scale=1.25)
    with pytest.raises(ValueError, match="old_logprobs"):
        losses.sampled_token_opd_loss(x, x, m, clip_eps=0.2)
    with pytest.raises(ValueError, match="discount"):
        losses.sampled_token_opd_loss(x, x, m, discount=1.5)
    logits = np.zeros((2, 3, 7), np.float32)
    with pytest.raises(ValueError, match="`k`"):
        losses.token_topk_reverse_kl(logits, logits, 8)
    with pytest.raises(ValueError, match="lm_head_weight"):
        losses.chunked_token_logprobs(np.zeros((2, 3, 4)), np.zeros((5, 7)), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="vocab"):
        losses.chunked_reverse_kl(np.zeros((2, 3, 4)), np.zeros((4, 7)), np.zeros((2, 3, 6)),
                                  np.zeros((6, 8)))


# ----------------------------------------------------------------------------------------------
# Monte Carlo: the sampled-token estimator vs exact gradients on a tiny sequence problem
# ----------------------------------------------------------------------------------------------

MC_VOCAB = 5
MC_SAMPLES = 200_000


def _mc_setup():
    rng = np.random.default_rng(7)
    student = {  # tabular policy over 2 tokens: pi(y1) and pi(y2 | y1)
        "first": rng.normal(0, 1.5, MC_VOCAB).astype(np.float32),
        "second": rng.normal(0, 1.5, (MC_VOCAB, MC_VOCAB)).astype(np.float32),
    }
    teacher_first = jax.nn.log_softmax(rng.normal(0, 1.5, MC_VOCAB).astype(np.float32))
    teacher_second = jax.nn.log_softmax(rng.normal(0, 1.5, (MC_VOCAB,) * 2).astype(np.float32))
    return student, teacher_first, teacher_second


def _sequence_logprobs(params, y1, y2):
    first = jax.nn.log_softmax(params["first"])[y1]
    second = jnp.take_along_axis(jax.nn.log_softmax(params["second"][y1], -1), y2[:, None], -1)
    second = second[:, 0]
    return jnp.stack([first, second], -1)


def _mc_per_sample_grads(params, teacher_first, teacher_second, discount):
    key1, key2 = jax.random.split(jax.random.key(8))
    y1 = jax.random.categorical(key1, params["first"], shape=(MC_SAMPLES,))
    y2 = jax.random.categorical(key2, params["second"][y1])
    teacher = jnp.stack([teacher_first[y1], teacher_second[y1, y2]], -1)

    def one_sample_loss(p, a, b, t):
        s = _sequence_logprobs(p, a[None], b[None])
        return losses.sampled_token_opd_loss(
            s, t[None], jnp.ones((1, 2), bool), discount=discount,
            aggregation="seq-mean-token-sum",
        )[0]

    grads = jax.jit(jax.vmap(jax.grad(one_sample_loss), in_axes=(None, 0, 0, 0)))(
        params, y1, y2, teacher
    )
    flat = jnp.concatenate([grads["first"], grads["second"].reshape(MC_SAMPLES, -1)], -1)
    flat = np.asarray(flat, np.float64)
    return flat.mean(0), flat.std(0, ddof=1) / np.sqrt(MC_SAMPLES)


def _flatten(g):
    return np.concatenate([np.asarray(g["first"]), np.asarray(g["second"]).ravel()])


def _exact_grads(params, teacher_first, teacher_second):
    def sequence_kl(p):
        log_first = jax.nn.log_softmax(p["first"])
        log_second = jax.nn.log_softmax(p["second"], -1)
        log_joint = log_first[:, None] + log_second
        teacher_joint = teacher_first[:, None] + teacher_second
        return jnp.sum(jnp.exp(log_joint) * (log_joint - teacher_joint))

    def prefix_frozen_kl(p):
        # sum_t E_{y_<t ~ sg(pi)} KL(pi(.|y_<t) || T(.|y_<t)): the prefix law gets no gradient.
        log_first = jax.nn.log_softmax(p["first"])
        log_second = jax.nn.log_softmax(p["second"], -1)
        kl_first = jnp.sum(jnp.exp(log_first) * (log_first - teacher_first))
        kl_second = jnp.sum(jnp.exp(log_second) * (log_second - teacher_second), -1)
        return kl_first + jnp.sum(jax.lax.stop_gradient(jnp.exp(log_first)) * kl_second)

    return _flatten(jax.grad(sequence_kl)(params)), _flatten(jax.grad(prefix_frozen_kl)(params))


def test_monte_carlo_gradient_matches_exact_reverse_kl():
    """Tolerance: every one of the 30 gradient components within 5 standard errors.

    With N = 200k samples and a fixed seed; under a Gaussian approximation a false failure has
    probability < 30 * 6e-7 per run. The standard errors are also asserted to be small next to
    the gradient, so the test can detect a wrong estimator.
    """
    params, teacher_first, teacher_second = _mc_setup()
    exact_sequence, exact_prefix_frozen = _exact_grads(params, teacher_first, teacher_second)
    scale = np.abs(exact_sequence).max()

    # Reward-to-go (discount = 1): unbiased for the sequence-level reverse KL.
    mean, se = _mc_per_sample_grads(params, teacher_first, teacher_second, discount=1.0)
    assert se.max() < 0.02 * scale
    np.testing.assert_array_less(np.abs(mean - exact_sequence), 5 * se + 1e-6)

    # The authors' immediate advantage (discount = 0): unbiased for the prefix-frozen
    # per-token KL sum...
    mean0, se0 = _mc_per_sample_grads(params, teacher_first, teacher_second, discount=0.0)
    assert se0.max() < 0.02 * scale
    np.testing.assert_array_less(np.abs(mean0 - exact_prefix_frozen), 5 * se0 + 1e-6)
    # ...which differs from the sequence-level gradient on the first token's logits (it omits
    # the E[KL_2(y1) grad log pi(y1)] term); the gap is far outside the noise.
    gap = np.abs(exact_sequence - exact_prefix_frozen)[:MC_VOCAB]
    assert (gap > 20 * se0[:MC_VOCAB]).any()
    np.testing.assert_allclose(exact_sequence[MC_VOCAB:], exact_prefix_frozen[MC_VOCAB:],
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# top-k + tail reverse KL
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 40, 64])
def test_topk_reverse_kl_properties(k):
    rng = np.random.default_rng(9)
    vocab = 64
    s = rng.normal(0, 3, (3, 4, vocab)).astype(np.float32)
    t = rng.normal(0, 3, (3, 4, vocab)).astype(np.float32)
    coarse = np.asarray(jax.jit(losses.token_topk_reverse_kl, static_argnums=2)(s, t, k))
    exact = np.asarray(losses.token_reverse_kl(s, t))
    np.testing.assert_allclose(coarse, np_topk_reverse_kl(s, t, k), rtol=1e-5, atol=1e-6)
    assert np.all(coarse >= -1e-6)
    if k == vocab:
        np.testing.assert_allclose(coarse, exact, rtol=1e-5)
    else:
        assert np.all(coarse <= exact * (1 + 1e-5) + 1e-6)
        assert np.any(exact - coarse > 1e-3)  # strictly coarser for some positions


def test_topk_tail_is_accurate_when_tiny():
    # The student's top-2 tokens hold all but ~1e-12 of its mass. In float32 the log-mass of the
    # top-2 set rounds to 0 (or slightly above), so a tail computed as log(1 - sum p_top) would be
    # log(0) = -inf (or NaN) and the tail term 0 * -inf = NaN. The logsumexp over the complement
    # stays finite and exact.
    vocab = 10
    s = np.full((1, 1, vocab), -30.0, np.float32)
    s[..., :2] = [1.0, 0.5]
    t = np.linspace(-2.0, 2.0, vocab, dtype=np.float32)[None, None]
    ls = np_log_softmax(s)[0, 0]
    assert 1e-14 < np.exp(ls[2:]).sum() < 1e-10
    value, grad = jax.value_and_grad(lambda x: losses.token_topk_reverse_kl(x, t, 2)[0, 0])(s)
    np.testing.assert_allclose(value, np_topk_reverse_kl(s, t, 2)[0, 0], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))
    # For k < vocab the tail bucket's student gradient is p_tail-weighted: tiny but finite.
    np.testing.assert_allclose(np.asarray(grad)[0, 0, 2:], 0.0, atol=1e-9)


def test_topk_and_full_losses_gradients_match_finite_differences_and_stop_teacher():
    s, t, _, _, mask = random_problem(seed=10, vocab=9)
    for fn in (
        lambda a, b: losses.full_vocab_reverse_kl_loss(a, b, mask)[0],
        lambda a, b: losses.topk_reverse_kl_loss(a, b, mask, 3)[0],
    ):
        g_s, g_t = jax.grad(fn, argnums=(0, 1))(s, t)
        assert np.all(np.asarray(g_t) == 0.0)
        assert np.all(np.asarray(g_s)[~mask] == 0.0)
        # Central directional difference in float32; with step 1e-2 its truncation and
        # rounding errors are well under the 2e-3 relative tolerance.
        direction = np.random.default_rng(11).normal(size=s.shape).astype(np.float32)
        h = 1e-2
        fd = (fn(s + h * direction, t) - fn(s - h * direction, t)) / (2 * h)
        np.testing.assert_allclose(np.sum(np.asarray(g_s) * direction), fd, rtol=2e-3)


def test_full_vocab_loss_value():
    s, t, _, _, mask = random_problem(seed=12)
    for aggregation in AGGREGATIONS:
        loss, metrics = losses.full_vocab_reverse_kl_loss(s, t, mask, aggregation=aggregation)
        per_token = np_reverse_kl(s, t)
        expected = np.sum(np_aggregation_weights(mask, aggregation) * per_token)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        np.testing.assert_allclose(metrics["reverse_kl"], per_token[mask].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# chunked path
# ----------------------------------------------------------------------------------------------


def _hidden_problem(seed=13, batch=2, seq=13, hidden=16, vocab=97, teacher_hidden=24):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0, 1, (batch, seq, hidden)).astype(np.float32),
        rng.normal(0, 0.5, (hidden, vocab)).astype(np.float32),
        rng.normal(0, 1, (batch, seq, teacher_hidden)).astype(np.float32),
        rng.normal(0, 0.5, (teacher_hidden, vocab)).astype(np.float32),
        rng.integers(0, vocab, (batch, seq)).astype(np.int32),
        rng.normal(size=(batch, seq)).astype(np.float32),  # cotangent weights
    )


# (chunk_size, vocab_block_size): seq 13 and vocab 97 are prime, so chunks are padded and the
# last vocab block overlaps the previous one.
@pytest.mark.parametrize("chunk_size,vocab_block_size", [(1, 8192), (4, 10), (13, 97), (32, 30)])
def test_chunked_token_logprobs_matches_unchunked(chunk_size, vocab_block_size):
    h, w, _, _, tokens, cot = _hidden_problem()

    def chunked(h_, w_):
        out = losses.chunked_token_logprobs(h_, w_, tokens, chunk_size=chunk_size,
                                            vocab_block_size=vocab_block_size, temperature=0.7)
        return jnp.sum(out * cot), out

    def unchunked(h_, w_):
        out = losses.token_logprobs(h_ @ w_, tokens, temperature=0.7)
        return jnp.sum(out * cot), out

    (_, v1), g1 = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(h, w)
    (_, v2), g2 = jax.value_and_grad(unchunked, (0, 1), has_aux=True)(h, w)
    ref = np.take_along_axis(np_log_softmax((h.astype(np.float64) @ w) / 0.7),
                             tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(v2, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [None, 5, 97])
def test_chunked_reverse_kl_matches_unchunked(topk):
    hs, ws, ht, wt, _, cot = _hidden_problem()

    def chunked(hs_, ws_, ht_, wt_):
        out = losses.chunked_reverse_kl(hs_, ws_, ht_, wt_, chunk_size=5, vocab_block_size=20,
                                        topk=topk)
        return jnp.sum(out * cot), out

    def unchunked(hs_, ws_, ht_, wt_):
        t_logits = jax.lax.stop_gradient(ht_ @ wt_)
        if topk is None:
            out = losses.token_reverse_kl(hs_ @ ws_, t_logits)
        else:
            out = losses.token_topk_reverse_kl(hs_ @ ws_, t_logits, topk)
        return jnp.sum(out * cot), out

    (_, v1), g1 = jax.jit(jax.value_and_grad(chunked, (0, 1, 2, 3), has_aux=True))(hs, ws, ht, wt)
    (_, v2), g2 = jax.value_and_grad(unchunked, (0, 1, 2, 3), has_aux=True)(hs, ws, ht, wt)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1[0], g2[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1[1], g2[1], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g1[2]) == 0) and np.all(np.asarray(g1[3]) == 0)
    assert np.abs(np.asarray(g1[0])).max() > 1e-3  # the student does get a gradient


def test_chunked_path_never_materialises_full_logits():
    """XLA's own buffer assignment for forward + backward (compile only, nothing runs).

    The chunked paths need far less scratch than one [batch, seq, vocab] float32 logits array
    (the naive path needs more than that), and less than one extra [hidden, vocab] buffer: the
    lm_head gradient is accumulated in place, block by block.
    """
    batch, seq, hidden, vocab, chunk, block = 1, 512, 256, 4096, 32, 512
    h = jax.ShapeDtypeStruct((batch, seq, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((hidden, vocab), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    full_logits_bytes = batch * seq * vocab * 4
    lm_head_bytes = hidden * vocab * 4

    def temp_bytes(fn, *args):
        grad_fn = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1))
        return jax.jit(grad_fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    naive = temp_bytes(lambda h_, w_, t_: losses.token_logprobs(h_ @ w_, t_), h, w, tokens)
    chunked = temp_bytes(
        lambda h_, w_, t_: losses.chunked_token_logprobs(
            h_, w_, t_, chunk_size=chunk, vocab_block_size=block), h, w, tokens)
    exact_kl = temp_bytes(
        lambda a, b, c, d: losses.chunked_reverse_kl(
            a, b, c, d, chunk_size=chunk, vocab_block_size=block), h, w, h, w)
    topk_kl = temp_bytes(
        lambda a, b, c, d: losses.chunked_reverse_kl(
            a, b, c, d, chunk_size=chunk, vocab_block_size=block, topk=16), h, w, h, w)
    assert naive >= full_logits_bytes
    assert chunked < full_logits_bytes / 4 and chunked < lm_head_bytes / 2
    assert exact_kl < full_logits_bytes / 2 and exact_kl < lm_head_bytes
    # top_k's sort buffers cost a few chunk-sized arrays more; still under one full logits array
    # (the naive top-k KL needs two).
    assert topk_kl < full_logits_bytes


def test_chunked_bfloat16_inputs_compute_in_float32():
    h, w, _, _, tokens, cot = _hidden_problem(seed=14)
    h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def f(h_, w_):
        out = losses.chunked_token_logprobs(h_, w_, tokens, chunk_size=4, vocab_block_size=16)
        return jnp.sum(out * cot), out

    (_, out), (g_h, g_w) = jax.value_and_grad(f, (0, 1), has_aux=True)(h16, w16)
    assert out.dtype == jnp.float32 and g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
    # Reference: the same bf16-rounded inputs, upcast, in float64.
    h64, w64 = np.asarray(h16, np.float64), np.asarray(w16, np.float64)
    ref = np.take_along_axis(np_log_softmax(h64 @ w64), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_chunk_larger_than_sequence_costs_no_extra_lm_head_work():
    # A 512-position chunk on a 33-token response must not project 512 padded positions: the
    # compiled FLOPs equal those of a chunk exactly as long as the sequence.
    h, w, th, tw, tokens, _ = _hidden_problem(seq=33, vocab=4096)

    def flops(fn, chunk_size):
        compiled = jax.jit(lambda *a: fn(*a, chunk_size=chunk_size)).lower(*args[fn]).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        return analysis["flops"]

    logprobs = lambda h_, w_, t_, chunk_size: losses.chunked_token_logprobs(  # noqa: E731
        h_, w_, t_, chunk_size=chunk_size)
    kl = lambda h_, w_, th_, tw_, chunk_size: losses.chunked_reverse_kl(  # noqa: E731
        h_, w_, th_, tw_, chunk_size=chunk_size)
    args = {logprobs: (h, w, tokens), kl: (h, w, th, tw)}
    for fn in (logprobs, kl):
        exact = flops(fn, 33)
        assert flops(fn, 512) == pytest.approx(exact, rel=1e-6)
        # 33 positions in 2 chunks of 17: one padded position, not 31 (chunk 32 padded to 64).
        assert flops(fn, 32) < 1.1 * exact
