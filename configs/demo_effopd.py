"""The demo's OPD + EffOPD (scored on the validation split) arm: the cached task, teacher and student of ``make demo``.

    python -m effopd_jax.train --config=configs/demo_effopd.py --workdir=runs/demo/effopd

On first use it builds the assets (task files, tokenizer, SFT teacher and student) under
``runs/demo/cache`` exactly as ``python -m effopd_jax.demo`` does, and reuses them afterwards.
The settings live in :class:`effopd_jax.demo.DemoSettings`; both arms differ only in
``effopd.enabled``.
"""

from effopd_jax.demo import demo_config


def get_config():
    return demo_config(effopd=True)
