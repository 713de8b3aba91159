"""The OPD trainer: rollout -> teacher scoring -> reverse-KL update -> EffOPD, sharded, resumable.

    python -m effopd_jax.train --config=configs/tiny_cpu.py --workdir=runs/tiny [--config.key=value]

One step, top to bottom (:meth:`Trainer.train_one_step`):

1. **Rollout.** The student samples ``samples_per_prompt`` continuations of each prompt of the
   batch (``sampling.generate_padded``; jitted, KV cache, params as arguments). It returns the
   sampled tokens, their behaviour log-probs and the response mask.
2. **Teacher scoring.** The frozen teacher runs one forward pass over prompt + response and
   gives the log-probability of every sampled token (``score_responses``, jitted, no gradient);
   with G-OPD the reference model pi_B does the same. The full-vocabulary losses keep the
   teacher's final hidden states instead.
3. **Update.** ``train_step`` (jitted, state donated): the student's log-probs of its own tokens
   (chunked over the sequence so ``[batch, seq, vocab]`` logits never exist at once), the
   configured loss (default: the authors' sampled-token loss, seq-mean-token-mean), gradients,
   global-norm clip, AdamW. A non-finite loss or gradient leaves params and optimizer state
   untouched and is counted.
4. **EffOPD** (when enabled). The optimizer chain ends in ``effopd(search="host")``; at trigger
   steps (1, 2, 4, 8, ...) ``effopd_host_search`` scores the current point and the extrapolated
   candidates by sampled accuracy on the validation set, keeps the best, and moves the anchor.

Around the step: metrics to ``WORKDIR/metrics.jsonl``, evaluation every ``eval_every`` steps and
at the end (mean@n, pass@n, response length), orbax checkpoints every ``checkpoint_every``
steps and at the end (params, optimizer state with the EffOPD anchor, step, rng, data-iterator
position), and the final student exported as HF safetensors. Re-running the same command with
the same workdir resumes from the last checkpoint.

G-OPD note: with ``loss.reward_scale != 1`` the reference model pi_B is the *initial* student
(or ``loss.base_path``) and stays fixed. The authors' code shares one buffer between pi_B and
EffOPD's anchor, so their pi_B drifts to the last accepted extrapolation (spec §3.6); here the
two are separate on purpose.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import checkpoint as checkpoint_lib
from effopd_jax import config as config_lib
from effopd_jax import convert, data, grading, losses, preemption, sampling
from effopd_jax import metrics as metrics_lib
from effopd_jax import monitor as monitor_lib
from effopd_jax import sharding as sharding_lib
from effopd_jax.effopd import effopd, effopd_host_search, effopd_search_due
from effopd_jax.models.qwen import Qwen, QwenConfig, lm_head_weight

PyTree = Any
BATCH_AXES = sharding_lib.BATCH_AXES


# ---------------------------------------------------------------------------------------------
# State and batch
# ---------------------------------------------------------------------------------------------


class NonFiniteUpdatesError(FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient (``max_consecutive_skips``)."""


class TrainState(NamedTuple):
    """Everything a step changes; a pytree that orbax saves and restores.

    Attributes:
      step: int32 scalar, trainer steps completed (skipped updates included).
      params: the student's params.
      opt_state: the optimizer chain's state (clip, AdamW, and EffOPD's anchor when enabled).
      rng: uint32[2] raw PRNG key; step t uses ``fold_in(rng, t)``.
      skipped_updates: int32 scalar, updates skipped for a non-finite loss or gradient.
      consecutive_skips: int32 scalar, the current run of skipped updates.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    skipped_updates: jax.Array
    consecutive_skips: jax.Array


class RolloutBatch(NamedTuple):
    """One step's training data, all ``[rows, ...]`` with ``rows = prompts * samples_per_prompt``.

    Attributes:
      prompt_ids: ``[rows, prompt_len]`` int32, left-padded.
      prompt_mask: ``[rows, prompt_len]`` bool.
      response_ids: ``[rows, max_new_tokens]`` int32 sampled tokens.
      response_mask: ``[rows, max_new_tokens]`` bool, generated tokens up to and including EOS.
      behaviour_logprobs: ``[rows, max_new_tokens]`` float32, log-probs under the sampler.
      teacher_logprobs: ``[rows, max_new_tokens]`` float32 (sampled-token loss), or None.
      teacher_hidden: ``[rows, max_new_tokens, teacher_hidden]`` (full / top-k KL), or None.
      base_logprobs: ``[rows, max_new_tokens]`` float32 of pi_B (G-OPD), or None.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    behaviour_logprobs: jax.Array
    teacher_logprobs: jax.Array | None = None
    teacher_hidden: jax.Array | None = None
    base_logprobs: jax.Array | None = None


# ---------------------------------------------------------------------------------------------
# Pure functions (jitted by the Trainer)
# ---------------------------------------------------------------------------------------------


def response_hidden_states(
    config: QwenConfig,
    params: PyTree,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    response_ids: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """Final hidden states that predict each response token: ``[rows, max_new_tokens, hidden]``.

    The model runs once over ``prompt + response`` (``[rows, prompt_len + max_new_tokens]``);
    the state at position ``prompt_len - 1 + t`` predicts response token ``t``. Padding is masked
    and positions count real tokens only, as in the sampler.
    """
    prompt_len = prompt_ids.shape[1]
    new_tokens = response_ids.shape[1]
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden = Qwen(config).apply(
        {"params": params}, input_ids, attention_mask=attention_mask, return_hidden_states=True
    )
    return jax.lax.dynamic_slice_in_dim(hidden, prompt_len - 1, new_tokens, axis=1)


def response_logprobs(
    config: QwenConfig,
    params: PyTree,
    batch_arrays: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    temperature: float,
    chunk_size: int,
) -> jax.Array:
    """``log pi(response_t | prompt, response_<t)``: ``[rows, max_new_tokens]`` float32, chunked."""
    prompt_ids, prompt_mask, response_ids, response_mask = batch_arrays
    hidden = response_hidden_states(config, params, prompt_ids, prompt_mask, response_ids, response_mask)
    return losses.chunked_token_logprobs(
        hidden,
        lm_head_weight(config, params),
        response_ids,
        # Never a chunk longer than the response: padding a short response up to the chunk
        # would multiply the lm_head work.
        chunk_size=chunk_size,
        temperature=temperature,
    )


def score_responses(
    config: QwenConfig,
    params: PyTree,
    batch_arrays: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    temperature: float,
    chunk_size: int,
    return_hidden: bool,
) -> jax.Array:
    """A frozen model's view of the rollouts (teacher or pi_B); no gradient flows.

    Returns the sampled-token log-probs ``[rows, max_new_tokens]``, or with ``return_hidden``
    the final hidden states ``[rows, max_new_tokens, hidden]`` for the full-vocabulary losses.
    """
    params = jax.lax.stop_gradient(params)
    if return_hidden:
        return response_hidden_states(config, params, *batch_arrays)
    return response_logprobs(config, params, batch_arrays, temperature=temperature, chunk_size=chunk_size)


def opd_loss(
    params: PyTree,
    batch: RolloutBatch,
    teacher_head: jax.Array | None,
    *,
    student_config: QwenConfig,
    loss_config: ml_collections.ConfigDict,
    temperature: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured OPD loss of the student ``params`` on one rollout batch."""
    arrays = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    mask = batch.response_mask
    if loss_config.name == "sampled_token":
        student_logprobs = response_logprobs(
            student_config, params, arrays, temperature=temperature, chunk_size=loss_config.chunk_size
        )
        return losses.sampled_token_opd_loss(
            student_logprobs,
            batch.teacher_logprobs,
            mask,
            base_logprobs=batch.base_logprobs,
            reward_scale=loss_config.reward_scale,
            behaviour_logprobs=batch.behaviour_logprobs,
            is_threshold=loss_config.is_threshold,
            aggregation=loss_config.aggregation,
        )
    # Exact (or top-k coarse-grained) reverse KL over the vocabulary at every response position.
    hidden = response_hidden_states(student_config, params, *arrays)
    per_token_kl = losses.chunked_reverse_kl(
        hidden,
        lm_head_weight(student_config, params),
        batch.teacher_hidden,
        teacher_head,
        chunk_size=loss_config.chunk_size,
        topk=loss_config.topk if loss_config.name == "topk_reverse_kl" else None,
    )
    loss = losses.aggregate_token_losses(per_token_kl, mask, loss_config.aggregation)
    num_tokens = jnp.maximum(mask.sum(), 1)
    return loss, {"reverse_kl": jnp.sum(jnp.where(mask, per_token_kl, 0.0)) / num_tokens, "num_tokens": mask.sum()}


def train_step(
    state: TrainState,
    batch: RolloutBatch,
    teacher_head: jax.Array | None,
    *,
    optimizer: optax.GradientTransformation,
    student_config: QwenConfig,
    loss_config: ml_collections.ConfigDict,
    temperature: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; skipped (and counted) when the loss or gradient is not finite."""
    loss_fn = functools.partial(
        opd_loss, student_config=student_config, loss_config=loss_config, temperature=temperature
    )
    (loss, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, teacher_head)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zero non-finite gradients before the optimizer sees them, then discard its result: a
    # NaN must not reach Adam's moments even inside the branch that is thrown away.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = (~finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_finite(new_params, state.params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        rng=state.rng,
        skipped_updates=state.skipped_updates + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    step_metrics = dict(loss_metrics)
    step_metrics.update(loss=loss, grad_norm=grad_norm, update_skipped=~finite)
    return new_state, step_metrics


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> AdamW (-> effopd(search="host") when enabled), and the LR schedule."""
    opt = config.optimizer
    if opt.schedule == "constant":
        schedule = optax.constant_schedule(opt.learning_rate)
    elif opt.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(opt.learning_rate, max(config.total_steps - opt.warmup_steps, 1))
    else:
        schedule = optax.linear_schedule(opt.learning_rate, 0.0, max(config.total_steps - opt.warmup_steps, 1))
    if opt.warmup_steps > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), schedule], [opt.warmup_steps]
        )
    parts = [
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    ]
    if config.effopd.enabled:
        parts.append(
            effopd(max_candidates=config.effopd.max_candidates, trigger=config.effopd.trigger, search="host")
        )
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Triggered by ``EFFOPD_DISTRIBUTED=1`` (the launch scripts; JAX then discovers the cluster
    from the TPU / SLURM environment) or by ``EFFOPD_COORDINATOR`` (explicit, e.g. loopback
    tests), with ``EFFOPD_NUM_PROCESSES`` and ``EFFOPD_PROCESS_ID``.
    """
    coordinator = os.environ.get("EFFOPD_COORDINATOR")
    if (coordinator or os.environ.get("EFFOPD_DISTRIBUTED") == "1") and jax.config.jax_platforms == "cpu":
        # CPU processes need a collectives backend to exchange data (multi-process CPU runs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["EFFOPD_NUM_PROCESSES"]),
            process_id=int(os.environ["EFFOPD_PROCESS_ID"]),
        )
    elif os.environ.get("EFFOPD_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process sharded) array as a full numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def global_rows(mesh: Mesh, local_rows: np.ndarray) -> jax.Array:
    """This process's rows of a batch -> one global array sharded over the batch axes."""
    sharding = sharding_lib.batch_sharding(mesh, local_rows.ndim)
    global_shape = (local_rows.shape[0] * jax.process_count(),) + local_rows.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


class Trainer:
    """Holds the run's models, data, compiled functions and state; ``run()`` trains.

    Construction validates the config and every input before anything compiles.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, devices=None, log=print):
        config_lib.validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self._log_every_process = log  # for per-process events (a received signal)
        os.makedirs(self.workdir, exist_ok=True)

        # Mesh: refuses a shape that does not divide the device count.
        try:
            self.mesh = sharding_lib.make_mesh(
                data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor, devices=devices
            )
        except ValueError as e:
            raise ValueError(f"config.mesh: {e}") from e
        batch_shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
        self.rows_per_step = config.data.prompts_per_step * config.rollout.samples_per_prompt
        if self.rows_per_step % batch_shards:
            raise ValueError(
                f"config.data.prompts_per_step * rollout.samples_per_prompt = {self.rows_per_step} rollouts "
                f"per step is not divisible by the mesh's batch shards data*fsdp = {batch_shards}"
            )
        if config.data.prompts_per_step % jax.process_count():
            raise ValueError(
                f"config.data.prompts_per_step={config.data.prompts_per_step} is not divisible by the "
                f"process count {jax.process_count()}"
            )

        # Tokenizer, prompts (filtered and counted up front).
        self.tokenizer = data.load_tokenizer(config.tokenizer or config.student.path)
        self.prompt_len = config.data.max_prompt_length
        load_kwargs = dict(
            max_prompt_length=self.prompt_len,
            chat_template_kwargs=dict(config.data.chat_template_kwargs),
            on_bad_row=config.data.on_bad_row,
        )
        self.train_examples, stats = data.load_prompts(list(config.data.train_files), self.tokenizer, **load_kwargs)
        self.log(f"train data: {stats.summary()}")
        if not self.train_examples:
            raise ValueError(
                f"config.data.train_files: no prompt left after filtering ({stats.summary()}); "
                "raise config.data.max_prompt_length or fix the files"
            )
        self.eval_examples = self._load_eval(config.data.eval_files, config.data.max_eval_prompts, "eval", load_kwargs)
        self.val_examples = (
            self._load_eval(config.effopd.val_files, config.effopd.val_max_prompts, "effopd.val", load_kwargs)
            if config.effopd.enabled
            else []
        )

        # Models.
        self.student_config, params = self._load_model(
            config.init_from or config.student.path, config.student, architecture_path=config.student.path
        )
        self.teacher_config, self.teacher_params = self._load_model(config.teacher.path, config.teacher)
        self._check_vocabularies()
        self.base_params = None
        if config.loss.name == "sampled_token" and config.loss.reward_scale != 1.0:
            # G-OPD's pi_B: fixed, separate from EffOPD's anchor (see the module docstring).
            base_path = config.loss.base_path or config.init_from or config.student.path
            _, self.base_params = self._load_model(base_path, config.student, architecture_path=config.student.path)
        self.eos_token_ids = self._eos_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        # Optimizer and state.
        self.optimizer, self.schedule = make_optimizer(config)
        replicated = NamedSharding(self.mesh, P())
        rng = jax.random.key_data(jax.random.key(config.seed))
        with sharding_lib.sharding_context(self.mesh):
            opt_state = jax.jit(self.optimizer.init)(params)
        def counter():  # a fresh buffer each: the state is donated leaf by leaf
            return jax.device_put(jnp.zeros((), jnp.int32), replicated)

        self.state = TrainState(
            step=counter(),
            params=params,
            opt_state=opt_state,
            rng=jax.device_put(rng, replicated),
            skipped_updates=counter(),
            consecutive_skips=counter(),
        )
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)

        # Compiled functions. Configs are static (hashable); params are arguments.
        temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        self.temperature = temperature
        self._train_step = jax.jit(
            functools.partial(
                train_step,
                optimizer=self.optimizer,
                student_config=self.student_config,
                loss_config=config.loss,
                temperature=temperature,
            ),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        needs_hidden = config.loss.name != "sampled_token"
        self._score_teacher = jax.jit(
            functools.partial(
                score_responses,
                self.teacher_config,
                temperature=temperature,
                chunk_size=config.loss.chunk_size,
                return_hidden=needs_hidden,
            )
        )
        self._score_base = jax.jit(
            functools.partial(
                score_responses,
                self.student_config,
                temperature=temperature,
                chunk_size=config.loss.chunk_size,
                return_hidden=False,
            )
        )
        self.teacher_head = lm_head_weight(self.teacher_config, self.teacher_params) if needs_hidden else None

        # The foresight monitor keeps W_0 = the initial student (taken before any resume).
        self.monitor = None
        if config.monitor.every > 0:
            self.monitor = monitor_lib.Monitor(
                monitor_lib.MonitorConfig(k=config.monitor.k, every=config.monitor.every, per_layer=False),
                self.state.params,
                seed=config.seed,
            )

        # Checkpoints, data iterator, metrics; resume when the workdir has a checkpoint.
        self.checkpointer = checkpoint_lib.RunCheckpointer(
            os.path.join(self.workdir, "checkpoints"), keep=config.keep_checkpoints
        )
        self.data_iterator = self._new_iterator()
        self.elapsed_before = 0.0
        latest = self.checkpointer.latest_step()
        if latest is not None:
            abstract_monitor = None
            if self.monitor is not None:
                replicated_abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)  # noqa: E731
                abstract_monitor = jax.tree.map(
                    replicated_abstract, self.monitor.abstract_reference_bases(self.state.params)
                )
            self.state, data_state, meta, monitor_bases = self.checkpointer.restore(
                latest, checkpoint_lib.abstract_like(self.state), abstract_monitor
            )
            if monitor_bases is not None:
                self.monitor.set_reference_bases(monitor_bases)
            self.data_iterator.set_state(data_state)
            self.elapsed_before = float(meta.get("elapsed_seconds", 0.0))
            self.log(f"resumed from {self.checkpointer.directory} at step {latest}")
        self.start_step = int(jax.device_get(self.state.step))
        # Without a checkpoint nothing in an old metrics.jsonl is valid (resume_step=None clears it).
        self.metrics = metrics_lib.MetricsWriter(
            self.workdir, resume_step=self.start_step if latest is not None else None, enabled=self.is_main
        )

    # -- set-up helpers ---------------------------------------------------------------------

    def _load_eval(self, files, max_prompts: int, field: str, load_kwargs: dict) -> list:
        if not files:
            return []
        examples, stats = data.load_eval_set(
            list(files), self.tokenizer, max_examples=max_prompts or None, **load_kwargs
        )
        self.log(f"{field} data: {stats.summary()}")
        if not examples:
            raise ValueError(f"config.{field}_files: no prompt left after filtering ({stats.summary()})")
        return examples

    def _load_model(self, path: str, model_config, *, architecture_path: str | None = None):
        """Loads an HF directory (or an orbax params checkpoint) straight into sharded arrays."""
        overrides = dict(
            param_dtype=_dtype(model_config.param_dtype),
            dtype=_dtype(model_config.compute_dtype),
            scan_layers=bool(model_config.scan_layers),
            remat=model_config.get("remat", "none"),
        )
        if os.path.exists(os.path.join(path, "config.json")):
            config = QwenConfig.from_hf(path, **overrides)
            shardings = sharding_lib.param_shardings(config, self.mesh)
            _, params = convert.load_hf(
                path, dtype=config.param_dtype, shardings=shardings, scan_layers=config.scan_layers
            )
            return config, params
        # An orbax params checkpoint (python -m effopd_jax.convert hf-to-orbax).
        config = QwenConfig.from_hf(architecture_path, **overrides)
        shardings = sharding_lib.param_shardings(config, self.mesh)
        params = convert.load_orbax_params(path, config, shardings=shardings)
        return config, params

    def _check_vocabularies(self) -> None:
        """The teacher must be able to score every token id the student can emit."""
        student_vocab = len(self.tokenizer)
        if self.teacher_config.vocab_size < student_vocab:
            raise ValueError(
                f"config.teacher.path: the teacher's vocabulary ({self.teacher_config.vocab_size} rows) cannot "
                f"score the student's tokens (tokenizer has {student_vocab} ids)"
            )
        if self.config.teacher.tokenizer:
            teacher_tokenizer = data.load_tokenizer(self.config.teacher.tokenizer)
            if teacher_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(
                    "config.teacher.tokenizer: the teacher's tokenizer maps tokens to different ids than the "
                    "student's; token-level distillation needs one vocabulary"
                )

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set()
        eos = self.student_config.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def _new_iterator(self):
        return data.train_iterator(
            self.train_examples,
            prompts_per_step=self.config.data.prompts_per_step,
            seed=self.config.seed,
            shuffle=self.config.data.shuffle,
            num_epochs=self.config.data.num_epochs or None,
        )

    # -- sampling helpers -------------------------------------------------------------------

    def _sample(self, params, prompt_ids: np.ndarray, prompt_mask: np.ndarray, rng, *, temperature, max_new_tokens):
        """Samples on the mesh from this process's rows; returns global device arrays."""
        return sampling.generate_padded(
            self.student_config,
            params,
            global_rows(self.mesh, prompt_ids),
            global_rows(self.mesh, prompt_mask),
            rng,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=self.config.rollout.top_k,
            top_p=self.config.rollout.top_p,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            mesh=self.mesh,
        )

    def sampled_accuracy(self, params, examples, rng, *, samples_per_prompt, temperature, max_new_tokens) -> dict:
        """Samples answers for ``examples`` and grades them: mean@n, pass@n, mean response length.

        Every process samples the same rows (the prompt set is small) in fixed-size batches of
        ``rows_per_step`` so the rollout's compiled program is reused.
        """
        rows = [e for e in examples for _ in range(samples_per_prompt)]
        batch_rows = self.rows_per_step // jax.process_count()
        correct, lengths = [], []
        for start in range(0, len(rows), self.rows_per_step):
            chunk = rows[start : start + self.rows_per_step]
            padded = chunk + [chunk[-1]] * (self.rows_per_step - len(chunk))  # static batch shape
            mine = padded[jax.process_index() * batch_rows : (jax.process_index() + 1) * batch_rows]
            ids, mask = data.left_pad([e.prompt_token_ids for e in mine], self.pad_token_id, self.prompt_len)
            out = self._sample(
                params, ids, mask, jax.random.fold_in(rng, start), temperature=temperature, max_new_tokens=max_new_tokens
            )
            tokens, out_mask = to_host(out.tokens), to_host(out.mask)
            for row, example in enumerate(chunk):
                text = self.tokenizer.decode(tokens[row][out_mask[row]], skip_special_tokens=True)
                correct.append(grading.grade(text, example.answer, example.data_source))
                lengths.append(int(out_mask[row].sum()))
        per_prompt = np.asarray(correct, np.float32).reshape(len(examples), samples_per_prompt)
        return {
            "mean_at_n": grading.mean_at_n(per_prompt),
            "pass_at_n": grading.pass_at_n(per_prompt),
            "response_length": float(np.mean(lengths)),
            "n": samples_per_prompt,
        }

    # -- the step ---------------------------------------------------------------------------

    def train_one_step(self) -> dict:
        """Rollout -> teacher scoring -> update (-> EffOPD search). Returns the step's metrics."""
        cfg = self.config
        step = int(jax.device_get(self.state.step))
        step_key = jax.random.fold_in(jax.random.wrap_key_data(self.state.rng), step)
        prompts = next(self.data_iterator)
        # Each prompt repeated samples_per_prompt times (rows of one prompt are adjacent).
        prompt_tokens = [ids for ids in prompts.prompt_token_ids for _ in range(cfg.rollout.samples_per_prompt)]
        prompt_ids, prompt_mask = data.left_pad(prompt_tokens, self.pad_token_id, self.prompt_len)

        t0 = time.perf_counter()
        rollout = self._sample(
            self.state.params,
            prompt_ids,
            prompt_mask,
            jax.random.fold_in(step_key, 0),
            temperature=cfg.rollout.temperature,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        jax.block_until_ready(rollout.tokens)
        t1 = time.perf_counter()

        arrays = (global_rows(self.mesh, prompt_ids), global_rows(self.mesh, prompt_mask), rollout.tokens, rollout.mask)
        with sharding_lib.sharding_context(self.mesh):
            teacher_out = self._score_teacher(self.teacher_params, arrays)
            base_logprobs = self._score_base(self.base_params, arrays) if self.base_params is not None else None
        jax.block_until_ready(teacher_out)
        t2 = time.perf_counter()

        needs_hidden = cfg.loss.name != "sampled_token"
        batch = RolloutBatch(
            prompt_ids=arrays[0],
            prompt_mask=arrays[1],
            response_ids=rollout.tokens,
            response_mask=rollout.mask,
            behaviour_logprobs=rollout.logprobs,
            teacher_logprobs=None if needs_hidden else teacher_out,
            teacher_hidden=teacher_out if needs_hidden else None,
            base_logprobs=base_logprobs,
        )
        learning_rate = float(self.schedule(int(jax.device_get(self.state.step))))
        with sharding_lib.sharding_context(self.mesh):
            self.state, step_metrics = self._train_step(self.state, batch, self.teacher_head)
        step_metrics = jax.device_get(step_metrics)
        t3 = time.perf_counter()

        record = {
            "step": step + 1,
            "learning_rate": learning_rate,
            "rollout_seconds": t1 - t0,
            "teacher_seconds": t2 - t1,
            "update_seconds": t3 - t2,
        }
        record.update({k: v for k, v in step_metrics.items()})
        response_tokens = float(to_host(rollout.mask).sum())
        record["response_length"] = response_tokens / self.rows_per_step
        record["tokens_per_second"] = response_tokens / max(t3 - t0, 1e-9)
        if "reverse_kl" not in record and "sampled_reverse_kl" in record:
            record["reverse_kl"] = record["sampled_reverse_kl"]
        record["skipped_updates"] = int(jax.device_get(self.state.skipped_updates))

        if cfg.effopd.enabled and effopd_search_due(self.state.opt_state):
            record.update(self._effopd_search(step_key))
        record["step_seconds"] = time.perf_counter() - t0
        return record

    def _effopd_search(self, step_key) -> dict:
        cfg = self.config
        # Common random numbers: every candidate of one search is scored with the same key, so
        # the comparison between candidates is not drowned by sampling noise.
        val_key = jax.random.fold_in(step_key, 1)
        max_new = cfg.effopd.val_max_new_tokens or cfg.rollout.max_new_tokens

        def score_fn(candidate_params) -> float:
            result = self.sampled_accuracy(
                candidate_params,
                self.val_examples,
                val_key,
                samples_per_prompt=1,
                temperature=cfg.effopd.val_temperature,
                max_new_tokens=max_new,
            )
            return result["mean_at_n"]

        t0 = time.perf_counter()
        params, opt_state, report = effopd_host_search(self.state.params, self.state.opt_state, score_fn=score_fn)
        # Back onto the train step's input shardings, so the next step reuses its compilation.
        params = jax.device_put(params, self.state_shardings.params)
        opt_state = jax.device_put(opt_state, self.state_shardings.opt_state)
        self.state = self.state._replace(params=params, opt_state=opt_state)
        self.log(
            f"effopd @ update {report.step}: multipliers {report.multipliers} scores "
            f"{tuple(round(s, 4) for s in report.scores)} -> accepted x{report.accepted_multiplier:g}"
        )
        return {
            "effopd/searched": True,
            "effopd/scores": list(report.scores),
            "effopd/multipliers": list(report.multipliers),
            "effopd/accepted_multiplier": report.accepted_multiplier,
            "effopd/num_evals": report.num_evals,
            "effopd/seconds": time.perf_counter() - t0,
        }

    # -- the loop ---------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        cfg = self.config
        key = jax.random.fold_in(jax.random.key(cfg.seed), 1_000_003)  # same samples at every eval
        result = self.sampled_accuracy(
            self.state.params,
            self.eval_examples,
            key,
            samples_per_prompt=cfg.eval.samples_per_prompt,
            temperature=cfg.eval.temperature,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        )
        return {f"eval/{k}": v for k, v in result.items()} | {"step": step, "kind": "eval"}

    def save_checkpoint(self, step: int, elapsed: float) -> None:
        self.checkpointer.save(
            step,
            self.state,
            self.data_iterator.get_state(),
            {"step": step, "elapsed_seconds": elapsed},
            monitor=None if self.monitor is None else self.monitor.reference_bases(),
        )

    def _eval_due(self, step: int) -> bool:
        cfg = self.config
        if not self.eval_examples:
            return False
        return step == cfg.total_steps or bool(cfg.eval_every and step % cfg.eval_every == 0)

    def run(self) -> dict:
        """Trains from the current step to ``config.total_steps``; returns the last metrics.

        Everything a step writes (its metrics line, its evaluation) happens before its
        checkpoint, so once checkpoint ``k`` exists, ``metrics.jsonl`` up to step ``k`` is final
        and a resumed run appends from ``k + 1``. On SIGTERM / SIGINT (``config.preemption``) the
        run finishes the current step, checkpoints it, waits for the save and returns early with
        ``preempted=True``; rerunning the same command resumes.

        Raises:
          NonFiniteUpdatesError: ``config.max_consecutive_skips`` updates in a row had a
            non-finite loss or gradient; the last checkpoint (written before them) is intact.
        """
        cfg = self.config
        bar = metrics_lib.ProgressBar(cfg.total_steps, start=self.start_step, enabled=self.is_main)
        t_start = time.perf_counter()
        last: dict = {}
        guard = preemption.PreemptionGuard(
            cfg.preemption.grace_seconds, enabled=cfg.preemption.handle_signals, log=self._log_every_process
        )
        with guard:
            if self.start_step == 0 and self.eval_examples and cfg.eval_every:
                self.metrics.write(self.evaluate(0) | {"elapsed_seconds": 0.0})
            for step in range(self.start_step + 1, cfg.total_steps + 1):
                record = self.train_one_step()
                elapsed = self.elapsed_before + time.perf_counter() - t_start
                if self.monitor is not None and self.monitor.should_run(step):
                    t_monitor = time.perf_counter()
                    record.update(self.monitor.run(step, self.state.params))
                    record["monitor_seconds"] = time.perf_counter() - t_monitor
                record["elapsed_seconds"] = elapsed
                self.metrics.write(record)
                last = record
                bar.update(step, loss=float(record["loss"]), kl=float(record.get("reverse_kl", float("nan"))))
                consecutive = int(jax.device_get(self.state.consecutive_skips))
                if consecutive >= cfg.max_consecutive_skips:
                    self.checkpointer.wait()
                    raise NonFiniteUpdatesError(
                        f"{consecutive} consecutive updates had a non-finite loss or gradient (limit "
                        f"config.max_consecutive_skips={cfg.max_consecutive_skips}); stopping at step {step}. "
                        f"The last good checkpoint (step {self.checkpointer.latest_step()}) is in "
                        f"{self.checkpointer.directory}"
                    )
                if self._eval_due(step):
                    evaluation = self.evaluate(step)
                    self.metrics.write(
                        evaluation | {"elapsed_seconds": self.elapsed_before + time.perf_counter() - t_start}
                    )
                    last = last | evaluation
                stopping = guard.should_stop()
                if stopping or step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                    self.save_checkpoint(step, elapsed)
                if stopping:
                    self.checkpointer.wait()
                    self.log(
                        f"stopped at step {step} ({guard.received or 'signal on another process'}); "
                        f"checkpoint saved in {self.checkpointer.directory}; rerun the same command to resume"
                    )
                    return last | {"preempted": True}
        self.checkpointer.wait()
        if cfg.export_hf:
            self.export_hf(os.path.join(self.workdir, "hf"))
        return last

    def export_hf(self, path: str) -> None:
        """Writes the student as an HF checkpoint (config, safetensors, tokenizer)."""
        params = jax.tree.map(to_host, self.state.params)
        if self.is_main:
            convert.save_hf(self.student_config, params, path)
            self.tokenizer.save_pretrained(path)
            self.log(f"exported the student to {path}")

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


# Exit codes of ``python -m effopd_jax.train`` besides 0 (finished, or stopped by a signal with
# a checkpoint written) and 1 (an error; see the message).
EXIT_NONFINITE = 3  # NonFiniteUpdatesError: max_consecutive_skips reached


def main(argv) -> None:
    del argv
    from absl import flags  # noqa: PLC0415

    config = flags.FLAGS.config
    maybe_initialize_distributed()
    trainer = Trainer(config, flags.FLAGS.workdir)
    try:
        last = trainer.run()
    except NonFiniteUpdatesError as e:
        print(f"effopd_jax.train: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE) from None
    finally:
        trainer.close()
    if trainer.is_main:
        summary = {
            k: v
            for k, v in metrics_lib._to_python(last).items()
            if not isinstance(v, list) and not k.startswith("monitor/")
        }
        print(json.dumps(summary, sort_keys=True))


def _define_flags() -> None:
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "Path to a config file exporting get_config().")
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, hf export).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app  # noqa: PLC0415

    _define_flags()
    app.run(main)
