"""effopd_jax: on-policy distillation of Qwen-family models in JAX, with EffOPD.

Modules (one concept each; the seams and how to extend them: docs/architecture.md):
  models      the model registry: load_hf / save_hf / forward / layout over every family
              (Qwen2 / Qwen2.5 / Qwen3 in models/qwen.py).
  rollout     rollout engines: the student's samples of a step (static KV-cache engine today).
  teachers    frozen models that score the student's rollouts.
  objectives  OPD losses by name (sampled-token, exact / top-k reverse KL) and what they need.
  losses      the losses' math (chunked over the sequence).
  effopd      EffOPD as an optax gradient transformation.
  trainer     the OPD trainer (state, jitted update, set-up, loop); CLI: python -m effopd_jax.train.
  config      the config schema (defaults, ranges, when each field applies).
  monitor     truncated-SVD "foresight" metrics of weight updates; analyze: the offline CLI.
  sharding, sampling, convert, data, grading, checkpoint, metrics, preemption, testing.
"""

__version__ = "0.1.0"
