"""The demo's OPD + EffOPD (scored on the validation split) arm: the prepared task, teacher and student of ``make demo``.

    python -m examples.demo.prepare   # once: task files, tokenizer, SFT teacher and student
    python -m effopd_jax.train --config=examples/demo/configs/effopd.py --workdir=runs/demo/effopd

``get_config()`` only reads the assets under ``runs/demo/cache`` (the default settings of
:class:`examples.demo.settings.DemoSettings`); it raises, naming the prepare command, when
they are missing. Both arms differ only in EffOPD (``effopd.*`` set here, off in ``opd.py``).
"""

import os
import sys

# Loaded by file path (--config=...): make the repository's `examples` package importable
# whatever the working directory.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from examples.demo.configs import demo_config  # noqa: E402


def get_config():
    return demo_config(effopd=True)
