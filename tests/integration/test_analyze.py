"""Tests of the offline foresight CLI (effopd_jax.analyze) on tiny HF / orbax checkpoints."""

import csv
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import analyze, convert, models, monitor
from helpers_hf import make_tiny_hf_checkpoint, make_tiny_hf_config

# The tiny Qwen3 of helpers_hf: its layout's matrices are q, k, v, o, gate, up, down per layer.
LAYOUT = models.layout(models.config_from_hf(make_tiny_hf_config("qwen3", tie=False, num_kv_heads=2).to_dict()))
MODULES = LAYOUT.matrix_modules
K = 2


def _perturbed(params, step: int, seed: int = 1):
    """W_t = W_0 + t·(a fixed rank-2 direction) + t-dependent noise; norms and biases move too."""
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(100 + step)

    def bump(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']") and any(f"['{m.split('/')[1]}']" in name for m in MODULES):
            m, n = x.shape
            direction = rng.standard_normal((m, 2)) @ np.diag([1.0, 0.5]) @ rng.standard_normal((2, n))
            update = 0.01 * step * direction + 0.003 * noise_rng.standard_normal((m, n))
            return x + jnp.asarray(update, x.dtype)
        return x + 0.05 * step

    return jax.tree_util.tree_map_with_path(bump, params)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """step_0 (a transformers-written checkpoint re-saved), step_1..3 as HF, step_2 also as orbax."""
    root = tmp_path_factory.mktemp("analyze")
    base_dir = make_tiny_hf_checkpoint(root / "hf", "qwen3", tie=False, num_kv_heads=2)
    config, params0 = convert.load_hf(base_dir)
    dirs, params = [], []
    for step in range(4):
        p = params0 if step == 0 else _perturbed(params0, step)
        path = str(root / f"step_{step}")
        convert.save_hf(config, p, path)
        dirs.append(path)
        params.append(p)
    orbax_dir = str(root / "orbax" / "step_2")
    convert.save_orbax(config, params[2], orbax_dir)
    # A trainer step directory (WORKDIR/checkpoints/2/state): params stored scanned, next to an
    # optimizer state the analysis must not need.
    from effopd_jax.checkpoint import META_MODEL_CONFIG, RunCheckpointer

    scanned = {k: v for k, v in params[2].items() if not k.startswith("layers_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[2][f"layers_{i}"] for i in range(2)])
    run = RunCheckpointer(str(root / "run" / "checkpoints"), async_save=False)
    scanned_config = dataclasses.replace(config, scan_layers=True)
    run.save(2, {"trainable_params": scanned, "opt_state": {"mu": scanned}, "step": jnp.int32(2)}, {},
             {"step": 2, META_MODEL_CONFIG: scanned_config.to_dict()})
    # The base as a step-0 directory, unscanned, with its config in the meta too.
    run.save(0, {"trainable_params": params[0], "opt_state": {}, "step": jnp.int32(0)}, {},
             {"step": 0, META_MODEL_CONFIG: config.to_dict()})
    run.close()
    return dict(root=root, config=config, dirs=dirs, params=params, orbax_dir=orbax_dir,
                run_dir=str(root / "run" / "checkpoints" / "2"), run_base_dir=str(root / "run" / "checkpoints" / "0"))


@pytest.fixture(scope="module")
def cli_run(series, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    dirs = series["dirs"]
    # Given out of order: the CLI sorts by the step number in the names.
    code = analyze.main(["--checkpoints", dirs[2], dirs[0], dirs[3], dirs[1], "--out", out, "--k", str(K),
                         "--rank-k-export", "1", "--alpha", "1.5"])
    assert code == 0
    return out


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _np_kernel(params, layer, module):
    group, proj = module.split("/")
    return np.asarray(params[f"layers_{layer}"][group][proj]["kernel"], np.float64)


def _np_update(series, step, layer, module):
    """ΔW in HF orientation [out, in] and W_0."""
    w0 = _np_kernel(series["params"][0], layer, module)
    return (_np_kernel(series["params"][step], layer, module) - w0).T, w0


def test_metrics_csv_matches_numpy(series, cli_run, capsys):
    rows = _read(os.path.join(cli_run, "metrics.csv"))
    num_layers = series["config"].num_hidden_layers
    assert len(rows) == 3 * num_layers * len(MODULES)
    assert [r["checkpoint"] for r in rows[:: num_layers * len(MODULES)]] == ["step_1", "step_2", "step_3"]
    finals = {}
    for layer in range(num_layers):
        for module in MODULES:
            d, _ = _np_update(series, 3, layer, module)
            u, _, vt = np.linalg.svd(d, full_matrices=False)
            finals[layer, module] = (u[:, :K], vt[:K].T)
    prev = {}
    for row in rows:
        step, layer, module = int(row["step"]), int(row["layer"]), row["module"]
        d, w0 = _np_update(series, step, layer, module)
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        p = s / s.sum()
        layer_total = sum(np.sum(_np_update(series, step, layer, m)[0] ** 2) for m in MODULES)
        expected = dict(
            update_norm=np.linalg.norm(d), w0_norm=np.linalg.norm(w0), rel_update=np.linalg.norm(d) / np.linalg.norm(w0),
            energy=np.sum(s[:K] ** 2) / np.sum(s**2), erank=np.exp(-np.sum(p * np.log(p))),
            alloc=np.sum(d**2) / layer_total,
            overlap_final_left=np.sum((u[:, :K].T @ finals[layer, module][0]) ** 2) / K,
            overlap_final_right=np.sum((vt[:K] @ finals[layer, module][1]) ** 2) / K,
        )
        if step > 1:
            pu, pv = prev[layer, module]
            expected["overlap_prev_left"] = np.sum((u[:, :K].T @ pu) ** 2) / K
            expected["overlap_prev_right"] = np.sum((vt[:K] @ pv) ** 2) / K
        else:
            assert row["overlap_prev_left"] == ""
        prev[layer, module] = (u[:, :K], vt[:K].T)
        for column, value in expected.items():
            np.testing.assert_allclose(float(row[column]), value, rtol=2e-3, atol=1e-5, err_msg=f"{column} {row}")
    # The rank-2 direction dominates: high energy and strong alignment with the final subspace.
    step1 = [r for r in rows if r["step"] == "1"]
    assert np.mean([float(r["energy"]) for r in step1]) > 0.6
    assert np.mean([float(r["overlap_final_left"]) for r in step1]) > 0.8


def test_summary_and_spectrum_csv(series, cli_run):
    summary = _read(os.path.join(cli_run, "summary.csv"))
    assert len(summary) == 3 * (len(MODULES) + 1)
    metrics = _read(os.path.join(cli_run, "metrics.csv"))
    for step in ("1", "2", "3"):
        per = [r for r in summary if r["step"] == step and r["module"] != "all"]
        np.testing.assert_allclose(sum(float(r["alloc_model"]) for r in per), 1.0, rtol=1e-5)
        every = next(r for r in summary if r["step"] == step and r["module"] == "all")
        m = [r for r in metrics if r["step"] == step]
        expected = np.sqrt(sum(float(r["update_norm"]) ** 2 for r in m) / sum(float(r["w0_norm"]) ** 2 for r in m))
        np.testing.assert_allclose(float(every["rel_update"]), expected, rtol=1e-5)
    final_all = next(r for r in summary if r["step"] == "3" and r["module"] == "all")
    np.testing.assert_allclose(float(final_all["overlap_final_left"]), 1.0, atol=1e-4)

    spectrum = _read(os.path.join(cli_run, "spectrum.csv"))
    rows = [r for r in spectrum if r["layer"] == "1" and r["module"] == "mlp/down_proj"]
    d, _ = _np_update(series, 3, 1, "mlp/down_proj")
    s = np.linalg.svd(d, compute_uv=False)
    assert len(rows) == len(s)
    np.testing.assert_allclose([float(r["sigma"]) for r in rows], s, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(float(rows[-1]["cumulative_energy"]), 1.0, rtol=1e-6)


def test_plots_written(cli_run):
    for name in ("relative_update_heatmap.png", "overlap_with_final.png", "spectrum_decay.png", "module_allocation.png"):
        path = os.path.join(cli_run, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(path) > 10_000, name


def test_rank_k_export_matches_formula_and_loads_in_transformers(series, cli_run):
    path = os.path.join(cli_run, "rank_1_alpha_1.5")
    _, exported = convert.load_hf(path)
    for layer in range(series["config"].num_hidden_layers):
        for module in MODULES:
            d, w0 = _np_update(series, 3, layer, module)
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            d1 = s[0] * np.outer(u[:, 0], vt[0])
            expected = w0 + (1.5 * np.linalg.norm(d) / np.linalg.norm(d1) * d1).T
            np.testing.assert_allclose(_np_kernel(exported, layer, module), expected, atol=1e-5)
    base = series["params"][0]
    np.testing.assert_array_equal(np.asarray(exported["embed_tokens"]["embedding"]), np.asarray(base["embed_tokens"]["embedding"]))
    np.testing.assert_array_equal(np.asarray(exported["layers_0"]["self_attn"]["q_norm"]["scale"]),
                                  np.asarray(base["layers_0"]["self_attn"]["q_norm"]["scale"]))
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    weight = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    np.testing.assert_allclose(weight, _np_kernel(exported, 1, "mlp/up_proj").T, atol=1e-6)


@pytest.mark.parametrize("kind", ["orbax", "run"])
def test_orbax_and_trainer_checkpoints_give_the_same_metrics(series, cli_run, tmp_path, kind):
    out = str(tmp_path / "out")
    dirs = series["dirs"]
    middle = series["orbax_dir"] if kind == "orbax" else series["run_dir"]
    assert analyze.checkpoint_format(middle) == kind
    analyze.main(["--checkpoints", dirs[0], middle, dirs[3], "--out", out, "--k", str(K), "--no-plots", "--keep-order"])
    mixed = {(r["layer"], r["module"]): r for r in _read(os.path.join(out, "metrics.csv")) if r["step"] == "1"}
    reference = {(r["layer"], r["module"]): r for r in _read(os.path.join(cli_run, "metrics.csv")) if r["step"] == "2"}
    assert len(mixed) == len(reference) == 2 * len(MODULES)
    for key, row in mixed.items():
        for column in ("rel_update", "energy", "erank", "overlap_final_left", "overlap_final_right"):
            np.testing.assert_allclose(float(row[column]), float(reference[key][column]), rtol=1e-4, atol=1e-6)


def test_run_checkpoint_as_final_exports_with_the_base_config(series, tmp_path):
    out = str(tmp_path / "out")
    dirs = series["dirs"]
    analyze.analyze([dirs[0], series["run_dir"]], out, k=K, rank_k_export=1, plots=False)
    _, exported = convert.load_hf(os.path.join(out, "rank_1_alpha_1"))
    d, w0 = _np_update(series, 2, 0, "self_attn/o_proj")
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    dk = (u[:, :1] * s[:1]) @ vt[:1]
    np.testing.assert_allclose(_np_kernel(exported, 0, "self_attn/o_proj"), w0 + (np.linalg.norm(d) / np.linalg.norm(dk) * dk).T, atol=1e-5)


def test_trainer_step_directories_alone_carry_their_layout(series, cli_run, tmp_path):
    """No HF or orbax checkpoint in the series: the layout comes from the step directories' meta."""
    out = str(tmp_path / "out")
    analyze.analyze([series["run_base_dir"], series["run_dir"]], out, k=K, plots=False)
    alone = {(r["layer"], r["module"]): r for r in _read(os.path.join(out, "metrics.csv"))}
    reference = {(r["layer"], r["module"]): r for r in _read(os.path.join(cli_run, "metrics.csv")) if r["step"] == "2"}
    assert alone.keys() == reference.keys() and len(alone) == 2 * len(MODULES)
    for key, row in alone.items():
        np.testing.assert_allclose(float(row["rel_update"]), float(reference[key]["rel_update"]), rtol=1e-5)


def test_order_checkpoints():
    assert analyze.order_checkpoints(["r/step_10", "r/step_2", "r/step_0"]) == (["r/step_0", "r/step_2", "r/step_10"], [0, 2, 10])
    # The base student without a number first, then trainer step directories.
    assert analyze.order_checkpoints(["cache/student", "run/checkpoints/12", "run/checkpoints/4"]) == (
        ["cache/student", "run/checkpoints/4", "run/checkpoints/12"], [0, 4, 12])
    assert analyze.order_checkpoints(["b", "a", "c"]) == (["b", "a", "c"], [0, 1, 2])
    assert analyze.order_checkpoints(["x/3", "x/1"], keep_order=True) == (["x/3", "x/1"], [0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        analyze.order_checkpoints(["a/step_1", "b/step_1"])


def test_bad_inputs(series, tmp_path):
    dirs = series["dirs"]
    with pytest.raises(ValueError, match="at least 2"):
        analyze.analyze([dirs[0]], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="neither a Hugging Face"):
        analyze.analyze([dirs[0], str(tmp_path)], str(tmp_path / "b"))
    with pytest.raises(ValueError, match="rank bound"):
        analyze.analyze([dirs[0], dirs[1]], str(tmp_path / "c"), k=49)  # k/v_proj are [48, 64]
    with pytest.raises(ValueError, match="rank-k-export"):
        analyze.analyze([dirs[0], dirs[1]], str(tmp_path / "d"), rank_k_export=100)
    other = make_tiny_hf_checkpoint(tmp_path / "other", "qwen3", tie=False, num_kv_heads=2, intermediate_size=80)
    with pytest.raises(ValueError, match="different architectures.*intermediate_size"):
        analyze.analyze([dirs[0], str(other)], str(tmp_path / "e"), keep_order=True)


def test_marginal_utility_with_known_score(series):
    """evaluate = Σ over kernels of ‖K − K_0‖_F² -> utility of a group = its Σ‖ΔW‖_F² exactly."""
    p0, pt = series["params"][0], series["params"][3]
    base = monitor.module_kernels(p0, LAYOUT)

    def evaluate(params):
        kernels = monitor.module_kernels(params, LAYOUT)
        return float(sum(jnp.sum(jnp.square(kernels[m] - base[m])) for m in MODULES))

    out = analyze.marginal_utility(p0, pt, evaluate, per_layer=True, layout=LAYOUT)
    sq = {m: np.asarray(jnp.sum(jnp.square(monitor.module_kernels(pt, LAYOUT)[m] - base[m]), axis=(1, 2)))
          for m in MODULES}
    assert out["score/base"] == 0.0
    np.testing.assert_allclose(out["score/full"], sum(v.sum() for v in sq.values()), rtol=1e-5)
    np.testing.assert_allclose(out["utility/attention"], sum(sq[m].sum() for m in MODULES[:4]), rtol=1e-5)
    np.testing.assert_allclose(out["utility/mlp"], sum(sq[m].sum() for m in MODULES[4:]), rtol=1e-5)
    np.testing.assert_allclose(out["utility/gate"], sq["mlp/gate_proj"].sum(), rtol=1e-5)
    np.testing.assert_allclose(out["utility/layer_1"], sum(sq[m][1] for m in MODULES), rtol=1e-5)
    # Resetting a group leaves everything else at W_t.
    reset = analyze.reset_modules(p0, pt, ["mlp/up_proj"], layers=[0], layout=LAYOUT)
    np.testing.assert_array_equal(np.asarray(reset["layers_0"]["mlp"]["up_proj"]["kernel"]), np.asarray(p0["layers_0"]["mlp"]["up_proj"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(reset["layers_1"]["mlp"]["up_proj"]["kernel"]), np.asarray(pt["layers_1"]["mlp"]["up_proj"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(reset["norm"]["scale"]), np.asarray(pt["norm"]["scale"]))
    with pytest.raises(ValueError, match="unknown modules"):
        analyze.reset_modules(p0, pt, ["mlp/fc1"], layout=LAYOUT)
