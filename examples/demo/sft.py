"""Supervised warm-up (SFT) of a Qwen model on prompt/response rows: the demo's teacher and student.

    python -m examples.demo.sft --task_dir DIR --tokenizer DIR --out DIR [--hidden_size 64 ...]

Teacher forcing on ``chat_template(prompt) + response + <|im_end|>``; the loss is the mean
next-token cross-entropy over the response tokens only (the final ``<|im_end|>`` included, so
the model learns to stop):

    L(theta) = - sum_{b,t} m[b,t] log p_theta(x[b,t+1] | x[b,<=t]) / sum_{b,t} m[b,t]

with ``m[b,t] = 1`` iff token ``t+1`` of row ``b`` is a response token. AdamW with a linear
warm-up then cosine decay (or a constant rate), global-norm clipping, one jitted step. Greedy
test accuracy comes from :func:`effopd_jax.sampling.generate` and the task's exact-match checker.

Stopping: after ``steps`` steps, or (``stop_band=(low, high)``, the demo's student) at the first
evaluation whose greedy accuracy on the task's ``validation.jsonl`` lies in ``[low, high]``
(:class:`BandStop`): the student is then as weak as the band says on every seed, instead of
wherever a fixed step count happens to leave it.
The result is an HF checkpoint (``models.save_hf``) plus the tokenizer files, so the trainer loads it like any Qwen
checkpoint. Everything is a function of the arguments and the seed (init, data order).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effopd_jax import data, grading, models, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.testing import tiny_qwen3_config

PyTree = Any
MARKER_FILE = "effopd_sft.json"
SFT_SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """Hyper-parameters of one warm-up run (all part of the cache key)."""

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    max_train_examples: int = 0  # 0: all rows of train.jsonl
    max_test_examples: int = 0  # 0: all rows of test.jsonl
    eval_batch_size: int = 128
    # "cosine": warm-up then cosine decay to 10% of the peak (a converged, annealed model);
    # "constant": warm-up then the peak rate to the end (an under-trained model, stopped mid-run
    # in a flat region, that a later fine-tuning step of moderate size does not throw off).
    schedule: str = "cosine"
    # Stopping rule: None trains exactly ``steps`` steps. ``(low, high)``: greedy accuracy on the
    # task's validation split is measured every ``stop_eval_every`` steps and training stops at the
    # first evaluation in [low, high] (``steps`` is then the most it may train); see BandStop.
    stop_band: tuple[float, float] | None = None
    stop_eval_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size", "stop_eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTSettings.{name}: must be >= 1, got {getattr(self, name)}")
        if self.stop_band is not None:
            low, high = self.stop_band
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"SFTSettings.stop_band: need 0 <= low <= high <= 1, got {self.stop_band}")
            object.__setattr__(self, "stop_band", (float(low), float(high)))
        if self.learning_rate <= 0:
            raise ValueError(f"SFTSettings.learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"SFTSettings.warmup_steps: must be in [0, steps], got {self.warmup_steps}")
        if self.schedule not in SFT_SCHEDULES:
            raise ValueError(f"SFTSettings.schedule: must be one of {SFT_SCHEDULES}, got {self.schedule!r}")


def read_rows(path: str, limit: int = 0) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file (the first ``limit`` when ``limit > 0``)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-templated prompt with the assistant generation prompt, as token ids."""
    text = data.render_prompt(tokenizer, [{"role": "user", "content": prompt}], chat_template_kwargs={})
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_sft_rows(tokenizer, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded teacher-forcing arrays for ``prompt + response + eos``.

    Returns:
      ``input_ids [n, seq]`` int32, ``attention_mask [n, seq]`` bool, ``loss_mask [n, seq]``
      float32 where ``loss_mask[i, t] = 1`` iff token ``t + 1`` is a response token (so the
      prediction made at position ``t`` is scored). ``seq`` is the longest row rounded up to 8.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos token; SFT needs one to teach the model to stop")
    sequences, prompt_lengths = [], []
    for row in rows:
        prompt = prompt_token_ids(tokenizer, row["prompt"])
        response = list(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        sequences.append(prompt + response + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt))
    seq = -(-max(len(s) for s in sequences) // 8) * 8
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), seq), pad, np.int32)
    attention = np.zeros((len(rows), seq), bool)
    loss_mask = np.zeros((len(rows), seq), np.float32)
    for i, (tokens, prompt_len) in enumerate(zip(sequences, prompt_lengths)):
        ids[i, : len(tokens)] = tokens
        attention[i, : len(tokens)] = True
        # Position t predicts token t+1: score t in [prompt_len - 1, len - 2].
        loss_mask[i, prompt_len - 1 : len(tokens) - 1] = 1.0
    return ids, attention, loss_mask


def sft_loss(
    params: PyTree, config: QwenConfig, input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array
) -> jax.Array:
    """Masked mean next-token cross-entropy (module docstring). Inputs ``[batch, seq]``; scalar out."""
    logits = models.forward(config, params, input_ids, attention_mask=attention_mask)  # [b, s, v]
    token_nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
    mask = loss_mask[:, :-1]
    return jnp.sum(token_nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_sft_optimizer(settings: SFTSettings) -> optax.GradientTransformation:
    """Clip -> AdamW with linear warm-up, then cosine decay to 10% of the peak or a constant rate."""
    if settings.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=settings.learning_rate,
            warmup_steps=settings.warmup_steps,
            decay_steps=settings.steps,
            end_value=0.1 * settings.learning_rate,
        )
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, settings.learning_rate, settings.warmup_steps),
             optax.constant_schedule(settings.learning_rate)],
            [settings.warmup_steps],
        )
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=settings.weight_decay),
    )


class SFTStopError(RuntimeError):
    """The SFT run could not stop inside ``SFTSettings.stop_band`` (the message says why)."""


class BandStop:
    """Where a band-stopped SFT run stops, from the validation accuracies measured along it.

    The run evaluates every ``every`` steps and calls :meth:`decide` with each accuracy:

    * in ``[low, high]``: ``"stop"`` -- keep this model;
    * below ``low``: ``"continue"``; the trainer keeps a snapshot of this point;
    * above ``high`` (the accuracy jumped over the band between two evaluations): ``"rewind"`` --
      the trainer goes back to the last snapshot and replays the same steps (same data order,
      bit-identical on one machine) evaluating after *every* step; a second jump over the band
      then raises :class:`SFTStopError` (the band is narrower than one step's change).

    Pure bookkeeping (no training), so the rule is testable on made-up accuracy sequences.
    """

    def __init__(self, band: tuple[float, float], every: int):
        self.low, self.high = band
        self.every = every
        self.rewound = False
        self.history: list[tuple[int, float]] = []

    def due(self, step: int) -> bool:
        """Whether to evaluate after 1-based step ``step``."""
        return self.rewound or step % self.every == 0

    def decide(self, step: int, accuracy: float) -> str:
        self.history.append((step, float(accuracy)))
        if self.low <= accuracy <= self.high:
            return "stop"
        if accuracy < self.low:
            return "continue"
        if self.rewound:
            raise SFTStopError(
                f"SFTSettings.stop_band={(self.low, self.high)}: validation accuracy jumped over the band in one "
                f"step ({self.history[-2:] if len(self.history) > 1 else self.history}); widen the band or lower "
                f"the learning rate. Evaluations (step, accuracy): {self.history}")
        self.rewound = True
        return "rewind"


def sft_step(params, opt_state, batch, *, config: QwenConfig, optimizer: optax.GradientTransformation):
    """One AdamW step on ``batch = (input_ids, attention_mask, loss_mask)``; returns (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(sft_loss)(params, config, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def greedy_accuracy(
    config: QwenConfig, params: PyTree, tokenizer, rows: Sequence[dict], *, max_new_tokens: int,
    batch_size: int = 128, mesh=None,
) -> float:
    """Fraction of ``rows`` whose greedy answer the row's grader accepts (exact match here)."""
    eos = (tokenizer.eos_token_id,)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        out = sampling.generate(
            config, params, [prompt_token_ids(tokenizer, r["prompt"]) for r in chunk],
            max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos, pad_token_id=pad, mesh=mesh,
        )
        for row, tokens, mask in zip(chunk, out.tokens, out.mask):
            text = tokenizer.decode(tokens[mask], skip_special_tokens=True)
            correct += grading.grade(text, row["answer"], row["data_source"]) > 0
    return correct / len(rows)


def run_sft(
    model_config: QwenConfig,
    task_dir: str,
    tokenizer_dir: str,
    out_dir: str,
    settings: SFTSettings = SFTSettings(),
    *,
    devices: Sequence[jax.Device] | None = None,
    log: Callable[..., None] = print,
) -> dict:
    """Trains ``model_config`` from a random init on ``task_dir/train.jsonl``; saves to ``out_dir``.

    Trains ``settings.steps`` steps, or with ``settings.stop_band`` until the greedy validation
    accuracy lands in the band (:class:`BandStop`). Reuses ``out_dir`` when its marker records the
    same architecture, settings and data files (content digests), so repeated demos are cheap.

    Returns:
      ``{"test_accuracy", "final_loss", "train_seconds", "steps_trained", ...}`` (also written to
      the marker); with a band also ``validation_accuracy`` (where it stopped) and
      ``validation_history`` (every ``[step, accuracy]`` evaluated).

    Raises:
      SFTStopError: with a band, when the accuracy never reaches it in ``steps`` steps or jumps
        over it within one step.
    """
    tokenizer = data.load_tokenizer(tokenizer_dir)
    if model_config.vocab_size < len(tokenizer):
        raise ValueError(f"model_config.vocab_size: {model_config.vocab_size} < tokenizer size {len(tokenizer)}")
    digest_files = [os.path.join(task_dir, f"{split}.jsonl") for split in ("train", "test")]
    if settings.stop_band is not None:  # the stopping rule reads the validation split too
        digest_files.append(os.path.join(task_dir, "validation.jsonl"))
    key = {"config": model_config.to_hf(), "settings": dataclasses.asdict(settings),
           "task": _file_digest(*digest_files)}
    key = json.loads(json.dumps(key))
    marker_path = os.path.join(out_dir, MARKER_FILE)
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            marker = json.load(f)
        if marker.get("key") == key:
            log(f"sft: reusing {out_dir} (test accuracy {marker['result']['test_accuracy']:.3f})")
            return marker["result"]

    train_rows = read_rows(os.path.join(task_dir, "train.jsonl"), settings.max_train_examples)
    test_rows = read_rows(os.path.join(task_dir, "test.jsonl"), settings.max_test_examples)
    input_ids, attention, loss_mask = encode_sft_rows(tokenizer, train_rows)
    max_new_tokens = int(loss_mask.sum(axis=1).max()) + 8  # longest response + slack

    mesh = sharding_lib.make_mesh(data=1, fsdp=1, tensor=1, devices=list(devices or jax.devices())[:1])
    shardings = sharding_lib.param_shardings(model_config, mesh)
    params = models.init_params(model_config, jax.random.key(settings.seed), shardings=shardings)
    optimizer = make_sft_optimizer(settings)
    opt_state = optimizer.init(params)
    step_fn = jax.jit(functools.partial(sft_step, config=model_config, optimizer=optimizer), donate_argnums=(0, 1))

    band = None
    if settings.stop_band is not None:
        band = BandStop(settings.stop_band, settings.stop_eval_every)
        val_rows = read_rows(os.path.join(task_dir, "validation.jsonl"))

    order_rng = np.random.default_rng(settings.seed)
    order = order_rng.permutation(len(train_rows))
    cursor = 0
    # What a rewind returns to (host copies: the step donates its inputs).
    snapshot = (0, jax.device_get((params, opt_state)), order, cursor, order_rng.bit_generator.state)
    t0 = time.perf_counter()
    losses = []
    step = 0
    stopped_at = None
    while step < settings.steps:
        if cursor + settings.batch_size > len(order):  # a new epoch, reshuffled
            order, cursor = order_rng.permutation(len(train_rows)), 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        with sharding_lib.sharding_context(mesh):
            params, opt_state, loss = step_fn(params, opt_state, (input_ids[idx], attention[idx], loss_mask[idx]))
        step += 1
        if step % max(1, settings.steps // 10) == 0 or step == settings.steps:
            losses.append(float(loss))
            log(f"sft step {step}/{settings.steps}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
        if band is None or not band.due(step):
            continue
        val_accuracy = greedy_accuracy(model_config, params, tokenizer, val_rows, max_new_tokens=max_new_tokens,
                                       batch_size=settings.eval_batch_size, mesh=mesh)
        decision = band.decide(step, val_accuracy)
        if decision == "stop":
            stopped_at = step
            losses.append(float(loss))
            log(f"sft: validation accuracy {val_accuracy:.3f} in the band {settings.stop_band} at step {step}: stop")
            break
        if decision == "rewind":
            log(f"sft: validation accuracy {val_accuracy:.3f} above the band at step {step}; replaying from step "
                f"{snapshot[0]} with an evaluation after every step")
            step, host_state, order, cursor, rng_state = snapshot
            params, opt_state = jax.device_put(host_state, jax.tree.map(lambda x: x.sharding, (params, opt_state)))
            order_rng.bit_generator.state = rng_state
            continue
        snapshot = (step, jax.device_get((params, opt_state)), order, cursor, order_rng.bit_generator.state)
    if band is not None and stopped_at is None:
        raise SFTStopError(
            f"SFTSettings.stop_band={settings.stop_band}: validation accuracy never reached the band in "
            f"SFTSettings.steps={settings.steps} steps; raise steps or lower the band. Evaluations (step, "
            f"accuracy): {band.history}")
    train_seconds = time.perf_counter() - t0

    params = jax.device_get(params)
    accuracy = greedy_accuracy(
        model_config, params, tokenizer, test_rows, max_new_tokens=max_new_tokens, batch_size=settings.eval_batch_size
    )
    log(f"sft: greedy test accuracy {accuracy:.3f} on {len(test_rows)} problems")
    os.makedirs(out_dir, exist_ok=True)
    models.save_hf(model_config, params, out_dir)
    tokenizer.save_pretrained(out_dir)
    result = {
        "test_accuracy": accuracy,
        "final_loss": losses[-1],
        "train_seconds": train_seconds,
        "num_test": len(test_rows),
        "max_new_tokens": max_new_tokens,
        "steps_trained": step,
    }
    if band is not None:
        result["validation_accuracy"] = band.history[-1][1]
        result["validation_history"] = [list(point) for point in band.history]
    with open(marker_path, "w") as f:  # written last: a half-written directory is redone
        json.dump({"key": key, "result": result}, f, indent=2)
    return result


def _file_digest(*paths: str) -> list[str]:
    """Content digests of the data files (the cache must notice regenerated task files)."""
    import hashlib  # noqa: PLC0415

    digests = []
    for path in paths:
        with open(path, "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest()[:16])
    return digests


def qwen3_for_task(vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int = 4,
                   num_kv_heads: int = 2, head_dim: int = 16, intermediate_size: int | None = None,
                   eos_token_id: int, pad_token_id: int) -> QwenConfig:
    """A small Qwen3-architecture config over the task's tokenizer (tied embeddings, float32).

    ``effopd_jax.testing.tiny_qwen3_config`` with the task's short context: RoPE base 1e4, 512 positions.
    """
    config = tiny_qwen3_config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size or 2 * hidden_size,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return dataclasses.replace(
        config, rope_theta=10_000.0, max_position_embeddings=512, param_dtype=jnp.float32, dtype=jnp.float32
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task_dir", required=True, help="holds train.jsonl and test.jsonl")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--out", required=True, help="output HF checkpoint directory")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=SFTSettings.steps)
    parser.add_argument("--batch_size", type=int, default=SFTSettings.batch_size)
    parser.add_argument("--learning_rate", type=float, default=SFTSettings.learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = data.load_tokenizer(args.tokenizer)
    config = qwen3_for_task(
        len(tokenizer), hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
    )
    settings = SFTSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                           warmup_steps=min(50, args.steps), seed=args.seed)
    print(json.dumps(run_sft(config, args.task_dir, args.tokenizer, args.out, settings), indent=2))


if __name__ == "__main__":
    main()
