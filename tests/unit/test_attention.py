"""Attention without `[seq, seq]` scores: the blockwise form, the fused-kernel wrappers, segment ids.

References: `layers.direct_attention` on the materialised mask (today's attention, itself checked
against transformers in test_qwen.py), and for packed rows each sequence's own unpacked forward.
Values and gradients are compared on real tokens (a padding query's output is unspecified and
never read). The memory test compares the compiled temporaries of a gradient at two sequence
lengths: quadratic for the direct form, linear for the blockwise one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import config as config_lib
from effopd_jax import models
from effopd_jax.models import layers
from effopd_jax.models.qwen import QwenConfig

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 3, 45, 4, 2, 8


def _inputs(seed=0, seq=SEQ, head_dim=HEAD_DIM, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    q = rng.randn(BATCH, seq, HEADS, head_dim)
    k = rng.randn(BATCH, seq, KV_HEADS, head_dim)
    v = rng.randn(BATCH, seq, KV_HEADS, head_dim)
    # Row 0 left-padded (a prompt), row 1 padded on both sides (prompt + response), row 2 packed:
    # segments of very different lengths (1, 2, 30) and padding at the end.
    valid = np.ones((BATCH, seq), bool)
    valid[0, :7] = False
    valid[1, :3] = False
    valid[1, seq - 9:] = False
    segments = np.zeros((BATCH, seq), np.int32)
    segments[0, 7:] = 1
    segments[1, 3:seq - 9] = 1
    segments[2, :1], segments[2, 1:3], segments[2, 3:33], segments[2, 33:40] = 1, 2, 3, 4
    valid[2, 40:] = False
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(valid),
            jnp.asarray(segments))


def _attend(impl, mask, block_size=layers.ATTENTION_BLOCK_SIZE, dtype=jnp.float32):
    return lambda q, k, v: layers.attention(q, k, v, mask, dtype, impl=impl, block_size=block_size)


@pytest.mark.parametrize("block_size", [8, 16, 512])
@pytest.mark.parametrize("with_segments", [False, True])
def test_blockwise_equals_direct_values_and_gradients(block_size, with_segments):
    q, k, v, valid, segments = _inputs()
    mask = layers.AttentionMask(valid, segments if with_segments else None)
    real = np.asarray(valid)
    # A cotangent on the real tokens only: the loss never reads a padding position.
    cotangent = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * real[..., None, None]
    values, grads = {}, {}
    for impl in ("direct", "blockwise"):
        fn = _attend(impl, mask, block_size)
        values[impl] = np.asarray(fn(q, k, v))
        grads[impl] = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(values["blockwise"][real], values["direct"][real], atol=2e-6)
    for direct, blockwise in zip(grads["direct"], grads["blockwise"]):
        np.testing.assert_allclose(np.asarray(blockwise), np.asarray(direct), atol=1e-5)
    assert np.all(np.isfinite(values["blockwise"]))


def test_blockwise_bfloat16_is_close_to_the_float32_reference():
    q, k, v, valid, segments = _inputs(dtype=jnp.bfloat16)
    mask = layers.AttentionMask(valid, segments)
    real = np.asarray(valid)
    reference = _attend("direct", mask)(*(x.astype(jnp.float32) for x in (q, k, v)))
    out = _attend("blockwise", mask, block_size=16, dtype=jnp.bfloat16)(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(reference)[real], atol=3e-2)


def test_fully_masked_rows_are_finite_and_get_no_gradient():
    q, k, v, _, _ = _inputs()
    valid = jnp.zeros((BATCH, SEQ), bool).at[:, -5:].set(True)  # 40 padding queries per row
    fn = _attend("blockwise", layers.AttentionMask(valid), block_size=8)
    out = fn(q, k, v)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out[:, :40]), 0.0)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_sequence_length_form_equals_direct_on_real_tokens():
    """The cuDNN wrapper's rotation to right padding, run through jax's XLA implementation (the
    fused kernel itself needs a GPU)."""
    q, k, v, valid, _ = _inputs()
    real = np.asarray(valid)
    mask = layers.AttentionMask(valid)
    reference = np.asarray(_attend("direct", mask)(q, k, v))
    out = layers.sequence_length_attention(q, k, v, valid, dtype=jnp.float32, implementation="xla")
    np.testing.assert_allclose(np.asarray(out)[real], reference[real], atol=2e-6)
    with pytest.raises(ValueError, match="segment ids"):
        layers.sequence_length_attention(q, k, v, valid, valid.astype(jnp.int32), dtype=jnp.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        layers.sequence_length_attention(q, k, v, valid, dtype=jnp.float32, implementation="cudnn")


def test_splash_kernel_in_the_pallas_interpreter_equals_direct():
    """The TPU kernel's own numbers, run by the Pallas interpreter on CPU (one 128-token block)."""
    from effopd_jax.models import tpu_attention

    q, k, v, valid, segments = _inputs(seq=100, head_dim=128)
    q, k, v, valid, segments = q[2:], k[2:], v[2:], valid[2:], segments[2:]
    real = np.asarray(valid)
    reference = _attend("direct", layers.AttentionMask(valid, segments))
    splash = lambda q, k, v: tpu_attention.splash_attention(q, k, v, valid, segments, dtype=jnp.float32,
                                                            interpret=True)
    np.testing.assert_allclose(np.asarray(splash(q, k, v))[real], np.asarray(reference(q, k, v))[real], atol=2e-6)
    cotangent = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * real[..., None, None]
    expected = jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: jnp.sum(splash(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_unknown_impl_is_refused_and_choices_match_the_config_schema():
    q, k, v, valid, _ = _inputs()
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        layers.attention(q, k, v, layers.AttentionMask(valid), jnp.float32, impl="flash")
    assert config_lib.ATTENTION_IMPLS == layers.ATTENTION_IMPLS
    with pytest.raises(ValueError, match="attention_impl"):
        QwenConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                   num_key_value_heads=1, head_dim=8, attention_impl="flash")
    assert layers.resolve_attention_impl("auto", jnp.float32, has_segments=False) == "blockwise"  # CPU


# ---------------------------------------------------------------------------------------------
# The model: attention_impl and segment ids
# ---------------------------------------------------------------------------------------------

MODEL = QwenConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, dtype=jnp.float32, tie_word_embeddings=True,
                   attention_impl="direct")


@pytest.fixture(scope="module")
def params():
    return models.init_params(MODEL, jax.random.key(0))


def test_model_logits_and_gradients_do_not_depend_on_attention_impl(params):
    rng = np.random.RandomState(3)
    ids = jnp.asarray(rng.randint(0, 50, (2, 21)), jnp.int32)
    mask = jnp.asarray(np.arange(21)[None] >= np.array([[6], [0]]))
    real = np.asarray(mask)

    @functools.partial(jax.jit, static_argnums=1)
    def logits_and_grads(p, config):
        def loss(p):
            logits = models.forward(config, p, ids, attention_mask=mask)
            return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2), logits

        return jax.grad(loss, has_aux=True)(p)

    expected_grads, expected = logits_and_grads(params, MODEL)
    grads, logits = logits_and_grads(params, dataclasses.replace(MODEL, attention_impl="blockwise"))
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(expected)[real], atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["direct", "blockwise"])
def test_packed_row_equals_each_sequence_alone(params, impl):
    """Three sequences of lengths 2, 17 and 4 in one row (positions restart per segment by
    default) give each sequence's own logits."""
    config = dataclasses.replace(MODEL, attention_impl=impl)
    rng = np.random.RandomState(4)
    lengths = (2, 17, 4)
    sequences = [rng.randint(0, 50, n).astype(np.int32) for n in lengths]
    row = np.zeros(26, np.int32)
    segments = np.zeros(26, np.int32)
    # Each sequence alone: right-padded to 17 in one batch, so one compiled forward.
    alone_ids, alone_mask = np.zeros((3, 17), np.int32), np.zeros((3, 17), bool)
    start = 0
    for i, s in enumerate(sequences):
        row[start:start + len(s)], segments[start:start + len(s)] = s, i + 1
        alone_ids[i, :len(s)], alone_mask[i, :len(s)] = s, True
        start += len(s)
    forward = jax.jit(models.forward, static_argnums=0)
    packed = np.asarray(forward(config, params, jnp.asarray(row[None]), segment_ids=jnp.asarray(segments[None])))[0]
    alone = np.asarray(forward(MODEL, params, jnp.asarray(alone_ids), attention_mask=jnp.asarray(alone_mask)))
    start = 0
    for i, s in enumerate(sequences):
        np.testing.assert_allclose(packed[start:start + len(s)], alone[i, :len(s)], atol=2e-5)
        start += len(s)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        models.forward(config, params, jnp.asarray(row[None]), segment_ids=jnp.asarray(segments[None, :-1]))


def _compiled_temp_bytes(impl: str, seq: int) -> int:
    """Temporaries of the compiled gradient of a tiny model's loss over one `seq`-token row."""
    config = dataclasses.replace(MODEL, vocab_size=16, num_hidden_layers=1, attention_impl=impl)
    abstract = models.abstract_params(config)

    def loss(p, ids):
        hidden = models.forward(config, p, ids, attention_mask=jnp.ones_like(ids, bool), return_hidden_states=True)
        return jnp.mean(hidden.astype(jnp.float32) ** 2)

    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(abstract, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_grows_linearly_with_the_sequence():
    """4x the tokens: the direct form's temporaries grow ~16x ([seq, seq] scores), the blockwise
    form's ~4x."""
    short, long = 512, 2048
    direct = _compiled_temp_bytes("direct", long) / _compiled_temp_bytes("direct", short)
    blockwise_long = _compiled_temp_bytes("blockwise", long)
    blockwise = blockwise_long / _compiled_temp_bytes("blockwise", short)
    assert direct > 10, direct
    assert blockwise < 5, blockwise
    assert blockwise_long < _compiled_temp_bytes("direct", long) / 8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_equals_direct(dtype):
    """One query per row (a decode step over a cache), by the multiply-reduce form that
    `attention` uses for a dense mask with q_len 1; row 2 has no visible key (finite output)."""
    rng = np.random.RandomState(3)
    q = jnp.asarray(rng.randn(BATCH, 1, HEADS, HEAD_DIM), dtype)
    k = jnp.asarray(rng.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM), dtype)
    v = jnp.asarray(rng.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM), dtype)
    mask = np.ones((BATCH, 1, SEQ), bool)
    mask[0, :, :7] = False
    mask[1, :, 20:] = False
    mask[2] = False
    want = layers.direct_attention(q, k, v, jnp.asarray(mask), dtype)
    got = layers.attention(q, k, v, jnp.asarray(mask), dtype)
    assert got.dtype == want.dtype and got.shape == (BATCH, 1, HEADS, HEAD_DIM)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance)
