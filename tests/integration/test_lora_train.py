"""A LoRA student trained end to end by the Trainer (configs/tiny_cpu.py's models, CPU).

One uninterrupted 4-step run (adapters of rank 4 on q, v and down projections over a bfloat16
frozen base; EffOPD in the merged space, searching at 1, 2, 4; the foresight monitor; the HF
and PEFT exports) is checked against independent references: the base's own weights, numpy
SVDs, PEFT's ``PeftModel`` on the ``transformers`` base and the offline analysis. A second run,
stopped after 2 steps and resumed to 4, must reproduce it exactly.

The models are random, so validation accuracy is 0 for every candidate and EffOPD would never
accept one; the runs here score candidates by the size of their merged update instead
(:class:`UpdateRewardingTrainer`), so that accepted extrapolations go through the trainer.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effopd_jax import analyze, checkpoint, models, train
from effopd_jax.metrics import read_metrics
from effopd_jax.trainer import FullFineTuning
from tests.helpers_tiny import GSM8K_FILE
from tests.integration.test_train import small_config

RANK, ALPHA = 4, 8.0
TARGETS = ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")
TIMING_SUFFIXES = ("seconds", "per_second")


class UpdateRewardingTrainer(train.Trainer):
    """The Trainer with EffOPD's validation score replaced by ‖W − W_base‖² over the adapted
    kernels (so a larger extrapolation always scores higher and is accepted)."""

    def sampled_accuracy(self, params, examples, key, *, engine, samples_per_prompt):
        if engine != "validation":
            return super().sampled_accuracy(params, examples, key, engine=engine, samples_per_prompt=samples_per_prompt)
        merged, base = _flat(params), _flat(self.frozen_params)
        paths = ["/".join(path) for path in self.parameterization.kernel_paths]
        size = sum(jnp.sum(jnp.square(merged[p] - base[p].astype(merged[p].dtype))) for p in paths)
        return {"mean_at_n": float(size)}


def run(config, workdir) -> None:
    trainer = UpdateRewardingTrainer(config, str(workdir), devices=jax.devices()[:1], log=lambda *a, **k: None)
    try:
        trainer.run()
    finally:
        trainer.close()


def lora_config(**overrides):
    settings = {
        "total_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 4, "export_hf": True, "monitor.every": 2,
        "lora.enabled": True, "lora.rank": RANK, "lora.alpha": ALPHA, "lora.target": ("q_proj", "v_proj", "down_proj"),
        "lora.base_dtype": "bfloat16", "lora.effopd_space": "merged",
        "effopd.enabled": True, "effopd.val_files": (GSM8K_FILE,), "effopd.val_max_prompts": 8,
        "effopd.max_candidates": 1,
        # A larger step than tiny_cpu's, so that 4 updates of the adapters are clearly visible.
        "optimizer.learning_rate": 1e-2,
    }
    settings.update(overrides)
    return small_config(**settings)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "run"
    config = lora_config()
    run(config, workdir)
    student_config = models.config_from_hf(config.student.path, param_dtype="float32", dtype="float32")
    base = models.init_params(student_config, jax.random.key(config.student.init_seed))  # what the trainer drew
    return dict(workdir=workdir, records=read_metrics(str(workdir)), config=student_config, base=base)


def _state_tree(step_dir):
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.path.join(step_dir, "state"))
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_searches_monitor_and_checkpoints_hold_only_adapters(uninterrupted):
    records = [r for r in uninterrupted["records"] if r.get("kind") != "eval"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [bool(r.get("effopd/searched")) for r in records] == [True, True, False, True]
    searches = [r for r in records if r.get("effopd/searched")]
    assert [r["effopd/accepted_multiplier"] for r in searches] == [3.0, 3.0, 3.0]
    # The first search extrapolates the merged update exactly (the anchor's B is zero); later
    # ones re-factor a product of rank up to 2r to rank r, with the error they report.
    assert searches[0]["effopd/lora_refactor_error"] < 1e-5
    assert all(0 <= r["effopd/lora_refactor_error"] < 1 for r in searches)
    for r in records:
        assert ("monitor/total/rel_update" in r) == (r["step"] % 2 == 0)
    # Only the three adapted modules received an update: the others' share of it is 0.
    shares = {k.removeprefix("monitor/alloc/"): v for k, v in records[3].items() if k.startswith("monitor/alloc/")}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert {k for k, v in shares.items() if v > 0} == set(TARGETS)

    step_dir = os.path.join(uninterrupted["workdir"], "checkpoints", "4")
    state = _flat(_state_tree(step_dir))
    trainable = {k.removeprefix("trainable_params/"): v for k, v in state.items() if k.startswith("trainable_params/")}
    expected = {f"layers_{i}/{m}/{f}" for i in range(2) for m in TARGETS for f in ("lora_a", "lora_b")}
    assert set(trainable) == expected
    adapter_shapes = {tuple(v.shape) for v in trainable.values()}
    moments = [v for k, v in state.items() if k.startswith("opt_state/") and len(v.shape) >= 2]
    assert moments and all(tuple(v.shape) in adapter_shapes for v in moments)
    # Adam's mu and nu and EffOPD's anchor: three copies of the adapters, nothing of the base.
    assert len(moments) == 3 * len(trainable)
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)[checkpoint.META_PARAMETERIZATION]
    assert (meta["name"], meta["rank"], meta["alpha"], meta["modules"]) == ("lora", RANK, ALPHA, list(TARGETS))


def test_exported_merged_student_differs_from_the_base_by_rank_r_on_the_targets_only(uninterrupted):
    config, exported = models.load_hf(os.path.join(uninterrupted["workdir"], "hf"), param_dtype=jnp.float32,
                                      scan_layers=False)
    # The frozen base was held in bfloat16: that (exactly representable in float32) is W_0 here.
    base = _flat(jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)),
                              uninterrupted["base"]))
    adapted = {f"layers_{i}/{m}/kernel" for i in range(2) for m in TARGETS}
    for name, value in _flat(exported).items():
        difference = np.asarray(value, np.float64) - base[name]
        if name in adapted:
            singular = np.linalg.svd(difference, compute_uv=False)
            assert singular[0] > 1e-4, name
            assert singular[RANK] <= 1e-5 * singular[0], (name, singular)
        else:
            assert not np.any(difference), name


def test_peft_export_on_the_transformers_base_gives_the_merged_students_logits(uninterrupted, tmp_path):
    import peft
    import torch
    from helpers_hf import load_torch_model

    workdir = uninterrupted["workdir"]
    adapter_config = json.loads(open(os.path.join(workdir, "peft", "adapter_config.json")).read())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (RANK, ALPHA)
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # The base the adapters belong to: the run's frozen (bfloat16) base.
    base_dir = str(tmp_path / "base")
    models.save_hf(uninterrupted["config"], jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                                                         uninterrupted["base"]), base_dir)
    with_adapters = peft.PeftModel.from_pretrained(load_torch_model(base_dir), os.path.join(workdir, "peft")).eval()
    merged = load_torch_model(os.path.join(workdir, "hf"))
    ids = torch.as_tensor(np.random.RandomState(0).randint(0, 1000, (2, 8)))
    with torch.no_grad():
        theirs, ours = with_adapters(input_ids=ids).logits.numpy(), merged(input_ids=ids).logits.numpy()
        plain = load_torch_model(base_dir)(input_ids=ids).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-4  # the adapters changed the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_analyze_merges_lora_checkpoints_into_the_base_given_first(uninterrupted, tmp_path):
    base_dir = str(tmp_path / "base")
    models.save_hf(uninterrupted["config"], uninterrupted["base"], base_dir)
    steps = [os.path.join(uninterrupted["workdir"], "checkpoints", s) for s in ("2", "4")]
    result = analyze.analyze([base_dir, *steps], str(tmp_path / "out"), k=RANK, plots=False)
    rows = [r for r in result.rows if r["step"] == 4]
    for row in rows:
        if row["module"] in TARGETS:
            # ΔW = (alpha / r)·A·B has rank <= r: its top-r directions hold all of its energy.
            assert row["update_norm"] > 0 and row["energy"] == pytest.approx(1.0, abs=1e-5), row
        else:
            assert row["update_norm"] == 0.0, row
    with pytest.raises(ValueError, match="holds LoRA adapters only .* put the base model"):
        analyze.analyze([steps[0], steps[1]], str(tmp_path / "bad"), k=RANK, plots=False)


@pytest.mark.slow
def test_resume_after_an_interruption_is_exact(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    run(lora_config(total_steps=2), workdir)
    run(lora_config(), workdir)

    def comparable(records):
        return [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIXES)} for r in records]

    assert comparable(read_metrics(str(workdir))) == comparable(uninterrupted["records"])
    restored = [analyze._restore_run_checkpoint(os.path.join(w, "checkpoints", "4"))[1]
                for w in (str(workdir), str(uninterrupted["workdir"]))]
    for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_parameterization_and_lora_enabled_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config\.lora\.enabled: Trainer\(parameterization=\.\.\.\) was given too"):
        train.Trainer(lora_config(), str(tmp_path), devices=jax.devices()[:1], log=lambda *a, **k: None,
                      parameterization=FullFineTuning())
