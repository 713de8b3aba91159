"""The family-agnostic model API and the parameter layout, against transformers and the authors' rule.

References here are independent of the layout code: the tensor names of a `transformers`
model's own `state_dict`, the authors' substring filter (`effopd.DEFAULT_PARAM_FILTER`, their
`_should_modify_param`), and the params tree that `init_params` builds.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effopd_jax import convert, models
from effopd_jax.effopd import DEFAULT_PARAM_FILTER, effopd
from effopd_jax.models import UnsupportedConfigError
from effopd_jax.models.family import ModelFamily, ModelLayout, register_family
from helpers_hf import make_tiny_hf_checkpoint, make_tiny_hf_config, torch_logits

VARIANTS = {
    "qwen3_untied_bias": ("qwen3", False, 2, True),
    "qwen3_tied": ("qwen3", True, 4, None),
    "qwen2_untied": ("qwen2", False, 2, None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_hf_checkpoint(root, *args) for name, args in VARIANTS.items()}


def _leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_public_api_load_forward_save_round_trip_matches_transformers(checkpoints, tmp_path):
    path = checkpoints["qwen3_untied_bias"]
    config, params = models.load_hf(path, param_dtype="float32", compute_dtype="float32")
    ids = np.random.RandomState(0).randint(0, 128, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    logits = jax.jit(lambda p: models.forward(config, p, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))(params)
    assert logits.shape == (2, 9, 128) and logits.dtype == jnp.float32
    reference = torch_logits(path, ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(logits)[mask.astype(bool)], reference[mask.astype(bool)], atol=1e-4)

    models.save_hf(config, params, tmp_path / "out")
    again_config, again = models.load_hf(tmp_path / "out", param_dtype="float32", compute_dtype="float32")
    assert again_config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_keeps_its_original_entry_points(checkpoints, tmp_path):
    path = checkpoints["qwen2_untied"]
    config, params = convert.load_hf(path, jnp.bfloat16, None, True, compute_dtype=jnp.float32)
    expected_config, expected = models.load_hf(path, param_dtype=jnp.bfloat16, compute_dtype=jnp.float32,
                                               scan_layers=True)
    assert config == expected_config and config.scan_layers and config.param_dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    convert.save_hf(config, params, tmp_path / "out", 10**9, jnp.float32)
    assert models.load_hf(tmp_path / "out", scan_layers=True)[0].scan_layers


def test_unsupported_model_type_is_refused_listing_the_supported_ones():
    assert {"qwen2", "qwen3"} <= set(models.supported_model_types())
    for model_type in ("llama", "qwen2_moe", None):
        with pytest.raises(UnsupportedConfigError, match=re.escape(str(models.supported_model_types()))):
            models.config_from_hf({"model_type": model_type, "hidden_size": 8})
    with pytest.raises(UnsupportedConfigError, match="mixture-of-experts"):
        models.family_for("qwen2_moe")


def test_a_model_type_belongs_to_one_family():
    class Impostor(ModelFamily):
        name = "impostor"
        model_types = ("qwen3",)

    for method in ("config_from_hf", "config_from_dict", "apply", "init_params", "param_logical_axes",
                   "lm_head_weight", "init_cache", "cache_logical_axes", "layout"):
        setattr(Impostor, method, lambda self, *a, **k: None)
    Impostor.__abstractmethods__ = frozenset()
    with pytest.raises(ValueError, match="already registered"):
        register_family(Impostor())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_layout_covers_the_params_tree_and_names_the_transformers_tensors(variant, scan_layers):
    hf = make_tiny_hf_config(*VARIANTS[variant])
    config = models.config_from_hf(hf.to_dict(), scan_layers=scan_layers)
    layout = models.layout(config)
    abstract = models.abstract_params(config)
    # One entry per leaf, in tree order; stacked leaves carry one HF name per layer.
    assert [info.name for info in layout.params] == _leaf_names(abstract)
    for info, leaf in zip(layout.params, jax.tree.leaves(abstract)):
        assert len(info.hf_names) == int(np.prod(leaf.shape[:len(info.stack_axes)]))
    # The names are exactly the tensors of the transformers model (an independent reference).
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_config(hf)
    expected = set(torch_model.state_dict()) - ({"lm_head.weight"} if hf.tie_word_embeddings else set())
    assert {name for info in layout.params for name in info.hf_names} == expected
    # Matrices: the 7 of every layer, in reading order, [in, out] of the HF [out, in] weights.
    assert layout.matrix_modules == ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                     "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
    for module in layout.matrix_modules:
        assert layout.module_layers(module) == tuple(range(config.num_hidden_layers))
    assert layout.module_groups() == {"attention": layout.matrix_modules[:4], "mlp": layout.matrix_modules[4:]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_layout_effopd_filter_is_the_authors_substring_rule(variant, scan_layers):
    """The layout's default selection equals the authors' `_should_modify_param` on our paths."""
    config = models.config_from_hf(make_tiny_hf_config(*VARIANTS[variant]).to_dict(), scan_layers=scan_layers)
    authors = re.compile(DEFAULT_PARAM_FILTER, re.IGNORECASE)
    names = _leaf_names(models.abstract_params(config))
    selected = {name for name in names if authors.search(name)}
    assert models.layout(config).extrapolated_names() == selected
    assert any("post_attention_layernorm" in name for name in selected)
    assert not any("input_layernorm" in name or "embed_tokens" in name for name in selected)
    assert all(models.layout(config).effopd_filter()(name) == (name in selected) for name in names)
    # effopd() takes the layout itself as its filter: the same anchor leaves as its default.
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), models.abstract_params(config))
    anchored = lambda tx: [name for name, leaf in zip(names, jax.tree.leaves(  # noqa: E731
        tx.init(params).anchor, is_leaf=lambda x: isinstance(x, optax.MaskedNode))) if not isinstance(
        leaf, optax.MaskedNode)]
    assert anchored(effopd(param_filter=models.layout(config))) == anchored(effopd()) == sorted(selected, key=names.index)


def test_init_params_is_deterministic_and_matches_the_abstract_tree():
    config = models.config_from_hf(make_tiny_hf_config("qwen3", True, 2).to_dict(), param_dtype="bfloat16")
    a = models.init_params(config, jax.random.key(3))
    b = models.init_params(config, jax.random.key(3))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == jax.tree.map(
        lambda x: (x.shape, x.dtype), models.abstract_params(config))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert isinstance(models.layout(config), ModelLayout)
    assert models.layout(config) is models.layout(dataclasses.replace(config))  # cached per config


def test_cache_is_opaque_and_decoding_through_it_equals_the_uncached_forward(checkpoints):
    config, params = models.load_hf(checkpoints["qwen3_tied"], compute_dtype="float32")
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 7)))
    full = models.forward(config, params, ids)
    cache = models.init_cache(config, batch=2, max_len=7, dtype=jnp.float32)
    slots_filled = lambda n: jnp.broadcast_to(jnp.arange(7) < n, (2, 7))  # noqa: E731
    prefix, cache = models.forward(config, params, ids[:, :5], attention_mask=slots_filled(5), cache=cache)
    step, cache = models.forward(config, params, ids[:, 5:6], attention_mask=slots_filled(6), cache=cache)
    np.testing.assert_allclose(np.asarray(prefix), np.asarray(full[:, :5]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, 5]), atol=1e-5)
    # The output head reproduces the logits from the hidden states.
    hidden = models.forward(config, params, ids, return_hidden_states=True)
    head = models.lm_head_weight(config, params)
    np.testing.assert_allclose(np.asarray(hidden @ head), np.asarray(full), atol=1e-4)
