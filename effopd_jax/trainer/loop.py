"""The OPD trainer: set-up from a config, the step, and the loop around it.

    trainer = Trainer(config, workdir)
    trainer.run()            # resumes from workdir's last checkpoint if there is one

One step (:meth:`Trainer.train_one_step`) is four calls: the rollout engine samples the
student's responses; the teachers score them (each the rows routed to it, with its own prompt); the jitted update applies the loss, gradient,
clipping, AdamW; at EffOPD's trigger steps the host search scores extrapolated candidates on
the validation set and keeps the best. Around the step: metrics, evaluation, checkpoints,
the foresight monitor, the preemption guard, and the final HF export.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import checkpoint as checkpoint_lib
from effopd_jax import config as config_lib
from effopd_jax import data, grading, lora, models, objectives, preemption
from effopd_jax import metrics as metrics_lib
from effopd_jax import sharding as sharding_lib
from effopd_jax.effopd import effopd_host_search, effopd_search_due, find_effopd_state
from effopd_jax.objectives import OPDBatch
from effopd_jax.rollout import Rollout
from effopd_jax.sharding import to_host
from effopd_jax.teachers import TeacherStepStats
from effopd_jax.trainer import setup
from effopd_jax.trainer.state import FullFineTuning, NonFiniteUpdatesError, Parameterization, new_train_state
from effopd_jax.trainer.step import make_optimizer, update_step

PyTree = Any


class Stopwatch:
    """Wall-clock laps of a step; a lap waits for the device work it names to finish."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str, outputs: Any) -> Any:
        """Blocks until ``outputs`` are computed and records the time since the previous lap."""
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
        return outputs

    def since_start(self) -> float:
        return time.perf_counter() - self.start


class Trainer:
    """Holds the run's models, data, compiled functions and state; :meth:`run` trains.

    Construction validates the config and every input before anything compiles.

    Args:
      config: a config built on ``effopd_jax.config.default_config()``.
      workdir: the run directory (checkpoints, metrics.jsonl, the HF export).
      devices: the devices of the mesh (default: all).
      log: where progress lines go (process 0 only).
      parameterization: which part of the student is trained. Default: from the config
        (``config.lora.enabled``: low-rank adapters, :class:`effopd_jax.lora.LoRA`; otherwise all
        of it, :class:`FullFineTuning`).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, devices=None, log=print,
                 parameterization: Parameterization | None = None):
        config_lib.validate_config(config)
        if config.plan_only:
            raise ValueError("config.plan_only: a Trainer trains; for the plan run python -m effopd_jax.train "
                             "--config.plan_only=True, or effopd_jax.plan.make_plan(config, target)")
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self._log_every_process = log  # for per-process events (a received signal)
        os.makedirs(self.workdir, exist_ok=True)

        self.mesh = setup.make_mesh(config, devices)
        self.rows_per_step = setup.rows_per_step(config, self.mesh)
        self.tokenizer = setup.load_tokenizer(config)
        self.prompts = setup.load_prompt_sets(config, self.tokenizer, self.log)

        # Models: the student (split into trainable and frozen), the teacher, pi_B for G-OPD.
        self.loss = objectives.get_loss(config.loss.name)
        # Teacher and student score at the sampling temperature (greedy rollouts: T = 1).
        temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        self.student_config, initial_params = setup.load_model(
            config.student, self.mesh, weights=config.init_from, log=self.log, role="student")
        self.reference = setup.load_reference(config, self.mesh, temperature=temperature, log=self.log)
        # The teachers (routed, with their own prompts rendered for every training example).
        self.teacher = setup.load_teachers(
            config, self.mesh, self.tokenizer, loss=self.loss, temperature=temperature,
            student_config=self.student_config, initial_params=initial_params, train_examples=self.prompts.train,
            reference=self.reference, rows_per_step=self.rows_per_step, log=self.log)
        self.parameterization = parameterization = self._choose_parameterization(parameterization)
        trainable_params, self.frozen_params = parameterization.split(initial_params)
        self.engines = setup.rollout_engines(config, self.student_config, self.mesh, self.tokenizer)

        # Optimizer, state, and the compiled update.
        self.optimizer, self.schedule = make_optimizer(
            config.optimizer, total_steps=config.total_steps, effopd_config=config.effopd,
            param_filter=parameterization.param_filter(models.layout(self.student_config)))
        with sharding_lib.sharding_context(self.mesh):
            self.state = new_train_state(trainable_params, self.optimizer, seed=config.seed, mesh=self.mesh)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        settings = objectives.LossSettings(
            aggregation=config.loss.aggregation, chunk_size=config.loss.chunk_size, temperature=temperature,
            reward_scale=config.loss.reward_scale, is_threshold=config.loss.is_threshold, topk=config.loss.topk)
        self.update = jax.jit(
            functools.partial(update_step, optimizer=self.optimizer, model_config=self.student_config,
                              parameterization=parameterization, loss=self.loss, settings=settings),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
            donate_argnums=(0,),
        )

        # The foresight monitor keeps W_0 = the initial student as the forward sees it (taken
        # before any resume): for adapters on a cast base, the merge of that base, so that
        # W_t - W_0 is exactly the merged update (A·B), not the base's rounding.
        self.monitor = setup.make_monitor(config, parameterization.merge(trainable_params, self.frozen_params),
                                          self.student_config)
        del initial_params
        self.checkpointer = checkpoint_lib.RunCheckpointer(
            os.path.join(self.workdir, "checkpoints"), keep=config.keep_checkpoints)
        self.data_iterator = data.train_iterator(
            self.prompts.train, prompts_per_step=config.data.prompts_per_step, seed=config.seed,
            shuffle=config.data.shuffle, num_epochs=config.data.num_epochs or None)
        self.elapsed_before = 0.0
        resumed = self._restore_latest_checkpoint()
        self.start_step = int(jax.device_get(self.state.step))
        # Without a checkpoint nothing in an old metrics.jsonl is valid (resume_step=None clears it).
        self.metrics = metrics_lib.MetricsWriter(
            self.workdir, resume_step=self.start_step if resumed else None, enabled=self.is_main)

    def _choose_parameterization(self, given: Parameterization | None) -> Parameterization:
        if given is not None:
            if self.config.lora.enabled:
                raise ValueError("config.lora.enabled: Trainer(parameterization=...) was given too; use one of the two")
            return given
        if self.config.lora.enabled:
            chosen = lora.from_config(self.config, self.student_config)
            self.log(f"LoRA student: rank {chosen.rank}, alpha {chosen.alpha:g} on {', '.join(chosen.modules)} "
                     f"({len(chosen.kernel_paths)} matrices); frozen base in {chosen.base_dtype}")
            return chosen
        return FullFineTuning()

    # -- the step ---------------------------------------------------------------------------

    def train_one_step(self) -> dict:
        """Rollout -> teacher scores -> update (-> EffOPD search). Returns the step's record."""
        step = int(jax.device_get(self.state.step))
        step_key = jax.random.fold_in(jax.random.wrap_key_data(self.state.rng), step)
        learning_rate = float(self.schedule(step))
        clock = Stopwatch()

        rows = self.next_rows()
        rollout = self.engines["rollout"].generate(self.student_params(), rows.prompt_token_ids,
                                                   jax.random.fold_in(step_key, 0))
        clock.lap("rollout_seconds", rollout)
        batch, teacher_stats = self.score(rollout, rows)
        clock.lap("teacher_seconds", batch)
        with sharding_lib.sharding_context(self.mesh):
            self.state, update_metrics = self.update(self.state, batch, self.frozen_params)
        update_metrics = jax.device_get(clock.lap("update_seconds", update_metrics))
        record = self._step_record(step, learning_rate, rollout, update_metrics, clock)
        record.update(self.teacher.step_metrics(jax.device_get(teacher_stats), update_metrics))
        if self.config.effopd.enabled and effopd_search_due(self.state.opt_state):
            record.update(self.effopd_search(step_key))
        record["step_seconds"] = clock.since_start()
        return record

    def student_params(self) -> PyTree:
        """The student's model params (trainable merged with frozen)."""
        return self.parameterization.merge(self.state.trainable_params, self.frozen_params)

    def next_rows(self) -> data.PromptBatch:
        """This process's rows of the next step: its prompts, each repeated ``samples_per_prompt``
        times (the rows of one prompt are adjacent), with their raw messages, solutions and tags."""
        return next(self.data_iterator).repeat(self.config.rollout.samples_per_prompt)

    def next_prompt_rows(self) -> list[np.ndarray]:
        """The prompt token ids of :meth:`next_rows`."""
        return self.next_rows().prompt_token_ids

    def score(self, rollout: Rollout, rows: data.PromptBatch) -> tuple[OPDBatch, TeacherStepStats]:
        """The rollout with the teachers' (and G-OPD's pi_B) view of every response token.

        ``rows`` are this process's rows of the step (:meth:`next_rows`): the teachers route them
        and render their own prompts from them. A live-student teacher scores with the params
        that sampled the rollout, the same the update differentiates at (before the update)."""
        batch = OPDBatch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                         response_ids=rollout.response_ids, response_mask=rollout.response_mask,
                         behaviour_logprobs=rollout.behaviour_logprobs)
        with sharding_lib.sharding_context(self.mesh):
            live = self.student_params() if self.teacher.has_live_student else None
            batch, stats = self.teacher.score_with_stats(rollout, batch, example_ids=rows.example_ids,
                                                         student_params=live)
            if self.reference is not None:
                batch = self.reference.score_reference(rollout, batch)
        return batch, stats

    def _step_record(self, step: int, learning_rate: float, rollout: Rollout, update_metrics: dict,
                     clock: Stopwatch) -> dict:
        # The per-teacher sums become reverse_kl/<name> (TeacherSet.step_metrics), not records.
        vectors = (objectives.TEACHER_REVERSE_KL_SUM, objectives.TEACHER_NUM_TOKENS)
        scalars = {k: v for k, v in update_metrics.items() if k not in vectors}
        record = {"step": step + 1, "learning_rate": learning_rate, **clock.laps, **scalars}
        response_tokens = float(to_host(rollout.response_mask).sum())
        record["response_length"] = response_tokens / self.rows_per_step
        record["tokens_per_second"] = response_tokens / max(clock.last - clock.start, 1e-9)
        if "reverse_kl" not in record and "sampled_reverse_kl" in record:
            record["reverse_kl"] = record["sampled_reverse_kl"]
        record["skipped_updates"] = int(jax.device_get(self.state.skipped_updates))
        return record

    def effopd_search(self, step_key: jax.Array) -> dict:
        """EffOPD's host search at a trigger step: candidates scored by accuracy on the validation
        set; the accepted point replaces the trainable params and moves the anchor."""
        cfg = self.config
        # Common random numbers: every candidate of one search is scored with the same key, so
        # the comparison between candidates is not drowned by sampling noise.
        val_key = jax.random.fold_in(step_key, 1)

        def score_fn(candidate) -> float:
            params = self.parameterization.merge(candidate, self.frozen_params)
            return self.sampled_accuracy(params, self.prompts.validation, val_key, engine="validation",
                                         samples_per_prompt=1)["mean_at_n"]

        start = time.perf_counter()
        # A parameterization may extrapolate differently (LoRA: in the merged space).
        extrapolation = getattr(self.parameterization, "effopd_extrapolation", lambda: None)()
        theta, anchor = self.state.trainable_params, find_effopd_state(self.state.opt_state).anchor
        params, opt_state, report = effopd_host_search(theta, self.state.opt_state, score_fn=score_fn,
                                                       extrapolate=extrapolation)
        extra = {}
        if extrapolation is not None:
            # How far the accepted point's product is from the extrapolated one (0 when exact).
            extra["effopd/lora_refactor_error"] = (
                0.0 if report.accepted_index == 0
                else self.parameterization.refactor_error(theta, anchor, report.accepted_multiplier))
        # Back onto the update's input shardings, so the next step reuses its compilation.
        params = jax.device_put(params, self.state_shardings.trainable_params)
        opt_state = jax.device_put(opt_state, self.state_shardings.opt_state)
        self.state = self.state._replace(trainable_params=params, opt_state=opt_state)
        self.log(
            f"effopd @ update {report.step}: multipliers {report.multipliers} scores "
            f"{tuple(round(s, 4) for s in report.scores)} -> accepted x{report.accepted_multiplier:g}")
        return {
            "effopd/searched": True,
            "effopd/scores": list(report.scores),
            "effopd/multipliers": list(report.multipliers),
            "effopd/accepted_multiplier": report.accepted_multiplier,
            "effopd/num_evals": report.num_evals,
            "effopd/seconds": time.perf_counter() - start,
            **extra,
        }

    # -- evaluation -------------------------------------------------------------------------

    def sampled_accuracy(self, params: PyTree, examples, key: jax.Array, *, engine: str,
                         samples_per_prompt: int) -> dict:
        """Samples answers for ``examples`` with ``self.engines[engine]`` and grades them:
        mean@n, pass@n, mean response length.

        Every process samples the same rows (the prompt set is small) in fixed-size batches of
        ``rows_per_step`` so the engine's compiled program is reused.
        """
        rows = [e for e in examples for _ in range(samples_per_prompt)]
        batch_rows = self.rows_per_step // jax.process_count()
        correct, lengths = [], []
        for start in range(0, len(rows), self.rows_per_step):
            chunk = rows[start : start + self.rows_per_step]
            padded = chunk + [chunk[-1]] * (self.rows_per_step - len(chunk))  # static batch shape
            mine = padded[jax.process_index() * batch_rows : (jax.process_index() + 1) * batch_rows]
            out = self.engines[engine].generate(params, [e.prompt_token_ids for e in mine],
                                                jax.random.fold_in(key, start))
            tokens, mask = to_host(out.response_ids), to_host(out.response_mask)
            for row, example in enumerate(chunk):
                text = self.tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True)
                correct.append(grading.grade(text, example.answer, example.data_source))
                lengths.append(int(mask[row].sum()))
        per_prompt = np.asarray(correct, np.float32).reshape(len(examples), samples_per_prompt)
        return {
            "mean_at_n": grading.mean_at_n(per_prompt),
            "pass_at_n": grading.pass_at_n(per_prompt),
            "response_length": float(np.mean(lengths)),
            "n": samples_per_prompt,
        }

    def evaluate(self, step: int) -> dict:
        """mean@n, pass@n and response length on the evaluation set (same samples every time)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), 1_000_003)
        result = self.sampled_accuracy(self.student_params(), self.prompts.eval, key, engine="eval",
                                       samples_per_prompt=self.config.eval.samples_per_prompt)
        return {f"eval/{k}": v for k, v in result.items()} | {"step": step, "kind": "eval"}

    def _eval_due(self, step: int) -> bool:
        if not self.prompts.eval:
            return False
        return step == self.config.total_steps or bool(self.config.eval_every and step % self.config.eval_every == 0)

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, step: int, elapsed: float) -> None:
        describe = getattr(self.parameterization, "to_dict", None)
        meta = {"step": step, "elapsed_seconds": elapsed,
                checkpoint_lib.META_MODEL_CONFIG: self.student_config.to_dict(),
                checkpoint_lib.META_PARAMETERIZATION: describe() if describe else {"name": self.parameterization.name}}
        self.checkpointer.save(step, self.state, self.data_iterator.get_state(), meta,
                               monitor=None if self.monitor is None else self.monitor.reference_bases())

    def _restore_latest_checkpoint(self) -> bool:
        """Restores state, data position, elapsed time and monitor bases from the workdir's
        latest checkpoint; False when there is none."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return False
        abstract_monitor = None
        if self.monitor is not None:
            replicated = NamedSharding(self.mesh, P())
            abstract_monitor = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                self.monitor.abstract_reference_bases(self.student_params()))
        self.state, data_state, meta, monitor_bases = self.checkpointer.restore(
            latest, checkpoint_lib.abstract_like(self.state), abstract_monitor)
        if monitor_bases is not None:
            self.monitor.set_reference_bases(monitor_bases)
        self.data_iterator.set_state(data_state)
        self.elapsed_before = float(meta.get("elapsed_seconds", 0.0))
        self.log(f"resumed from {self.checkpointer.directory} at step {latest}")
        return True

    # -- the loop ---------------------------------------------------------------------------

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
            cfg.preemption.grace_seconds, enabled=cfg.preemption.handle_signals, log=self._log_every_process)
        with guard:
            if self.start_step == 0 and self.prompts.eval and cfg.eval_every:
                self.metrics.write(self.evaluate(0) | {"elapsed_seconds": 0.0})
            for step in range(self.start_step + 1, cfg.total_steps + 1):
                record = self.train_one_step()
                elapsed = self.elapsed_before + time.perf_counter() - t_start
                if self.monitor is not None and self.monitor.should_run(step):
                    t_monitor = time.perf_counter()
                    record.update(self.monitor.run(step, self.student_params()))
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
                        f"{self.checkpointer.directory}")
                if self._eval_due(step):
                    evaluation = self.evaluate(step)
                    self.metrics.write(
                        evaluation | {"elapsed_seconds": self.elapsed_before + time.perf_counter() - t_start})
                    last = last | evaluation
                stopping = guard.should_stop()
                if stopping or step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                    self.save_checkpoint(step, elapsed)
                if stopping:
                    self.checkpointer.wait()
                    self.log(
                        f"stopped at step {step} ({guard.received or 'signal on another process'}); "
                        f"checkpoint saved in {self.checkpointer.directory}; rerun the same command to resume")
                    return last | {"preempted": True}
        self.checkpointer.wait()
        if cfg.export_hf:
            self.export_hf(os.path.join(self.workdir, "hf"))
            if hasattr(self.parameterization, "save_adapters"):
                self.export_adapters(os.path.join(self.workdir, lora.PEFT_DIRECTORY))
        return last

    def export_hf(self, path: str) -> None:
        """Writes the student as an HF checkpoint (config, safetensors, tokenizer) in
        ``student.param_dtype`` (for adapters: the merge W + s·A·B, and the frozen rest cast up);
        tensors of the student's own HF checkpoint that its family does not use (e.g. Qwen3.5's
        vision tower and MTP head) are copied from it unchanged."""
        params = jax.tree.map(to_host, self.student_params())
        if self.is_main:
            source = self.config.student.path
            has_weights = any(os.path.isfile(os.path.join(source, name)) for name in (
                models.hf.SAFE_WEIGHTS_NAME, models.hf.SAFE_WEIGHTS_INDEX_NAME))
            models.save_hf(self.student_config, params, path, dtype=self.student_config.param_dtype,
                           carry_from=source if has_weights else None)
            self.tokenizer.save_pretrained(path)
            self.log(f"exported the student to {path}")

    def export_adapters(self, path: str) -> None:
        """Writes the trainable adapters in their own format (LoRA: PEFT's ``adapter_config.json``
        + ``adapter_model.safetensors``), for the base the run started from."""
        adapters = jax.tree.map(to_host, self.state.trainable_params)
        base = self.config.init_from or self.config.student.path
        base = base if os.path.isfile(os.path.join(base, "config.json")) else ""
        if self.is_main:
            self.parameterization.save_adapters(self.student_config, adapters, path, base_model_name_or_path=base)
            self.log(f"exported the adapters to {path}")

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
