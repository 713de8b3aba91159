"""Shared helpers for the benchmarks: peer implementations and machine ceilings.

Not part of the library and never imported by it. These helpers run in the bench environment
(`.venv-bench`, see benchmarks/README.md), which has `google-tunix`, `transformers` and CPU
`torch` next to `effopd_jax`.

What lives here:
  * `write_tiny_qwen3_checkpoint`: a random Qwen3 checkpoint made by `transformers` and written
    with `save_pretrained`, the one input every implementation loads.
  * Loaders of that checkpoint into the peers: Tunix's NNX `Qwen3` (`load_tunix_qwen3`) and
    `transformers`' torch `Qwen3ForCausalLM` (`load_torch_qwen3`), plus `tunix_causal_inputs`,
    the positions / mask arguments Tunix's forward takes.
  * Machine ceilings: `measure_matmul_flops` (a large fp32 matmul, in JAX and optionally torch)
    and `measure_copy_bandwidth` (a memory-bound elementwise pass), so achieved FLOP/s and
    bytes/s can be put next to what the machine can do at all.
  * `matmul_flops_per_token` / `qwen_forward_flops`: the FLOP count of a dense Qwen forward.
  * `time_calls`: median wall time of a blocking callable.
  * `parse_skip` / `set_up_and_print_environment`: the peer benchmarks' shared command line and
    environment header.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Tunix 0.1.7's Qwen3 attention calls `apply_rope(..., head_dim=...)` without passing
# `ModelConfig.rope_theta`, so its RoPE base is always the default below whatever the config says.
TUNIX_QWEN3_FIXED_ROPE_THETA = 1_000_000.0


# ---------------------------------------------------------------------------------------------
# Command line and environment shared by the peer benchmarks
# ---------------------------------------------------------------------------------------------
PEERS = ("tunix", "torch")


def parse_skip(text: str) -> set[str]:
    """``--skip`` (a comma list of peers) as a set; unknown names are refused."""
    skip = {s for s in text.split(",") if s}
    if skip - set(PEERS):
        raise ValueError(f"--skip: unknown names {sorted(skip - set(PEERS))} (known: {PEERS})")
    return skip


def set_up_and_print_environment(skip: set[str], *, torch_threads: int = 0) -> None:
    """Sets torch's thread count (0: all cores) and prints devices, versions and the load."""
    import flax
    import torch
    import transformers

    cores = os.cpu_count() or 1
    torch.set_num_threads(torch_threads or cores)
    versions = [f"jax {jax.__version__}", f"flax {flax.__version__}", f"torch {torch.__version__}",
                f"transformers {transformers.__version__}"]
    if "tunix" not in skip:
        from importlib.metadata import version
        versions.append(f"google-tunix {version('google-tunix')}")
    print(f"devices: {jax.devices()}  cpu cores: {cores}  torch threads: {torch.get_num_threads()}")
    print("versions: " + ", ".join(versions))
    print("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


# ---------------------------------------------------------------------------------------------
# The shared checkpoint
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TinyQwen3Spec:
    """Sizes of the benchmark's Qwen3 (Hugging Face field names)."""

    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1536
    vocab_size: int = 32000
    rope_theta: float = TUNIX_QWEN3_FIXED_ROPE_THETA
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


def write_tiny_qwen3_checkpoint(path: str | os.PathLike, spec: TinyQwen3Spec, seed: int = 0) -> dict[str, Any]:
    """Writes a random fp32 `Qwen3ForCausalLM` with `save_pretrained` and returns its config dict.

    The RMSNorm weights (all ones after `transformers`' init) are set to `1 + 0.1 * N(0, 1)`, so
    that a loader that swaps or drops a norm weight gives visibly different logits.

    Args:
      path: output directory (created if missing).
      spec: the sizes.
      seed: torch RNG seed.

    Returns:
      The `config.json` written, as a dict.
    """
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings,
        # transformers' Qwen3Config defaults to rope_theta 1e4; the published Qwen3 models use 1e6.
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        max_position_embeddings=4096,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a Hugging Face model directory."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def hf_rope_theta(hf_config: Mapping[str, Any]) -> float:
    """RoPE base of a HF config (transformers >= 5 writes `rope_parameters`, older `rope_theta`)."""
    rope_parameters = hf_config.get("rope_parameters") or {}
    if "rope_theta" in rope_parameters:
        return float(rope_parameters["rope_theta"])
    if "rope_theta" in hf_config:
        return float(hf_config["rope_theta"])
    raise ValueError("config.json has neither rope_parameters.rope_theta nor rope_theta")


# ---------------------------------------------------------------------------------------------
# Tunix
# ---------------------------------------------------------------------------------------------
def tunix_qwen3_config(hf_config: Mapping[str, Any], dtype: Any = jnp.float32):
    """Tunix `ModelConfig` equivalent to a HF Qwen3 `config.json` dict.

    Field map: hidden_size -> embed_dim, intermediate_size -> hidden_dim,
    num_hidden_layers -> num_layers, num_attention_heads -> num_heads,
    num_key_value_heads -> num_kv_heads, rms_norm_eps -> norm_eps,
    tie_word_embeddings -> use_tied_embedding. Compute and parameter dtype are both `dtype`.

    Raises:
      ValueError: `model_type` is not qwen3, or the RoPE base differs from the one Tunix 0.1.7
        hard-codes (its attention ignores `ModelConfig.rope_theta`, so the logits would differ).
    """
    from tunix.models.qwen3 import model as tunix_model

    if hf_config.get("model_type") != "qwen3":
        raise ValueError(f"config model_type={hf_config.get('model_type')!r}: only qwen3 maps to tunix Qwen3")
    rope_theta = hf_rope_theta(hf_config)
    if rope_theta != TUNIX_QWEN3_FIXED_ROPE_THETA:
        raise ValueError(
            f"config rope_theta={rope_theta}: tunix 0.1.7 Qwen3 always uses "
            f"{TUNIX_QWEN3_FIXED_ROPE_THETA} (its attention does not pass ModelConfig.rope_theta)")
    return tunix_model.ModelConfig(
        num_layers=int(hf_config["num_hidden_layers"]),
        vocab_size=int(hf_config["vocab_size"]),
        embed_dim=int(hf_config["hidden_size"]),
        hidden_dim=int(hf_config["intermediate_size"]),
        num_heads=int(hf_config["num_attention_heads"]),
        head_dim=int(hf_config["head_dim"]),
        num_kv_heads=int(hf_config["num_key_value_heads"]),
        rope_theta=int(rope_theta),
        norm_eps=float(hf_config["rms_norm_eps"]),
        use_tied_embedding=bool(hf_config.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
    )


def load_tunix_qwen3(path: str | os.PathLike, dtype: Any = jnp.float32):
    """Loads a HF Qwen3 safetensors directory into Tunix's NNX `Qwen3` module.

    Uses `tunix.models.qwen3.params.create_model_from_safe_tensors`, which maps
    `model.layers.{i}.self_attn.q_proj.weight` [heads*head_dim, hidden] to
    `layers.{i}.attn.q_proj.w` [hidden, heads, head_dim] (and so on) and places every tensor
    on the first device when no mesh is given.

    Returns:
      The `tunix.models.qwen3.model.Qwen3` module (an `nnx.Module` with its weights).
    """
    from tunix.models.qwen3 import params as tunix_params

    config = tunix_qwen3_config(read_hf_config(path), dtype=dtype)
    return tunix_params.create_model_from_safe_tensors(os.fspath(path), config, dtype=dtype)


def tunix_causal_inputs(batch: int, seq: int) -> tuple[jax.Array, jax.Array]:
    """The `positions` [batch, seq] int32 and causal `attention_mask` [batch, seq, seq] bool
    that Tunix's `Qwen3.__call__(tokens, positions, cache, attention_mask)` takes for unpadded
    sequences without a cache (mask[b, t, s] = s <= t)."""
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    causal = jnp.tril(jnp.ones((seq, seq), dtype=jnp.bool_))
    return positions, jnp.broadcast_to(causal, (batch, seq, seq))


# ---------------------------------------------------------------------------------------------
# transformers / torch
# ---------------------------------------------------------------------------------------------
def load_torch_qwen3(path: str | os.PathLike, attn_implementation: str = "sdpa"):
    """`transformers.AutoModelForCausalLM` in fp32 on CPU, in eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(path), dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------
def matmul_params(hf_config: Mapping[str, Any]) -> int:
    """Number of weights that take part in a matmul per token of a dense Qwen forward:
    q/k/v/o and gate/up/down in every layer, plus the lm_head (tied or not; the embedding
    lookup is a gather, not a matmul)."""
    hidden = int(hf_config["hidden_size"])
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config["num_key_value_heads"])
    head_dim = int(hf_config["head_dim"])
    inter = int(hf_config["intermediate_size"])
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter
    return int(hf_config["num_hidden_layers"]) * per_layer + hidden * int(hf_config["vocab_size"])


def qwen_forward_flops(hf_config: Mapping[str, Any], batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward over `[batch, seq]` tokens.

    `2 * matmul_params * batch * seq` for the weight matmuls plus, per layer,
    `4 * batch * heads * seq^2 * head_dim` for the scores `QK^T` and the mix `PV` computed over the
    full `seq x seq` square (all three implementations compute the masked half too).
    A forward+backward costs three times this.
    """
    heads = int(hf_config["num_attention_heads"])
    head_dim = int(hf_config["head_dim"])
    layers = int(hf_config["num_hidden_layers"])
    weights = 2.0 * matmul_params(hf_config) * batch * seq
    attention = 4.0 * layers * batch * heads * seq * seq * head_dim
    return weights + attention


# ---------------------------------------------------------------------------------------------
# Timing and machine ceilings
# ---------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall seconds of `reps` calls of `fn`, which must block until its result is ready."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def measure_matmul_flops(n: int = 2048, reps: int = 5, with_torch: bool = False) -> dict[str, float]:
    """Best achieved FLOP/s of an `[n, n] @ [n, n]` fp32 matmul (2 n^3 FLOPs).

    Returns `{"jax": flop_per_s}` and, with `with_torch`, `"torch"` too (torch uses its own
    BLAS, so its ceiling can differ from XLA's on the same CPU). The best of `reps` runs after a
    warm-up is reported, as the ceiling the machine can reach.
    """
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    results: dict[str, float] = {}

    matmul = jax.jit(jnp.dot)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    matmul(a, b).block_until_ready()
    results["jax"] = flops / min(time_calls(lambda: matmul(a, b).block_until_ready(), reps))

    if with_torch:
        import torch

        ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
        torch.mm(ta, tb)
        results["torch"] = flops / min(time_calls(lambda: torch.mm(ta, tb), reps))
    return results


def measure_copy_bandwidth(num_bytes: int = 256 * 2 ** 20, reps: int = 5) -> float:
    """Best achieved bytes/s of a jitted fp32 `x + 1` over a `num_bytes` array.

    Counts one read and one write of the array (`2 * num_bytes` per call): the memory ceiling a
    memory-bound step such as single-token decoding can reach.
    """
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    add_one = jax.jit(lambda v: v + 1.0)
    add_one(x).block_until_ready()
    return 2.0 * num_bytes / min(time_calls(lambda: add_one(x).block_until_ready(), reps))
