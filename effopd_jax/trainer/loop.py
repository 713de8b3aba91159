"""The OPD trainer: set-up from a config, the step, and the loop around it.

    trainer = Trainer(config, workdir)
    trainer.run()            # resumes from workdir's last checkpoint if there is one

One step (:meth:`Trainer.train_one_step`) is four calls: the rollout engine samples the
student's responses; the teacher scores them; the jitted update applies the loss, gradient,
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
from effopd_jax import data, grading, models, objectives, preemption
from effopd_jax import metrics as metrics_lib
from effopd_jax import sharding as sharding_lib
from effopd_jax.effopd import effopd_host_search, effopd_search_due
from effopd_jax.objectives import OPDBatch
from effopd_jax.rollout import Rollout
from effopd_jax.sharding import to_host
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
      parameterization: which part of the student is trained (default: all of it).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, devices=None, log=print,
                 parameterization: Parameterization = FullFineTuning()):
        config_lib.validate_config(config)
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
        self.teacher = setup.load_teacher(config, self.mesh, self.tokenizer, loss=self.loss,
                                          temperature=temperature, log=self.log)
        self.reference = setup.load_reference(config, self.mesh, temperature=temperature, log=self.log)
        self.parameterization = parameterization
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

        # The foresight monitor keeps W_0 = the initial student (taken before any resume).
        self.monitor = setup.make_monitor(config, initial_params, self.student_config)
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

    # -- the step ---------------------------------------------------------------------------

    def train_one_step(self) -> dict:
        """Rollout -> teacher scores -> update (-> EffOPD search). Returns the step's record."""
        step = int(jax.device_get(self.state.step))
        step_key = jax.random.fold_in(jax.random.wrap_key_data(self.state.rng), step)
        learning_rate = float(self.schedule(step))
        clock = Stopwatch()

        rollout = self.engines["rollout"].generate(self.student_params(), self.next_prompt_rows(),
                                                   jax.random.fold_in(step_key, 0))
        clock.lap("rollout_seconds", rollout)
        batch = self.score(rollout)
        clock.lap("teacher_seconds", batch)
        with sharding_lib.sharding_context(self.mesh):
            self.state, update_metrics = self.update(self.state, batch, self.frozen_params)
        update_metrics = jax.device_get(clock.lap("update_seconds", update_metrics))
        record = self._step_record(step, learning_rate, rollout, update_metrics, clock)
        if self.config.effopd.enabled and effopd_search_due(self.state.opt_state):
            record.update(self.effopd_search(step_key))
        record["step_seconds"] = clock.since_start()
        return record

    def student_params(self) -> PyTree:
        """The student's model params (trainable merged with frozen)."""
        return self.parameterization.merge(self.state.trainable_params, self.frozen_params)

    def next_prompt_rows(self) -> list[np.ndarray]:
        """This process's prompts of the next step, each repeated ``samples_per_prompt`` times
        (the rows of one prompt are adjacent)."""
        prompts = next(self.data_iterator)
        return [ids for ids in prompts.prompt_token_ids for _ in range(self.config.rollout.samples_per_prompt)]

    def score(self, rollout: Rollout) -> OPDBatch:
        """The rollout with the teacher's (and G-OPD's pi_B) view of every response token."""
        batch = OPDBatch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                         response_ids=rollout.response_ids, response_mask=rollout.response_mask,
                         behaviour_logprobs=rollout.behaviour_logprobs)
        with sharding_lib.sharding_context(self.mesh):
            batch = self.teacher.score(rollout, batch)
            if self.reference is not None:
                batch = self.reference.score_reference(rollout, batch)
        return batch

    def _step_record(self, step: int, learning_rate: float, rollout: Rollout, update_metrics: dict,
                     clock: Stopwatch) -> dict:
        record = {"step": step + 1, "learning_rate": learning_rate, **clock.laps, **update_metrics}
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
        params, opt_state, report = effopd_host_search(self.state.trainable_params, self.state.opt_state,
                                                       score_fn=score_fn)
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
        meta = {"step": step, "elapsed_seconds": elapsed,
                checkpoint_lib.META_MODEL_CONFIG: self.student_config.to_dict()}
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
        return last

    def export_hf(self, path: str) -> None:
        """Writes the student as an HF checkpoint (config, safetensors, tokenizer); tensors of
        the student's own HF checkpoint that its family does not use (e.g. Qwen3.5's vision tower
        and MTP head) are copied from it unchanged."""
        params = jax.tree.map(to_host, self.student_params())
        if self.is_main:
            source = self.config.student.path
            has_weights = any(os.path.isfile(os.path.join(source, name)) for name in (
                models.hf.SAFE_WEIGHTS_NAME, models.hf.SAFE_WEIGHTS_INDEX_NAME))
            models.save_hf(self.student_config, params, path,
                           carry_from=source if has_weights else None)
            self.tokenizer.save_pretrained(path)
            self.log(f"exported the student to {path}")

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
