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

from effopd_jax import batching
from effopd_jax import checkpoint as checkpoint_lib
from effopd_jax import config as config_lib
from effopd_jax import data, grading, lora, models, objectives, preemption
from effopd_jax import metrics as metrics_lib
from effopd_jax import sharding as sharding_lib
from effopd_jax.effopd import (
    EffOPDSearchReport,
    ItemwiseScore,
    effopd_host_search,
    effopd_search_due,
    find_effopd_state,
)
from effopd_jax.objectives import OPDBatch
from effopd_jax.rollout import Rollout, cast_rollout_params
from effopd_jax.sampling import batch_shards
from effopd_jax.sharding import to_host
from effopd_jax.teachers import TeacherStepStats
from effopd_jax.trainer import setup
from effopd_jax.trainer.heldout import heldout_reverse_kl, kl_rise_warning, sample_prefixes
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


def format_search(report: EffOPDSearchReport) -> str:
    """One log line of an EffOPD search: multipliers, scores (``<=x``: a bound, scoring stopped
    early), the accepted multiplier and, with an itemwise score, the prompts decoded."""
    scores = [f"{s:.4f}" if exact else f"<={s:.4f}"
              for s, exact in zip(report.scores, report.exact or (True,) * len(report.scores))]
    line = (f"effopd @ update {report.step}: multipliers {tuple(round(m, 4) for m in report.multipliers)} "
            f"scores ({', '.join(scores)}) -> accepted x{report.accepted_multiplier:g}")
    if report.num_items:
        line += (f"; decoded {sum(report.items_scored)} of {report.num_items * len(report.items_scored)} "
                 f"validation prompts")
    return line


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
        if config.pack_sequences and not models.family_for(self.student_config).supports_packing:
            raise ValueError(f"config.pack_sequences: the student (model_type {self.student_config.model_type!r}) "
                             "does not take packed sequences; set pack_sequences=False")
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
                              parameterization=parameterization, loss=self.loss, settings=settings,
                              micro_batch_size=config.micro_batch_size),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
            donate_argnums=(0,),
        )
        self._sequence_lengths = jax.jit(batching.sequence_lengths)
        self.packing_record: dict = {}  # the last packing plan's figures (config.pack_sequences)

        # The foresight monitor keeps W_0 = the initial student as the forward sees it (taken
        # before any resume): for adapters on a cast base, the merge of that base, so that
        # W_t - W_0 is exactly the merged update (A·B), not the base's rounding.
        initial_student = parameterization.merge(trainable_params, self.frozen_params)
        self.monitor = setup.make_monitor(config, initial_student, self.student_config)
        del initial_params
        # The exact held-out KL's fixed prefixes, sampled once from the initial student (so a
        # resumed run recomputes the same ones).
        self.kl_prefixes = self._sample_kl_prefixes(initial_student)
        del initial_student
        if config.effopd.enabled:
            self.validation_batch_rows()  # refuses a bad effopd.val_batch_prompts before training
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
        # The exact held-out KL of every evaluation so far (read back on resume), for the warning.
        self.kl_history: list[float] = []
        if resumed and self.is_main and os.path.exists(self.metrics.path):
            self.kl_history = [float(r["eval/exact_reverse_kl"]) for r in metrics_lib.read_metrics(self.metrics.path)
                               if r.get("kind") == "eval" and "eval/exact_reverse_kl" in r]

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
        rollout = self.engines["rollout"].generate(self.rollout_params(), rows.prompt_token_ids,
                                                   jax.random.fold_in(step_key, 0))
        clock.lap("rollout_seconds", rollout)
        plan = self.packing_plan(rollout) if self.config.pack_sequences else None
        batch, teacher_stats = self.score(rollout, rows, plan)
        clock.lap("teacher_seconds", batch)
        with sharding_lib.sharding_context(self.mesh):
            self.state, update_metrics = self.update(self.state, batch, self.frozen_params, plan)
        update_metrics = jax.device_get(clock.lap("update_seconds", update_metrics))
        record = self._step_record(step, learning_rate, rollout, update_metrics, clock)
        record.update(self.teacher.step_metrics(jax.device_get(teacher_stats), update_metrics))
        if plan is not None:
            record.update(self.packing_record)
        if self.config.effopd.enabled and effopd_search_due(self.state.opt_state):
            record.update(self.effopd_search(step_key))
        record["step_seconds"] = clock.since_start()
        return record

    def student_params(self) -> PyTree:
        """The student's model params (trainable merged with frozen)."""
        return self.parameterization.merge(self.state.trainable_params, self.frozen_params)

    def rollout_params(self) -> PyTree:
        """The params the step's rollout samples with: :meth:`student_params`, cast once to
        ``config.rollout.weight_dtype`` when set (``rollout.cast_rollout_params``)."""
        return cast_rollout_params(self.student_params(), self.config.rollout.weight_dtype)

    def next_rows(self) -> data.PromptBatch:
        """This process's rows of the next step: its prompts, each repeated ``samples_per_prompt``
        times (the rows of one prompt are adjacent), with their raw messages, solutions and tags."""
        return next(self.data_iterator).repeat(self.config.rollout.samples_per_prompt)

    def next_prompt_rows(self) -> list[np.ndarray]:
        """The prompt token ids of :meth:`next_rows`."""
        return self.next_rows().prompt_token_ids

    def score(self, rollout: Rollout, rows: data.PromptBatch,
              plan: batching.PackingPlan | None = None) -> tuple[OPDBatch, TeacherStepStats]:
        """The rollout with the teachers' (and G-OPD's pi_B) view of every response token.

        ``rows`` are this process's rows of the step (:meth:`next_rows`): the teachers route them
        and render their own prompts from them. A live-student teacher scores with the params
        that sampled the rollout, the same the update differentiates at (before the update).
        With the step's packing ``plan`` the teachers that score every row on the student's
        prompt ids, and pi_B, run on its packed rows."""
        batch = OPDBatch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                         response_ids=rollout.response_ids, response_mask=rollout.response_mask,
                         behaviour_logprobs=rollout.behaviour_logprobs)
        with sharding_lib.sharding_context(self.mesh):
            live = self.student_params() if self.teacher.has_live_student else None
            batch, stats = self.teacher.score_with_stats(rollout, batch, example_ids=rows.example_ids,
                                                         student_params=live, plan=plan)
            if self.reference is not None:
                batch = self.reference.score_reference(rollout, batch, plan)
        return batch, stats

    def packing_plan(self, rollout: Rollout) -> batching.PackingPlan:
        """The step's packed layout (``config.pack_sequences``): the sequence lengths come to the
        host, are packed first-fit-decreasing per batch shard, and the plan goes back onto the
        mesh's batch shards."""
        prompt_lengths, response_lengths, contiguous = self._sequence_lengths(rollout.prompt_mask,
                                                                              rollout.response_mask)
        if not bool(jax.device_get(contiguous)):
            raise ValueError("config.pack_sequences: the rollout's prompts are not left-padded or its "
                             "responses not right-padded, so its sequences cannot be packed")
        shards = int(np.prod([self.mesh.shape[axis] for axis in sharding_lib.BATCH_AXES]))
        plan = batching.plan_packing(
            to_host(prompt_lengths), to_host(response_lengths), prompt_length=rollout.prompt_ids.shape[1],
            max_new_tokens=rollout.response_ids.shape[1], micro_batch_size=self.config.micro_batch_size,
            shards=shards)
        self.packing_record = {"packed_micro_batches": int(plan.num_micro_batches),
                               "packing_efficiency": batching.packing_efficiency(plan)}
        # Every process computed the same plan; each places the shards its devices hold.
        def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
            return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

        arrays = sharding_lib.batch_sharding(self.mesh, 4)
        return plan._replace(**{name: place(getattr(plan, name), arrays) for name in plan._fields[:5]},
                             num_micro_batches=place(plan.num_micro_batches, NamedSharding(self.mesh, P())))

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
        set; the accepted point replaces the trainable params (and, under the paper's rule, moves
        the anchor).

        The score is an :class:`~effopd_jax.effopd.ItemwiseScore` over the validation prompts
        (:meth:`validation_scorer`): a candidate that can no longer beat the incumbent stops being
        decoded (``effopd.val_early_stop``), with the decisions of decoding every prompt."""
        # Common random numbers: every candidate of one search is scored with the same key, so
        # the comparison between candidates is not drowned by sampling noise.
        val_key = jax.random.fold_in(step_key, 1)
        scorer, counters = self.validation_scorer(val_key)
        start = time.perf_counter()
        # A parameterization may extrapolate differently (LoRA: in the merged space).
        extrapolation = getattr(self.parameterization, "effopd_extrapolation", lambda: None)()
        theta, anchor = self.state.trainable_params, find_effopd_state(self.state.opt_state).anchor
        params, opt_state, report = effopd_host_search(theta, self.state.opt_state, score_fn=scorer,
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
        self.log(format_search(report))
        return {
            "effopd/searched": True,
            "effopd/scores": list(report.scores),
            "effopd/scores_exact": list(report.exact),
            "effopd/multipliers": list(report.multipliers),
            "effopd/accepted_multiplier": report.accepted_multiplier,
            "effopd/num_evals": report.num_evals,
            "effopd/val_prompts_decoded": sum(report.items_scored),
            "effopd/val_prompts_skipped": report.items_skipped,
            "effopd/val_tokens": counters["tokens"],
            "effopd/seconds": time.perf_counter() - start,
            **extra,
        }

    def validation_scorer(self, key: jax.Array) -> tuple[ItemwiseScore, dict]:
        """EffOPD's score as an :class:`~effopd_jax.effopd.ItemwiseScore`: item i is 1 when the
        ``"validation"`` engine's answer to validation prompt i is correct, else 0.

        Batches hold ``effopd.val_batch_prompts`` prompts (0: the step's rows). Greedy scoring
        (``effopd.val_temperature=0``) makes a prompt's result independent of its batch, so a
        candidate's batches are composed from the incumbent's failures first; sampled scoring
        keeps the fixed batches (batch ``[s, s + B)`` sampled with ``fold_in(key, s)``, as
        :meth:`sampled_accuracy` does, so every point of a search sees the same draws) and only
        reorders them. Returns the scorer and a dict whose ``tokens`` counts the response tokens
        it decodes (real prompts, not the batch padding).
        """
        examples = self.prompts.validation
        batch_rows = self.validation_batch_rows()
        counters = {"tokens": 0}

        def score_items(candidate, items: np.ndarray) -> np.ndarray:
            params = self.parameterization.merge(candidate, self.frozen_params)
            correct, lengths = self._grade_batch(
                params, [examples[i] for i in items], jax.random.fold_in(key, int(items[0])),
                engine="validation", batch_rows=batch_rows)
            counters["tokens"] += int(np.sum(lengths))
            return np.asarray(correct, np.float64)

        scorer = ItemwiseScore(score_items, num_items=len(examples), batch_size=batch_rows,
                               independent_items=self.config.effopd.val_temperature == 0,
                               early_stop=self.config.effopd.val_early_stop)
        return scorer, counters

    def validation_batch_rows(self) -> int:
        """Rows per validation decoding call (``effopd.val_batch_prompts``, 0: the step's rows)."""
        rows = self.config.effopd.val_batch_prompts or self.rows_per_step
        multiple = jax.process_count() * batch_shards(self.mesh)
        if rows % multiple:
            raise ValueError(f"config.effopd.val_batch_prompts={rows} must be a multiple of the process count "
                             f"times the mesh's batch shards data*fsdp ({multiple})")
        return rows

    # -- evaluation -------------------------------------------------------------------------

    def _grade_batch(self, params: PyTree, examples, key: jax.Array, *, engine: str,
                     batch_rows: int) -> tuple[list[float], list[int]]:
        """Samples one answer to each of ``examples`` (at most ``batch_rows``; the batch is padded
        to that static shape with copies of the last one) with ``self.engines[engine]`` and grades
        them: ``(correct, response lengths)``. Every process passes its slice of the same rows."""
        padded = list(examples) + [examples[-1]] * (batch_rows - len(examples))
        per_process = batch_rows // jax.process_count()
        mine = padded[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
        out = self.engines[engine].generate(params, [e.prompt_token_ids for e in mine], key)
        tokens, mask = to_host(out.response_ids), to_host(out.response_mask)
        correct, lengths = [], []
        for row, example in enumerate(examples):
            text = self.tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True)
            correct.append(grading.grade(text, example.answer, example.data_source))
            lengths.append(int(mask[row].sum()))
        return correct, lengths

    def sampled_accuracy(self, params: PyTree, examples, key: jax.Array, *, engine: str,
                         samples_per_prompt: int) -> dict:
        """Samples answers for ``examples`` with ``self.engines[engine]`` and grades them:
        mean@n, pass@n, mean response length.

        Every process samples the same rows (the prompt set is small) in fixed-size batches of
        ``rows_per_step`` (batch ``[s, s + rows)`` with ``fold_in(key, s)``) so the engine's
        compiled program is reused.
        """
        rows = [e for e in examples for _ in range(samples_per_prompt)]
        correct, lengths = [], []
        for start in range(0, len(rows), self.rows_per_step):
            chunk_correct, chunk_lengths = self._grade_batch(
                params, rows[start : start + self.rows_per_step], jax.random.fold_in(key, start),
                engine=engine, batch_rows=self.rows_per_step)
            correct += chunk_correct
            lengths += chunk_lengths
        per_prompt = np.asarray(correct, np.float32).reshape(len(examples), samples_per_prompt)
        return {
            "mean_at_n": grading.mean_at_n(per_prompt),
            "pass_at_n": grading.pass_at_n(per_prompt),
            "response_length": float(np.mean(lengths)),
            "n": samples_per_prompt,
        }

    def evaluate(self, step: int) -> dict:
        """mean@n, pass@n and response length on the evaluation set (same samples every time);
        with ``eval.kl_prompts`` also the exact held-out reverse KL (``eval/exact_reverse_kl``),
        warning when it has risen over ``eval.kl_warn_rises`` evaluations in a row or stayed above its
        first value for as many (:func:`~effopd_jax.trainer.heldout.kl_rise_warning`)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), 1_000_003)
        result = self.sampled_accuracy(self.student_params(), self.prompts.eval, key, engine="eval",
                                       samples_per_prompt=self.config.eval.samples_per_prompt)
        record = {f"eval/{k}": v for k, v in result.items()} | {"step": step, "kind": "eval"}
        if self.kl_prefixes is not None:
            kl = self.heldout_kl()
            self.kl_history.append(kl)
            record["eval/exact_reverse_kl"] = kl
            warning = kl_rise_warning(self.kl_history, self.config.eval.kl_warn_rises,
                                      float(self.schedule(max(step - 1, 0))))
            if warning:
                self.log(f"step {step}: {warning}")
                record["eval/kl_rising"] = True
        return record

    def heldout_kl(self) -> float:
        """The exact held-out reverse KL(student || teacher) on the fixed prefixes
        (:mod:`effopd_jax.trainer.heldout`): forward passes of both models, no sampling."""
        with sharding_lib.sharding_context(self.mesh):
            kl = self._heldout_kl(self.student_params(), self.teacher.teachers[0].params, self.kl_prefixes)
        return float(jax.device_get(kl))

    def _sample_kl_prefixes(self, initial_params: PyTree) -> Rollout | None:
        """The initial student's responses to the first ``eval.kl_prompts`` eval prompts (None: off)."""
        cfg = self.config
        if not (cfg.eval.kl_prompts and self.prompts.eval):
            return None
        teacher_config = self.teacher.teachers[0].config  # one teacher (config CROSS_RULES)
        self._heldout_kl = jax.jit(lambda student, teacher, prefixes: heldout_reverse_kl(
            self.student_config, student, teacher_config, teacher, prefixes, chunk_size=cfg.loss.chunk_size))
        key = jax.random.fold_in(jax.random.key(cfg.seed), 2_000_003)
        prompts = [e.prompt_token_ids for e in self.prompts.eval[: cfg.eval.kl_prompts]]
        with sharding_lib.sharding_context(self.mesh):
            return sample_prefixes(self.engines["rollout"], initial_params, prompts, key,
                                   rows_multiple=jax.process_count() * batch_shards(self.mesh),
                                   process_index=jax.process_index(), process_count=jax.process_count())

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
                bar_fields = {"loss": float(record["loss"]), "kl": float(record.get("reverse_kl", float("nan")))}
                if self.kl_history:  # the latest exact held-out KL (eval.kl_prompts)
                    bar_fields["heldout_kl"] = self.kl_history[-1]
                bar.update(step, **bar_fields)
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
        vision tower and MTP head) are copied from it unchanged, and leaves stored in two forms
        (Qwen3.5-MoE's experts, fused or per expert) are written in its form."""
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
