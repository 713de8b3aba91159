"""Time breakdown of one OPD step: effopd_jax's Trainer vs an OPD loop built from google-tunix.

Both sides start from the same two random Qwen3 checkpoints (``effopd_jax.testing.
write_random_checkpoint``: real Qwen3 vocabulary 151,936 and tokenizer, tied embeddings,
RoPE base 1e6), the same GSM8K prompts through the Qwen3 chat template, the same rollout shape
(``--prompts`` rows, left-padded to ``--prompt-len``, ``--new-tokens`` sampled at temperature 1),
the same loss (the authors' sampled-token OPD loss, ``effopd_jax.losses.sampled_token_opd_loss``,
seq-mean-token-mean, truncated importance weight against the sampler's log-probs) and the same
optimizer (global-norm clip 1.0 -> AdamW(0.9, 0.999, wd 0.01), constant LR).

ours  ``effopd_jax.train.Trainer.train_one_step`` with EffOPD on (searches at updates 1, 2, 4,
      ...; validation = ``--val-prompts`` GSM8K prompts, one sample each). Its own timers:
      ``rollout_seconds`` (``sampling.generate_padded``), ``teacher_seconds`` (jitted teacher
      forward, log-probs of the sampled tokens, lm_head on response positions only),
      ``update_seconds`` (jitted, donated ``train_step``), ``effopd/seconds`` (host search).
peer  tunix 0.1.7 pieces, as a user would assemble them (tunix has no on-policy distillation
      trainer: ``tunix.distillation.DistillationTrainer`` distils on a fixed dataset, and its
      strategies (logit / attention / feature) are forward-KL-style losses on given tokens):
        rollout: ``tunix.generate.sampler.Sampler`` over tunix's NNX ``Qwen3`` (loaded from the
                 same safetensors), ``return_logprobs=True``, weights refreshed from the trained
                 model each step (``sampler.transformer_state = nnx.variables(model, nnx.Param)``,
                 as tunix's RL rollout does);
        teacher: ``DistillationTrainer``'s own teacher pass (``strategy.get_teacher_outputs``,
                 an ``nnx.jit``-ed forward of tunix's teacher ``Qwen3``) returning the teacher
                 log-probs of the sampled tokens;
        update:  ``DistillationTrainer.train`` (its jitted ``nnx.value_and_grad`` +
                 ``nnx.Optimizer`` step) with a custom ``BaseStrategy`` whose loss is the same
                 ``sampled_token_opd_loss`` on the student's log-probs of the sampled tokens.
      tunix's Qwen3 has no "hidden states only" call, so the peer's teacher and student forwards
      produce ``[rows, prompt_len + new_tokens, vocab]`` logits (the usual tunix path); ours
      applies the lm_head to the response positions only (chunked). No EffOPD on the peer (tunix
      has none).

Timing: one warm-up step for ours and two for the peer (tunix's train step compiles again on
its second call), then ``--steps`` rounds, each running one step
of ours and one of the peer in turn (so load bursts from other processes hit both alike).
Medians per phase; ours / peer ratio (< 1: ours faster). tokens/s = sampled response tokens /
(rollout + teacher + update), EffOPD excluded.

Run (bench environment, see benchmarks/README.md):
  .venv-bench/bin/python benchmarks/opd_step.py [--steps 5 --prompts 8 --new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_TOKENIZER_DIR = os.path.join(REPO_ROOT, "third_party", "qwen3_tokenizer")
GSM8K_FILE = os.path.join(REPO_ROOT, "third_party", "gsm8k", "gsm8k_test_100.jsonl")

IS_THRESHOLD = 5.0  # the trainer's default loss.is_threshold


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed rounds after the warm-up step")
    p.add_argument("--prompts", type=int, default=8, help="rollouts per step (1 sample per prompt)")
    p.add_argument("--prompt-len", type=int, default=192, help="prompts are left-padded to this")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--val-prompts", type=int, default=8, help="EffOPD validation prompts")
    p.add_argument("--student", type=str, default="256x4", help="hidden x layers")
    p.add_argument("--teacher", type=str, default="512x4", help="hidden x layers")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="ours' loss.chunk_size (0: = --new-tokens). losses.chunked_token_logprobs "
                        "zero-pads the response to a multiple of chunk_size, so the default 512 "
                        "computes 512 lm_head rows per sequence however short the response")
    p.add_argument("--cache", type=str, default=os.path.join(tempfile.gettempdir(), "effopd_bench_opd_step"))
    p.add_argument("--skip-peer", action="store_true")
    return p.parse_args(argv)


def model_config(spec: str):
    from effopd_jax.testing import tiny_qwen3_config

    hidden, layers = (int(v) for v in spec.lower().split("x"))
    head_dim = 64
    heads = max(hidden // head_dim, 2)
    return tiny_qwen3_config(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=2,
                             head_dim=head_dim, intermediate_size=3 * hidden)


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------
def make_ours(args, student_path: str, teacher_path: str, workdir: str):
    from effopd_jax import train
    from effopd_jax.config import default_config

    c = default_config()
    c.seed = 0
    c.total_steps = 1000
    c.checkpoint_every = 1000
    c.eval_every = 0
    c.export_hf = False
    c.student.update(path=student_path, param_dtype="float32", compute_dtype="float32")
    c.teachers[0].update(path=teacher_path, param_dtype="float32", compute_dtype="float32")
    c.data.update(train_files=(GSM8K_FILE,), prompts_per_step=args.prompts, max_prompt_length=args.prompt_len)
    c.rollout.update(max_new_tokens=args.new_tokens, temperature=1.0, samples_per_prompt=1)
    c.loss.update(chunk_size=args.chunk_size or args.new_tokens)
    c.optimizer.update(learning_rate=args.learning_rate)
    c.effopd.update(enabled=True, val_files=(GSM8K_FILE,), val_max_prompts=args.val_prompts)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    trainer = train.Trainer(c, workdir, devices=jax.devices()[:1], log=lambda *a, **k: None)
    return trainer, c


# ---------------------------------------------------------------------------------------------
# Peer: tunix Sampler + DistillationTrainer with an on-policy sampled-token strategy
# ---------------------------------------------------------------------------------------------
def tunix_sequence_inputs(input_tokens: jax.Array, input_mask: jax.Array):
    """Positions [B, L] counting real tokens and the [B, L, L] causal mask over real tokens."""
    mask = input_mask.astype(jnp.bool_)
    positions = jnp.cumsum(mask, axis=-1) - 1
    positions = jnp.maximum(positions, 0).astype(jnp.int32)
    seq = input_tokens.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
    attention_mask = causal[None] & mask[:, None, :]
    return positions, attention_mask


def tunix_response_logprobs(model, input_tokens, input_mask, response_mask, behaviour_logprobs):
    """log pi(y_t | prefix) of the response tokens: [B, T], from tunix's full-logit forward."""
    del behaviour_logprobs
    new_tokens = response_mask.shape[1]
    prompt_len = input_tokens.shape[1] - new_tokens
    positions, attention_mask = tunix_sequence_inputs(input_tokens, input_mask)
    logits, _ = model(input_tokens, positions, None, attention_mask)  # [B, L, V]
    logits = jax.lax.dynamic_slice_in_dim(logits, prompt_len - 1, new_tokens, axis=1).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    targets = input_tokens[:, prompt_len:]
    return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


def make_peer(args, student_path: str, teacher_path: str, tokenizer):
    import optax
    from flax import nnx
    from tunix.distillation import distillation_trainer
    from tunix.distillation.strategies import base_strategy
    from tunix.generate import sampler as tunix_sampler

    from effopd_jax import losses

    student = _peers.load_tunix_qwen3(student_path, dtype=jnp.float32)
    teacher = _peers.load_tunix_qwen3(teacher_path, dtype=jnp.float32)
    hf = _peers.read_hf_config(student_path)

    class SampledTokenOPDStrategy(base_strategy.BaseStrategy):
        """The authors' sampled-token OPD loss on rollouts, as a tunix distillation strategy."""

        def compute_loss(self, student_output, teacher_output, labels):
            response_mask, behaviour_logprobs = labels
            return losses.sampled_token_opd_loss(
                student_output, teacher_output, response_mask,
                behaviour_logprobs=behaviour_logprobs, is_threshold=IS_THRESHOLD)

        def compute_eval_loss(self, student_output, labels):
            raise NotImplementedError("no evaluation in this benchmark")

    @flax.struct.dataclass(frozen=True)
    class OPDInput(distillation_trainer.TrainingInput):
        response_mask: Any = None
        behaviour_logprobs: Any = None

    timings: dict[str, float] = {}

    class OnPolicyDistillationTrainer(distillation_trainer.DistillationTrainer):
        """Keeps the rollout fields through `_prepare_inputs` and times the teacher pass."""

        def _prepare_inputs(self, input_data):
            inputs = self.gen_model_input_fn(input_data)["inputs"]
            t0 = time.perf_counter()
            teacher_output = jax.block_until_ready(self.strategy.get_teacher_outputs(self.teacher_model, inputs))
            timings["teacher"] = time.perf_counter() - t0
            return OPDInput(input_tokens=input_data.input_tokens, input_mask=input_data.input_mask,
                            response_mask=input_data.response_mask,
                            behaviour_logprobs=input_data.behaviour_logprobs, teacher_output=teacher_output)

    strategy = SampledTokenOPDStrategy(
        student_forward_fn=tunix_response_logprobs,
        teacher_forward_fn=tunix_response_logprobs,
        labels_fn=lambda input_tokens, input_mask, response_mask, behaviour_logprobs: (
            response_mask, behaviour_logprobs),
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(args.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
    trainer = OnPolicyDistillationTrainer(
        student, teacher, strategy, optimizer,
        distillation_trainer.TrainingConfig(eval_every_n_steps=10 ** 9, max_steps=None, pbar_description=None))
    trainer.with_gen_model_input_fn(lambda x: {
        "input_tokens": x.input_tokens, "input_mask": x.input_mask,
        "response_mask": x.response_mask, "behaviour_logprobs": x.behaviour_logprobs})
    # One batch per train() call: without this, train() skips the first `_iter_steps` examples
    # of each new iterator (resume logic) and closes the trainer at the end.
    trainer.is_managed_externally = True

    cache_config = tunix_sampler.CacheConfig(
        cache_size=args.prompt_len + args.new_tokens, num_layers=int(hf["num_hidden_layers"]),
        num_kv_heads=int(hf["num_key_value_heads"]), head_dim=int(hf["head_dim"]))
    sampler = tunix_sampler.Sampler(trainer.model, tokenizer, cache_config)
    eos_ids = sorted({tokenizer.eos_token_id, 151645})

    def step(prompt_texts: list[str], seed: int) -> dict[str, float]:
        t0 = time.perf_counter()
        sampler.transformer_state = nnx.variables(trainer.model, nnx.Param)
        out = sampler(prompt_texts, max_generation_steps=args.new_tokens, max_prompt_length=args.prompt_len,
                      temperature=1.0, top_p=1.0, seed=seed, eos_tokens=eos_ids, return_logprobs=True,
                      pad_output=True)
        prompt_ids = np.asarray(out.padded_prompt_tokens, np.int32)
        response_ids = np.stack([np.asarray(t, np.int32)[: args.new_tokens] for t in out.tokens])
        behaviour = np.asarray(out.logprobs, np.float32)[:, : args.new_tokens]
        # Tokens after the first EOS are padding (pad_output); EOS itself counts, as in ours.
        is_eos = np.isin(response_ids, eos_ids)
        after_eos = np.cumsum(is_eos, axis=1) - is_eos > 0
        response_mask = ~after_eos
        prompt_mask = prompt_ids != tokenizer.pad_token_id
        t1 = time.perf_counter()
        batch = OPDInput(
            input_tokens=jnp.asarray(np.concatenate([prompt_ids, response_ids], axis=1)),
            input_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], axis=1)),
            response_mask=jnp.asarray(response_mask), behaviour_logprobs=jnp.asarray(behaviour))
        trainer.train([batch])
        t2 = time.perf_counter()
        tokens = float(response_mask.sum())
        return {"rollout_seconds": t1 - t0, "teacher_seconds": timings["teacher"],
                "update_seconds": t2 - t1 - timings["teacher"], "tokens": tokens,
                "tokens_per_second": tokens / (t2 - t0)}

    return step


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    from effopd_jax.testing import write_random_checkpoint

    student_path = write_random_checkpoint(os.path.join(args.cache, f"student_{args.student}"),
                                           model_config(args.student), seed=1, tokenizer_dir=QWEN3_TOKENIZER_DIR)
    teacher_path = write_random_checkpoint(os.path.join(args.cache, f"teacher_{args.teacher}"),
                                           model_config(args.teacher), seed=2, tokenizer_dir=QWEN3_TOKENIZER_DIR)
    print(f"jax {jax.__version__} devices {jax.devices()} | student {args.student} teacher {args.teacher} "
          f"(hidden x layers, vocab 151936, tied) | {args.prompts} rollouts x prompt {args.prompt_len} + "
          f"{args.new_tokens} new tokens | ours loss.chunk_size {args.chunk_size or args.new_tokens} | EffOPD val {args.val_prompts} prompts | load {os.getloadavg()}")

    workdir = tempfile.mkdtemp(prefix="opd_step_")
    ours, _ = make_ours(args, student_path, teacher_path, workdir)
    peer = None if args.skip_peer else make_peer(args, student_path, teacher_path, ours.tokenizer)

    rng = np.random.default_rng(0)
    examples = ours.prompts.train

    def peer_prompts() -> list[str]:
        picks = rng.choice(len(examples), size=args.prompts, replace=False)
        return [ours.tokenizer.decode(examples[i].prompt_token_ids) for i in picks]

    ours_records, peer_records = [], []
    for round_index in range(args.steps + 1):  # round 0: compile / warm-up, not counted
        t0 = time.perf_counter()
        record = ours.train_one_step()
        record["wall"] = time.perf_counter() - t0
        (ours_records if round_index else []).append(record)
        line = (f"round {round_index}: ours step {record['step']} rollout {record['rollout_seconds']:.3f} "
                f"teacher {record['teacher_seconds']:.3f} update {record['update_seconds']:.3f}")
        if record.get("effopd/searched"):
            line += f" effopd {record['effopd/seconds']:.3f} ({record['effopd/num_evals']} evals)"
        if peer is not None:
            p = peer(peer_prompts(), seed=round_index)
            (peer_records if round_index else []).append(p)
            line += (f" | peer rollout {p['rollout_seconds']:.3f} teacher {p['teacher_seconds']:.3f} "
                     f"update {p['update_seconds']:.3f}")
        print(line + f" | load {os.getloadavg()[0]:.2f}", flush=True)
        if round_index == 0 and peer is not None:
            # tunix's jitted train step compiles a second time on its second call (the optimizer
            # state comes back from the first with different shardings / types), so the peer
            # gets one more warm-up step; ours' second step is timed (no recompilation).
            p = peer(peer_prompts(), seed=10_000)
            print(f"peer warm-up 2: rollout {p['rollout_seconds']:.3f} teacher {p['teacher_seconds']:.3f} "
                  f"update {p['update_seconds']:.3f}", flush=True)
    ours.close()

    effopd = [r["effopd/seconds"] for r in ours_records if r.get("effopd/searched")]
    effopd_steps = [r["step"] for r in ours_records if r.get("effopd/searched")]
    print(f"\nmedians over {args.steps} steps after warm-up (seconds; ratio = ours / peer, < 1: ours faster)")
    print(f"{'phase':<22}{'ours':>10}{'peer':>10}{'ratio':>8}")
    for key, name in (("rollout_seconds", "rollout"), ("teacher_seconds", "teacher scoring"),
                      ("update_seconds", "update"), ("tokens_per_second", "tokens/s")):
        o = median([float(r[key]) for r in ours_records])
        pv = median([float(r[key]) for r in peer_records]) if peer_records else float("nan")
        print(f"{name:<22}{o:>10.3f}{pv:>10.3f}{o / pv:>8.2f}")
    o_step = median([r["rollout_seconds"] + r["teacher_seconds"] + r["update_seconds"] for r in ours_records])
    p_step = median([r["rollout_seconds"] + r["teacher_seconds"] + r["update_seconds"] for r in peer_records]) \
        if peer_records else float("nan")
    print(f"{'step (excl. EffOPD)':<22}{o_step:>10.3f}{p_step:>10.3f}{o_step / p_step:>8.2f}")
    print(f"{'EffOPD search':<22}{median(effopd):>10.3f}{'n/a':>10}{'':>8}  (ours at steps {effopd_steps}; "
          "the peer has no EffOPD)")
    searched = [r["step_seconds"] for r in ours_records if r.get("effopd/searched")]
    print(f"{'step at EffOPD trigger':<22}{median(searched):>10.3f}{'':>18}  (rollout + teacher + update + search)")


if __name__ == "__main__":
    main()
