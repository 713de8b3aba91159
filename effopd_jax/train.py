"""The OPD trainer's command line: rollout -> teacher scoring -> reverse-KL update -> EffOPD.

    python -m effopd_jax.train --config=configs/tiny_cpu.py --workdir=runs/tiny [--config.key=value]

Builds :class:`effopd_jax.trainer.Trainer` from the config file's ``get_config()`` (overrides
from the command line; unknown keys are refused), initialises ``jax.distributed`` when launched
as one of several processes, trains to ``config.total_steps`` (resuming from the workdir's last
checkpoint), and prints the last step's metrics as one JSON line. With ``--config.plan_only=True``
it prints the memory plan of one step on its devices instead (``effopd_jax.plan``; no weights,
prompts or tokenizer read, nothing written) and exits 0 when every program fits, 1 otherwise. What one step does:
effopd_jax/trainer/loop.py (``Trainer.train_one_step``) and docs/architecture.md.

G-OPD note: with ``loss.reward_scale != 1`` the reference model pi_B is the *initial* student
(or ``loss.base_path``) and stays fixed. The authors' code shares one buffer between pi_B and
EffOPD's anchor, so their pi_B drifts to the last accepted extrapolation
(docs/effopd_rule.md#interaction-with-g-opd); here the two are separate on purpose.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from effopd_jax import config as config_lib
from effopd_jax import metrics as metrics_lib
from effopd_jax.trainer import NonFiniteUpdatesError, Trainer, TrainState  # noqa: F401  (public names)


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


# Exit codes of ``python -m effopd_jax.train`` besides 0 (finished, or stopped by a signal with
# a checkpoint written) and 1 (an error; see the message).
EXIT_BAD_CONFIG = 2  # the config failed validation (the message names the setting)
EXIT_NONFINITE = 3  # NonFiniteUpdatesError: max_consecutive_skips reached


def main(argv) -> None:
    del argv
    from absl import flags  # noqa: PLC0415

    config = flags.FLAGS.config
    maybe_initialize_distributed()
    if config.get("plan_only", False):
        # The memory plan of one step on these devices (nothing loaded, nothing written), then exit.
        from effopd_jax import plan  # noqa: PLC0415

        raise SystemExit(plan.plan_only(config))
    try:
        # Checked here as well as by the Trainer so that a bad setting is one line, not a traceback.
        config_lib.validate_config(config)
    except ValueError as e:
        print(f"effopd_jax.train: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_CONFIG) from None
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
    if any(arg in ("-h", "--help", "--helpshort") for arg in sys.argv[1:]):
        # absl's own --help exits with status 1; asking for help is not an error.
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main)
