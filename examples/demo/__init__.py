"""The embedded demo of ``make demo``: OPD vs OPD + EffOPD on column addition, CPU only.

Run from the repository root::

    python -m examples.demo.prepare [--seed 0] [--fast]   # task files, tokenizer, SFT teacher/student
    python -m examples.demo.run [--seed 0] [--fast]       # warm-up, both OPD runs, summary, plots

Modules: :mod:`~examples.demo.settings` (every knob, the asset paths),
:mod:`~examples.demo.tasks` (the task), :mod:`~examples.demo.sft` (the supervised warm-up),
:mod:`~examples.demo.prepare` (builds the assets), :mod:`~examples.demo.configs` (the two
arms' trainer configs) and :mod:`~examples.demo.run` (the comparison).
"""
