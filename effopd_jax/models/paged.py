"""Paged KV caches: the family-agnostic pieces (call indices, page writes, attention over pages).

A paged cache keeps each layer's keys and values in fixed-size pages,

    k, v: [shards, layers, pages_per_shard, page_size, kv_heads, head_dim]

and a *page table* per row says which pages hold it: cache position ``p`` of row ``b`` is slot
``p % page_size`` of page ``page_table[b, p // page_size]``. A row's cache position is the RoPE
position of the token (the count of real tokens before it), so padding never takes cache space.
Pages are handed out by the caller (the continuous-batching engine) as a row grows and taken
back when it ends; the cache's memory is set by the page pool, not by the rows a step samples.

**The null page.** Page 0 of every shard is never given to a row. Table entries the caller has
not allocated hold 0, and every write the caller does not want (padding, stopped rows, positions
past the table) lands there, so a call never touches a page another row owns. Reads of it are
always masked.

**Shards.** The batch of a call splits into ``shards`` contiguous groups (the mesh's batch
shards: ``batch // shards`` rows each) and row ``b`` only uses the pages of shard
``b // (batch // shards)``, indexed locally (``0 .. pages_per_shard - 1``). Every gather and
scatter below is a ``vmap`` over the shard axis, i.e. batched over a dimension that is split
over the mesh exactly like the rows, which GSPMD partitions without any communication. The
shard axis leads (major in memory), so the batched scatters keep the pool's layout and update
it in place: a layer writes its ``[shard, layer, page, slot]`` entries of the whole pool
(``index.layer``) instead of copying its pages out and back.

**Calls.** A forward over a paged cache takes one of two indices (pytrees, shared by every
layer), which say where each of the call's ``seq`` tokens goes and what it attends to:

* :class:`PagedPrefill`: rows that start empty (a prompt). The tokens attend to each other
  (causal by position, valid tokens only) exactly as an uncached forward does, and are written
  to their pages.
* :class:`PagedDecode`: rows that continue (decode: ``seq = 1``). The tokens are written, then
  each attends to every cache position ``<=`` its own in its row's pages
  (:func:`paged_attention`, an online softmax over blocks of pages that stops after the block
  holding the longest row's last position, so a step costs what the rows hold, not the capacity).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

NULL_PAGE = 0  # page 0 of every shard: never allocated; padding and unwanted writes go there


@flax.struct.dataclass
class PagedPrefill:
    """Index of a call on rows that start empty.

    Attributes:
      page_table: ``[batch, max_pages]`` int32 local page ids of each row (``NULL_PAGE`` where
        none is allocated).
      positions: ``[batch, seq]`` int32 cache (= RoPE) position of each token.
      valid: ``[batch, seq]`` bool, the tokens to write and attend to (False: padding).
      layer: (static) set by the forward for layer ``i`` when a layer's cache arrives as the
        whole ``[shards, layers, ...]`` pool, which is then written in place at
        ``[shard, layer, ...]`` (no per-layer copy); None when the layer's own
        ``[shards, pages_per_shard, ...]`` pages arrive (scanned layers).
    """

    page_table: Array
    positions: Array
    valid: Array
    layer: int | None = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class PagedDecode:
    """Index of a call on rows that continue: the fields of :class:`PagedPrefill`, plus

    Attributes:
      block_pages: (static) pages per block of :func:`paged_attention`.
    """

    page_table: Array
    positions: Array
    valid: Array
    layer: int | None = flax.struct.field(pytree_node=False, default=None)
    block_pages: int = flax.struct.field(pytree_node=False, default=8)


PAGED_INDEXES = (PagedPrefill, PagedDecode)


def _per_shard(x: Array, shards: int) -> Array:
    """``[batch, ...] -> [shards, batch // shards, ...]`` (row b goes to shard b // (batch // shards))."""
    if x.shape[0] % shards:
        raise ValueError(f"a paged call's batch ({x.shape[0]}) must be a multiple of the cache's shards ({shards})")
    return x.reshape((shards, x.shape[0] // shards) + x.shape[1:])


def write_pages(pages: Array, new: Array, index: PagedPrefill | PagedDecode) -> Array:
    """Writes each valid token's ``new`` vector at its cache position in its row's pages.

    Args:
      pages: ``[shards, pages_per_shard, page_size, kv_heads, head_dim]`` one layer's keys or
        values, or with ``index.layer`` set the whole ``[shards, layers, ...]`` pool.
      new: ``[batch, seq, kv_heads, head_dim]`` the call's keys or values.
      index: the call's :class:`PagedPrefill` / :class:`PagedDecode`.

    Returns:
      ``pages`` with the tokens written (invalid tokens and positions past the page table go to
      the null page).
    """
    layer = index.layer
    shards, page_size = pages.shape[0], pages.shape[-3]
    max_pages = index.page_table.shape[1]
    logical_page = index.positions // page_size
    wanted = index.valid & (index.positions >= 0) & (logical_page < max_pages)
    page = jnp.take_along_axis(index.page_table, jnp.clip(logical_page, 0, max_pages - 1), axis=1)
    page = jnp.where(wanted, page, NULL_PAGE)
    offset = jnp.where(wanted, index.positions % page_size, 0)

    def one_shard(pages_s, page_s, offset_s, new_s):
        if layer is None:
            return pages_s.at[page_s, offset_s].set(new_s.astype(pages_s.dtype))
        return pages_s.at[layer, page_s, offset_s].set(new_s.astype(pages_s.dtype))

    return jax.vmap(one_shard)(pages, _per_shard(page, shards), _per_shard(offset, shards),
                               _per_shard(new, shards))


def prefill_mask(index: PagedPrefill) -> Array:
    """``[batch, seq, seq]`` bool: token i may attend to token j of its row iff both are valid
    and ``positions[j] <= positions[i]`` (causal by position, so any padding layout works)."""
    valid = index.valid
    causal = index.positions[:, None, :] <= index.positions[:, :, None]
    return causal & valid[:, None, :] & valid[:, :, None]


def paged_attention(q: Array, k_pages: Array, v_pages: Array, index: PagedDecode, dtype: Any) -> Array:
    """Grouped-query attention of each token over its row's cached positions ``<=`` its own.

    An online (flash-decoding style) softmax over blocks of ``index.block_pages`` pages: each
    block's keys and values are gathered from the row's pages, scored in float32, and folded
    into running maxima, normalisers and outputs. The loop runs over the blocks up to the one
    holding the largest valid position of the call, so the work follows the longest row, not
    the table's capacity. Equal to a softmax over the gathered keys (the dense cache's
    ``layers.attention``) up to float rounding.

    Args:
      q: ``[batch, seq, heads, head_dim]`` queries (after RoPE).
      k_pages, v_pages: ``[shards, pages_per_shard, page_size, kv_heads, head_dim]`` one layer's
        pages (with ``index.layer``: the ``[shards, layers, ...]`` pool), with this call's
        tokens already written.
      index: the call's :class:`PagedDecode`.
      dtype: compute dtype of the probability-value product.

    Returns:
      ``[batch, seq, heads, head_dim]`` in ``q.dtype``; 0 for invalid tokens.
    """
    batch, seq, heads, head_dim = q.shape
    layer = index.layer  # with the whole pool: read layer `layer` inside the gathers
    shards, page_size, kv_heads = k_pages.shape[0], k_pages.shape[-3], k_pages.shape[-2]
    groups = heads // kv_heads
    max_pages = index.page_table.shape[1]
    block_pages = max(1, min(index.block_pages, max_pages))
    num_blocks_max = -(-max_pages // block_pages)
    block_tokens = block_pages * page_size
    table = jnp.pad(index.page_table, ((0, 0), (0, num_blocks_max * block_pages - max_pages)),
                    constant_values=NULL_PAGE)
    query_positions = jnp.where(index.valid, index.positions, -1)
    # Blocks that hold any position a valid query may read (a scalar over the whole batch).
    num_blocks = jnp.minimum(jnp.max(query_positions) // block_tokens + 1, num_blocks_max)
    scale = head_dim ** -0.5
    q = q.reshape(batch, seq, kv_heads, groups, head_dim)

    def one_shard(q_s, table_s, qpos_s, k_s, v_s):
        rows = q_s.shape[0]

        def block(j, carry):
            running_max, normaliser, out = carry
            pages = jax.lax.dynamic_slice_in_dim(table_s, j * block_pages, block_pages, axis=1)
            at = pages if layer is None else (layer, pages)
            keys = k_s[at].reshape(rows, block_tokens, kv_heads, head_dim).astype(dtype)
            values = v_s[at].reshape(rows, block_tokens, kv_heads, head_dim).astype(dtype)
            key_positions = j * block_tokens + jnp.arange(block_tokens)
            visible = key_positions[None, None, :] <= qpos_s[:, :, None]            # [rows, seq, t]
            scores = jnp.einsum("bskgd,btkd->bkgst", q_s, keys, preferred_element_type=jnp.float32) * scale
            scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            # Rows that have seen no visible key yet keep max -inf: shift by 0 there (exp(-inf) = 0).
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            probs = jnp.exp(scores - shift[..., None])
            correction = jnp.exp(jnp.where(jnp.isfinite(running_max), running_max - shift, -jnp.inf))
            normaliser = normaliser * correction + jnp.sum(probs, axis=-1)
            out = out * correction[..., None] + jnp.einsum(
                "bkgst,btkd->bkgsd", probs.astype(dtype), values, preferred_element_type=jnp.float32)
            return new_max, normaliser, out

        init = (jnp.full((rows, kv_heads, groups, seq), -jnp.inf, jnp.float32),
                jnp.zeros((rows, kv_heads, groups, seq), jnp.float32),
                jnp.zeros((rows, kv_heads, groups, seq, head_dim), jnp.float32))
        _, normaliser, out = jax.lax.fori_loop(0, num_blocks, block, init)
        out = out / jnp.where(normaliser > 0, normaliser, 1.0)[..., None]
        return jnp.einsum("bkgsd->bskgd", out)

    out = jax.vmap(one_shard)(_per_shard(q, shards), _per_shard(table, shards),
                              _per_shard(query_positions, shards), k_pages, v_pages)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)


def cached_attention(q: Array, k: Array, v: Array, mask: Array | None, layer_cache: tuple[Array, Array],
                     index: PagedPrefill | PagedDecode, *, attention: Any, dtype: Any
                     ) -> tuple[Array, tuple[Array, Array]]:
    """One attention layer over a paged cache: writes the call's ``k``/``v`` into the pages,
    then attends (a prefill among its own tokens with ``attention(q, k, v, mask, dtype)``, the
    family's dense attention; a decode over the pages with :func:`paged_attention`).

    Args:
      q: ``[batch, seq, heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]`` (after RoPE).
      mask: the prefill's ``[batch, seq, seq]`` mask (:func:`prefill_mask`); unused by a decode.
      layer_cache: ``(k_pages, v_pages)`` of this layer (or of every layer, with ``index.layer``).
      index: the call's index.
      attention: the family's dense attention function.
      dtype: compute dtype.

    Returns:
      ``(out [batch, seq, heads, head_dim], (k_pages, v_pages))``.
    """
    k_pages = write_pages(layer_cache[0], k, index)
    v_pages = write_pages(layer_cache[1], v, index)
    if isinstance(index, PagedDecode):
        out = paged_attention(q, k_pages, v_pages, index, dtype)
    else:
        out = attention(q, k, v, mask, dtype)
    return out, (k_pages, v_pages)
