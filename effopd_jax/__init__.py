"""effopd_jax: on-policy distillation of Qwen-family models in JAX, with EffOPD.

Modules (one concept each):
  models.qwen   Qwen2 / Qwen2.5 / Qwen3 decoders (Flax Linen) and their KV cache.
  convert       Hugging Face safetensors <-> params pytree.
  sharding      mesh construction and logical-axis rules.
  sampling      jitted KV-cache sampler for student rollouts.
  losses        OPD losses (sampled-token reverse KL, exact / top-k reverse KL).
  effopd        EffOPD as an optax gradient transformation.
  monitor       truncated-SVD "foresight" metrics of weight updates.
  train         the OPD trainer (CLI: python -m effopd_jax.train).
"""

__version__ = "0.1.0"
