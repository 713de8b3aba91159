"""Tests of effopd_jax.monitor against numpy's exact SVD on constructed matrices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

from effopd_jax import models
from effopd_jax import monitor as mon
from effopd_jax.models.qwen import QwenConfig

RNG = np.random.default_rng(0)


def _orthonormal(rows: int, cols: int, rng=RNG) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _with_spectrum(m: int, n: int, sigma: np.ndarray, rng=RNG) -> np.ndarray:
    r = len(sigma)
    return (_orthonormal(m, r, rng) * sigma) @ _orthonormal(n, r, rng).T


def _np_topk_bases(matrix: np.ndarray, k: int):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s, vt[:k].T


# ---------------------------------------------------------------------------------------------
# truncated_svd


def test_randomized_svd_decaying_spectrum_within_1_percent():
    sigma = 10.0 * 0.85 ** np.arange(120)
    a = _with_spectrum(300, 200, sigma)
    k = 10
    res = mon.truncated_svd(jnp.asarray(a, jnp.float32), k, jax.random.PRNGKey(1), method="randomized")
    assert res.u.shape == (300, k) and res.s.shape == (k,) and res.vt.shape == (k, 200)
    u_ref, s_ref, v_ref = _np_topk_bases(a, k)
    np.testing.assert_allclose(np.asarray(res.s), s_ref[:k], rtol=1e-2)
    # Orthonormal bases spanning numpy's top-k subspaces.
    np.testing.assert_allclose(np.asarray(res.u.T @ res.u), np.eye(k), atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.vt @ res.vt.T), np.eye(k), atol=1e-5)
    assert float(mon.subspace_overlap(res.u, jnp.asarray(u_ref, jnp.float32))) > 0.99
    assert float(mon.subspace_overlap(res.vt.T, jnp.asarray(v_ref, jnp.float32))) > 0.99


def test_randomized_svd_low_rank_plus_noise():
    signal = _with_spectrum(256, 160, np.array([10.0, 8.0, 6.0, 5.0, 4.0]))
    a = signal + 0.01 * RNG.standard_normal((256, 160))
    res = mon.truncated_svd(jnp.asarray(a, jnp.float32), 5, jax.random.PRNGKey(2), method="randomized")
    u_ref, s_ref, v_ref = _np_topk_bases(a, 5)
    np.testing.assert_allclose(np.asarray(res.s), s_ref[:5], rtol=1e-3)
    assert float(mon.subspace_overlap(res.u, jnp.asarray(u_ref, jnp.float32))) > 0.999
    # The reconstruction error is the noise floor: ‖A − U S Vᵀ‖_F = sqrt(Σ_{j>5} σ_j²).
    recon = np.asarray((res.u * res.s) @ res.vt)
    np.testing.assert_allclose(np.linalg.norm(a - recon), np.sqrt(np.sum(s_ref[5:] ** 2)), rtol=1e-3)


def test_exact_and_auto_paths_match_numpy():
    a = RNG.standard_normal((40, 24))
    _, s_ref, _ = np.linalg.svd(a)
    for method in ("exact", "auto"):  # auto: min(m, n) = 24 <= 2·(3 + 10) -> exact
        res = mon.truncated_svd(jnp.asarray(a, jnp.float32), 3, jax.random.PRNGKey(0), method=method)
        np.testing.assert_allclose(np.asarray(res.s), s_ref[:3], rtol=1e-5)
        np.testing.assert_allclose(np.asarray((res.u * res.s) @ res.vt),
                                   _np_rank_k(a, 3), atol=1e-4)


def _np_rank_k(a, k):
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_truncated_svd_bf16_input_computed_in_float32():
    a = _with_spectrum(128, 96, 2.0 ** -np.arange(30))
    res = mon.truncated_svd(jnp.asarray(a, jnp.bfloat16), 4, jax.random.PRNGKey(0), method="randomized")
    assert res.s.dtype == jnp.float32
    _, s_ref, _ = np.linalg.svd(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64))
    np.testing.assert_allclose(np.asarray(res.s), s_ref[:4], rtol=1e-3)


@pytest.mark.parametrize("k", [0, 25, 100])
def test_truncated_svd_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k="):
        mon.truncated_svd(jnp.ones((40, 24)), k, jax.random.PRNGKey(0))


def test_truncated_svd_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        mon.truncated_svd(jnp.ones((4, 5, 6)), 2, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="method"):
        mon.truncated_svd(jnp.ones((8, 8)), 2, jax.random.PRNGKey(0), method="lanczos")
    with pytest.raises(ValueError, match="power_iters"):
        mon.truncated_svd(jnp.ones((8, 8)), 2, jax.random.PRNGKey(0), power_iters=-1)


def test_truncated_svd_jit_and_vmap_over_layers():
    mats = np.stack([_with_spectrum(160, 120, (i + 1) * 0.7 ** np.arange(60)) for i in range(3)])
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    fn = jax.jit(jax.vmap(lambda a, key: mon.truncated_svd(a, 6, key, method="randomized")))
    res = fn(jnp.asarray(mats, jnp.float32), keys)
    assert res.u.shape == (3, 160, 6) and res.s.shape == (3, 6) and res.vt.shape == (3, 6, 120)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(res.s[i]), np.linalg.svd(mats[i], compute_uv=False)[:6], rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# metrics


def test_effective_rank_exact_on_diagonal_matrices():
    diag = np.array([5.0, 3.0, 2.0, 0.0])
    p = diag / diag.sum()
    expected = math.exp(-sum(x * math.log(x) for x in p if x > 0))
    s = mon.singular_values(jnp.asarray(np.diag(diag), jnp.float32))
    np.testing.assert_allclose(float(mon.effective_rank(s)), expected, rtol=1e-6)
    assert float(mon.effective_rank(jnp.ones(7))) == pytest.approx(7.0, rel=1e-6)
    assert float(mon.effective_rank(jnp.array([2.0, 0.0, 0.0]))) == pytest.approx(1.0, rel=1e-6)
    assert float(mon.effective_rank(jnp.zeros(4))) == 0.0
    batched = mon.effective_rank(jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(batched), [2.0, 3.0], rtol=1e-6)


def test_energy_ratio_exact_on_diagonal_matrices():
    s = mon.singular_values(jnp.diag(jnp.array([1.0, 4.0, 2.0, 3.0])))
    assert float(mon.energy_ratio(s, 2)) == pytest.approx((16 + 9) / 30, rel=1e-6)
    # Unsorted input: the k largest are used.
    assert float(mon.energy_ratio(jnp.array([1.0, 4.0, 2.0, 3.0]), 1)) == pytest.approx(16 / 30, rel=1e-6)
    # Truncated spectrum with the exact denominator.
    assert float(mon.energy_ratio(jnp.array([4.0, 3.0]), 2, total_energy=50.0)) == pytest.approx(0.5)
    assert float(mon.energy_ratio(jnp.zeros(3), 2)) == 0.0
    with pytest.raises(ValueError, match="k="):
        mon.energy_ratio(s, 5)


def test_subspace_overlap_identical_orthogonal_and_known_angle():
    m = 10
    eye = np.eye(m)
    basis = _orthonormal(m, 3)
    rotation = _orthonormal(3, 3)
    assert float(mon.subspace_overlap(jnp.asarray(basis), jnp.asarray(basis @ rotation))) == pytest.approx(1.0, abs=1e-6)
    assert float(mon.subspace_overlap(jnp.asarray(eye[:, :2]), jnp.asarray(eye[:, 2:4]))) == pytest.approx(0.0, abs=1e-7)
    theta = 0.4
    u_a = eye[:, :2]
    u_b = np.stack([math.cos(theta) * eye[:, 0] + math.sin(theta) * eye[:, 5], eye[:, 1]], axis=1)
    expected = (math.cos(theta) ** 2 + 1.0) / 2
    assert float(mon.subspace_overlap(jnp.asarray(u_a), jnp.asarray(u_b))) == pytest.approx(expected, rel=1e-6)
    # Independent reference: mean cos² of the principal angles from numpy's SVD of U_aᵀU_b.
    other = _orthonormal(m, 3, np.random.default_rng(5))
    cosines = np.linalg.svd(basis.T @ other, compute_uv=False)
    assert float(mon.subspace_overlap(jnp.asarray(basis), jnp.asarray(other))) == pytest.approx(np.mean(cosines**2), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        mon.subspace_overlap(jnp.ones((10, 2)), jnp.ones((10, 3)))


# ---------------------------------------------------------------------------------------------
# rank-k reconstruction


def test_rank_k_update_matches_numpy_and_preserves_norm():
    w0 = RNG.standard_normal((48, 32))
    delta = _with_spectrum(48, 32, np.array([3.0, 1.0, 0.5, 0.2]))
    wt = w0 + delta
    for alpha in (1.0, 1.7):
        out = np.asarray(mon.rank_k_update(jnp.asarray(w0), jnp.asarray(wt), 2, jax.random.PRNGKey(0), alpha=alpha, method="exact"))
        delta_k = _np_rank_k(delta, 2)
        expected = w0 + alpha * np.linalg.norm(delta) / np.linalg.norm(delta_k) * delta_k
        np.testing.assert_allclose(out, expected, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(out - w0), alpha * np.linalg.norm(delta), rtol=1e-5)
    # Randomized path: still exactly norm-preserving; an exactly rank-4 update is recovered.
    out = np.asarray(mon.rank_k_update(jnp.asarray(w0), jnp.asarray(wt), 1, jax.random.PRNGKey(1), method="randomized"))
    np.testing.assert_allclose(np.linalg.norm(out - w0), np.linalg.norm(delta), rtol=1e-5)
    out = np.asarray(mon.rank_k_update(jnp.asarray(w0), jnp.asarray(wt), 4, jax.random.PRNGKey(1), method="exact"))
    np.testing.assert_allclose(out, wt, atol=1e-4)
    # No update: W' = W_0 (no division by zero).
    same = mon.rank_k_update(jnp.asarray(w0), jnp.asarray(w0), 2, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(same), w0, atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        mon.rank_k_update(jnp.ones((4, 5)), jnp.ones((5, 4)), 1, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# params-tree metrics and the live hook

HIDDEN, Q_DIM, KV_DIM, INTER, LAYERS = 24, 32, 16, 40, 3
SHAPES = {
    "self_attn/q_proj": (HIDDEN, Q_DIM), "self_attn/k_proj": (HIDDEN, KV_DIM),
    "self_attn/v_proj": (HIDDEN, KV_DIM), "self_attn/o_proj": (Q_DIM, HIDDEN),
    "mlp/gate_proj": (HIDDEN, INTER), "mlp/up_proj": (HIDDEN, INTER), "mlp/down_proj": (INTER, HIDDEN),
}


# A Qwen2-style config with exactly these matrix shapes (q/k/v biases, tied embeddings).
CONFIG = QwenConfig(vocab_size=50, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                    qkv_bias=True, o_proj_bias=False, qk_norm=False, model_type="qwen2")
LAYOUT = models.layout(CONFIG)
SCANNED_LAYOUT = models.layout(dataclasses.replace(CONFIG, scan_layers=True))


def _params(seed=0):
    """Every leaf of CONFIG's (unscanned) params tree drawn from N(0, 1)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32),
                        models.abstract_params(CONFIG))


def _perturb(params, seed, scale=0.1):
    """W_t = W_0 + a rank-2 + small full-rank update in every kernel, and changed norms/embeds."""
    rng = np.random.default_rng(seed)

    def bump(path, x):
        if x.ndim == 2 and jax.tree_util.keystr(path).endswith("['kernel']"):
            m, n = x.shape
            low = _with_spectrum(m, n, np.array([2.0, 1.0]) * scale, rng)
            return x + jnp.asarray(low + 0.01 * scale * rng.standard_normal((m, n)), x.dtype)
        return x + 0.5

    return jax.tree_util.tree_map_with_path(bump, params)


def _scan(params):
    layers = [params[f"layers_{i}"] for i in range(LAYERS)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def _np_reference(p0, pt, k):
    """Per (module, layer) numpy metrics in HF orientation [out, in]."""
    ref = {}
    for name in SHAPES:
        for i in range(LAYERS):
            g, proj = name.split("/")
            w0 = np.asarray(p0[f"layers_{i}"][g][proj]["kernel"], np.float64)
            wt = np.asarray(pt[f"layers_{i}"][g][proj]["kernel"], np.float64)
            d = (wt - w0).T
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            p = s / s.sum()
            ref[name, i] = dict(
                update_norm=np.linalg.norm(d), rel_update=np.linalg.norm(d) / np.linalg.norm(w0),
                energy=np.sum(s[:k] ** 2) / np.sum(d**2), erank=np.exp(-np.sum(p * np.log(p))),
                u=u[:, :k], v=vt[:k].T,
            )
    return ref


@pytest.mark.parametrize("scanned", [False, True])
def test_monitor_step_matches_numpy(scanned):
    k = 2
    p0 = _params()
    p1, p2 = _perturb(p0, 1), _perturb(_perturb(p0, 1), 2, scale=0.05)
    conv = _scan if scanned else (lambda x: x)
    layout = SCANNED_LAYOUT if scanned else LAYOUT
    config = mon.MonitorConfig(k=k, full_spectrum=True)
    state = mon.init_monitor_state(conv(p0), layout)
    state, first = mon.monitor_step(state, conv(p1), jax.random.PRNGKey(0), config=config, layout=layout)
    assert not any("overlap" in key for key in first)
    state, second = mon.monitor_step(state, conv(p2), jax.random.PRNGKey(1), config=config, layout=layout)
    ref1, ref2 = _np_reference(p0, p1, k), _np_reference(p0, p2, k)
    for name in SHAPES:
        for i in range(LAYERS):
            base = f"monitor/layers_{i}/{name}"
            r = ref2[name, i]
            for metric in ("update_norm", "rel_update", "erank"):
                np.testing.assert_allclose(float(second[f"{base}/{metric}"]), r[metric], rtol=2e-4, err_msg=f"{base}/{metric}")
            np.testing.assert_allclose(float(second[f"{base}/energy_top2"]), r["energy"], rtol=2e-4)
            left = np.sum((ref1[name, i]["u"].T @ r["u"]) ** 2) / k
            right = np.sum((ref1[name, i]["v"].T @ r["v"]) ** 2) / k
            np.testing.assert_allclose(float(second[f"{base}/overlap_left"]), left, rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(float(second[f"{base}/overlap_right"]), right, rtol=1e-3, atol=1e-5)
    # Module allocation: shares of the layer's squared update norm, against numpy.
    for i in range(LAYERS):
        total = sum(ref2[n, i]["update_norm"] ** 2 for n in SHAPES)
        for name in SHAPES:
            np.testing.assert_allclose(float(second[f"monitor/layers_{i}/{name}/alloc"]),
                                       ref2[name, i]["update_norm"] ** 2 / total, rtol=1e-4)
    np.testing.assert_allclose(sum(float(second[f"monitor/alloc/{n}"]) for n in SHAPES), 1.0, rtol=1e-5)
    total_rel = math.sqrt(sum(r["update_norm"] ** 2 for r in ref2.values()) /
                          sum((r["update_norm"] / r["rel_update"]) ** 2 for r in ref2.values()))
    np.testing.assert_allclose(float(second["monitor/total/rel_update"]), total_rel, rtol=1e-4)
    np.testing.assert_allclose(float(second["monitor/mean/mlp/up_proj/erank"]),
                               np.mean([ref2["mlp/up_proj", i]["erank"] for i in range(LAYERS)]), rtol=2e-4)


def test_orientation_left_is_output_space():
    """A rank-1 kernel update a bᵀ (a: input, b: output) has U ∝ b (out) and V ∝ a (in)."""
    p0 = _params()
    a = RNG.standard_normal(HIDDEN)
    b = RNG.standard_normal(INTER)
    pt = jax.tree.map(lambda x: x, p0)
    pt["layers_1"]["mlp"]["up_proj"]["kernel"] = p0["layers_1"]["mlp"]["up_proj"]["kernel"] + jnp.outer(a, b)
    state = mon.init_monitor_state(p0, LAYOUT)
    state, _ = mon.monitor_step(state, pt, jax.random.PRNGKey(0), config=mon.MonitorConfig(k=1), layout=LAYOUT)
    u = np.asarray(state.ref_u["mlp/up_proj"][1, :, 0])
    v = np.asarray(state.ref_v["mlp/up_proj"][1, :, 0])
    assert u.shape == (INTER,) and v.shape == (HIDDEN,)
    assert abs(u @ b) / np.linalg.norm(b) == pytest.approx(1.0, rel=1e-5)
    assert abs(v @ a) / np.linalg.norm(a) == pytest.approx(1.0, rel=1e-5)


def test_randomized_topk_monitor_and_layer_chunks_agree_with_vmap():
    p0, pt = _params(), _perturb(_params(), 3)
    state = mon.init_monitor_state(p0, LAYOUT)
    outs = []
    for chunk in ("all", 2):
        config = mon.MonitorConfig(k=2, svd_method="randomized", layer_batch_size=chunk)
        _, metrics = mon.monitor_step(state, pt, jax.random.PRNGKey(0), config=config, layout=LAYOUT)
        outs.append(metrics)
    ref = _np_reference(p0, pt, 2)
    for name in SHAPES:
        for i in range(LAYERS):
            key = f"monitor/layers_{i}/{name}/energy_top2"
            np.testing.assert_allclose(float(outs[0][key]), ref[name, i]["energy"], rtol=1e-3)
            np.testing.assert_allclose(float(outs[1][key]), float(outs[0][key]), rtol=1e-4)
            assert f"monitor/layers_{i}/{name}/erank_topk" in outs[0]
            assert f"monitor/layers_{i}/{name}/erank" not in outs[0]


def test_monitor_wrapper_every_n_steps_and_overlap_one_for_same_update():
    p0, pt = _params(), _perturb(_params(), 4)
    m = mon.Monitor(mon.MonitorConfig(k=2, every=2, per_layer=False), p0, LAYOUT)
    assert m.maybe_run(1, pt) is None
    first = m.maybe_run(2, pt)
    assert isinstance(first["monitor/total/rel_update"], float)
    assert "monitor/mean/overlap_left" not in first
    assert not any(key.startswith("monitor/layers_") for key in first)
    second = m.maybe_run(4, pt)
    assert second["monitor/mean/overlap_left"] == pytest.approx(1.0, abs=1e-4)
    assert second["monitor/mean/overlap_right"] == pytest.approx(1.0, abs=1e-4)


def test_monitor_bad_inputs():
    p0 = _params()
    with pytest.raises(ValueError, match="MonitorConfig.k"):
        mon.monitor_step(mon.init_monitor_state(p0, LAYOUT), p0, jax.random.PRNGKey(0),
                         config=mon.MonitorConfig(k=HIDDEN + 1), layout=LAYOUT)
    with pytest.raises(ValueError, match="variables"):
        mon.init_monitor_state({"params": p0}, LAYOUT)
    other = _params()
    other["layers_0"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((HIDDEN, INTER + 1))
    with pytest.raises(ValueError, match="different architectures"):
        mon.check_same_architecture(p0, other)
    with pytest.raises(ValueError):
        mon.monitor_step(mon.init_monitor_state(p0, LAYOUT), other, jax.random.PRNGKey(0),
                         config=mon.MonitorConfig(k=2), layout=LAYOUT)
    with pytest.raises(ValueError, match="k"):
        mon.MonitorConfig(k=0)


@pytest.mark.parametrize("scanned", [False, True])
def test_rank_k_reconstruct_params(scanned):
    p0, pt = _params(), _perturb(_params(), 5)
    conv = _scan if scanned else (lambda x: x)
    layout = SCANNED_LAYOUT if scanned else LAYOUT
    out = mon.rank_k_reconstruct_params(conv(p0), conv(pt), 1, jax.random.PRNGKey(0), layout=layout,
                                        alpha=1.0, method="exact")
    new, base, final = (mon.module_kernels(x, layout) for x in (out, conv(p0), conv(pt)))
    for name in SHAPES:
        for i in range(LAYERS):
            d = np.asarray(final[name][i] - base[name][i], np.float64)
            d1 = _np_rank_k(d, 1)
            expected = np.asarray(base[name][i]) + np.linalg.norm(d) / np.linalg.norm(d1) * d1
            np.testing.assert_allclose(np.asarray(new[name][i]), expected, atol=1e-4)
    # Everything else stays at the base values (authors' upd_rank.py).
    layer0 = out["layers"] if scanned else out["layers_0"]
    layer0_base = conv(p0)["layers"] if scanned else p0["layers_0"]
    np.testing.assert_array_equal(np.asarray(layer0["self_attn"]["q_proj"]["bias"]), np.asarray(layer0_base["self_attn"]["q_proj"]["bias"]))
    np.testing.assert_array_equal(np.asarray(out["embed_tokens"]["embedding"]), np.asarray(p0["embed_tokens"]["embedding"]))
