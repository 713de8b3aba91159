"""The demo job: SFT warm-up pieces, the summary arithmetic, and the fast demo end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from effopd_jax import convert, data
from examples.demo import run as demo
from examples.demo import settings as demo_settings
from examples.demo import sft
from examples.demo.tasks import arithmetic


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    arithmetic.make_task_files(str(root), 0, 64, 8, 16, max_digits=2)
    arithmetic.save_tokenizer(str(root / "tokenizer"))
    return str(root), data.load_tokenizer(str(root / "tokenizer"))


def test_encode_sft_rows_scores_exactly_the_response_and_eos(task):
    task_dir, tokenizer = task
    rows = sft.read_rows(os.path.join(task_dir, "train.jsonl"), limit=5)
    ids, attention, loss_mask = sft.encode_sft_rows(tokenizer, rows)
    assert ids.shape == attention.shape == loss_mask.shape and ids.shape[1] % 8 == 0
    for row, tok, att, m in zip(rows, ids, attention, loss_mask):
        scored = tok[1:][m[:-1] > 0]  # the tokens the scored positions predict
        assert tokenizer.decode(scored) == row["response"] + arithmetic.EOS_TOKEN
        prompt_len = int(att.sum()) - len(scored)
        assert tokenizer.decode(tok[:prompt_len]) == (
            f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        )


def test_sft_loss_matches_torch_cross_entropy(task, tmp_path):
    """Our masked loss on random weights == torch's cross-entropy of transformers' Qwen3."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    from effopd_jax.models.qwen import init_params

    task_dir, tokenizer = task
    config = sft.qwen3_for_task(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    params = jax.device_get(init_params(config, jax.random.key(3)))
    convert.save_hf(config, params, str(tmp_path))
    ids, attention, loss_mask = sft.encode_sft_rows(tokenizer, sft.read_rows(os.path.join(task_dir, "train.jsonl"), 4))
    ours = float(sft.sft_loss(params, config, ids, attention, loss_mask))

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(attention, dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1),
        reduction="none",
    ).numpy()
    mask = loss_mask[:, :-1].reshape(-1)
    reference = float((nll * mask).sum() / mask.sum())
    assert ours == pytest.approx(reference, rel=1e-4)
    assert ours == pytest.approx(math.log(len(tokenizer)), rel=0.1)  # random init: about uniform


def test_summarize_against_hand_computation():
    opd = [{"step": 0, "accuracy": 0.2, "seconds": 0.0}, {"step": 5, "accuracy": 0.5, "seconds": 10.0},
           {"step": 10, "accuracy": 0.7, "seconds": 20.0}, {"step": 15, "accuracy": 0.8, "seconds": 30.0}]
    eff = [{"step": 0, "accuracy": 0.2, "seconds": 0.0}, {"step": 5, "accuracy": 0.79, "seconds": 12.0},
           {"step": 10, "accuracy": 0.85, "seconds": 26.0}, {"step": 15, "accuracy": 0.84, "seconds": 40.0}]
    s = demo.summarize(opd, eff, teacher_accuracy=0.95)
    assert s["target"] == pytest.approx(0.2 + 0.95 * 0.6)  # 0.77
    assert s["opd"]["steps_to_target"] == 15 and s["effopd"]["steps_to_target"] == 5
    assert s["speedup_steps"] == pytest.approx(3.0)
    assert s["speedup_wallclock"] == pytest.approx(30.0 / 12.0)
    assert s["opd"]["final_accuracy"] == 0.8 and s["effopd"]["final_accuracy"] == 0.84
    # EffOPD never reaching the target: no speed-up, not a made-up one.
    slow = [dict(p, accuracy=min(p["accuracy"], 0.5)) for p in eff]
    s = demo.summarize(opd, slow, teacher_accuracy=0.95)
    assert s["effopd"]["steps_to_target"] is None and s["speedup_steps"] is None
    # No OPD gain: no target at all.
    flat = [dict(p, accuracy=0.2) for p in opd]
    s = demo.summarize(flat, eff, teacher_accuracy=0.95)
    assert s["target"] is None and s["speedup_steps"] is None and s["speedup_wallclock"] is None
    text = demo.format_table(demo.summarize(opd, eff, teacher_accuracy=0.95))
    assert len(text.splitlines()) == 1 + 4 and "0.790" in text


def test_accuracy_curve_sums_step_seconds_up_to_each_eval():
    records = [
        {"kind": "eval", "step": 0, "eval/mean_at_n": 0.1, "elapsed_seconds": 0.0},
        {"step": 1, "step_seconds": 1.5}, {"step": 2, "step_seconds": 2.0},
        {"kind": "eval", "step": 2, "eval/mean_at_n": 0.4, "elapsed_seconds": 9.0},
        {"step": 3, "step_seconds": 0.5},
        {"kind": "eval", "step": 3, "eval/mean_at_n": 0.6, "elapsed_seconds": 12.0},
    ]
    curve = demo.accuracy_curve(records)
    assert [p["step"] for p in curve] == [0, 2, 3]
    assert [p["seconds"] for p in curve] == pytest.approx([0.0, 3.5, 4.0])
    with pytest.raises(ValueError, match="records"):
        demo.accuracy_curve(records[1:3])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_sft_optimizer_step_sizes_follow_the_schedule(schedule):
    import jax.numpy as jnp

    # With a constant gradient, AdamW (bias-corrected, no weight decay on a zero parameter)
    # moves each coordinate by exactly the step's learning rate: read the schedule off the steps.
    settings = sft.SFTSettings(steps=10, learning_rate=0.1, warmup_steps=2, weight_decay=0.0, grad_clip=1e9,
                               schedule=schedule)
    optimizer = sft.make_sft_optimizer(settings)
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    steps = []
    for _ in range(10):
        updates, state = optimizer.update({"w": jnp.ones(3)}, state, params)
        steps.append(-float(updates["w"][0]))
    warmup = [0.0, 0.05]  # linear from 0 to the peak over warmup_steps
    if schedule == "constant":
        expected = warmup + [0.1] * 8
    else:  # cosine from the peak (step 2) to 10% of it (step 10)
        expected = warmup + [0.01 + 0.09 * 0.5 * (1 + np.cos(np.pi * k / 8)) for k in range(8)]
    np.testing.assert_allclose(steps, expected, rtol=1e-4, atol=1e-7)


def test_sft_settings_refuse_an_unknown_schedule():
    with pytest.raises(ValueError, match="SFTSettings.schedule"):
        sft.SFTSettings(schedule="linear")


def test_sft_is_deterministic_for_a_seed(task, tmp_path):
    task_dir, tokenizer = task
    config = sft.qwen3_for_task(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings = sft.SFTSettings(steps=3, batch_size=8, warmup_steps=1, seed=5, max_test_examples=4)
    tok_dir = os.path.join(task_dir, "tokenizer")
    outs = [sft.run_sft(config, task_dir, tok_dir, str(tmp_path / name), settings, log=lambda *a: None)
            for name in ("a", "b")]
    assert outs[0]["final_loss"] == outs[1]["final_loss"]
    _, pa = convert.load_hf(str(tmp_path / "a"))
    _, pb = convert.load_hf(str(tmp_path / "b"))
    import jax

    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    # A second call with the same settings reuses the directory (marker), without training.
    again = sft.run_sft(config, task_dir, tok_dir, str(tmp_path / "a"), settings, log=lambda *a: None)
    assert again == outs[0]


def test_band_stop_rule_on_made_up_accuracies():
    band = sft.BandStop((0.25, 0.40), every=10)
    assert [band.due(step) for step in (9, 10, 11, 20)] == [False, True, False, True]
    assert band.decide(10, 0.1) == "continue"
    assert band.decide(20, 0.25) == "stop"  # the band's edges are in it
    # Jumping over the band: rewind, then an evaluation after every step.
    band = sft.BandStop((0.25, 0.40), every=10)
    assert band.decide(10, 0.2) == "continue" and band.decide(20, 0.6) == "rewind"
    assert band.due(11) and band.due(12)
    assert band.decide(11, 0.22) == "continue" and band.decide(12, 0.33) == "stop"
    # A second jump (within one step) is an error that names the setting.
    band = sft.BandStop((0.25, 0.26), every=10)
    band.decide(10, 0.1)
    band.decide(20, 0.5)
    with pytest.raises(sft.SFTStopError, match="stop_band"):
        band.decide(11, 0.3)
    with pytest.raises(ValueError, match="stop_band"):
        sft.SFTSettings(stop_band=(0.5, 0.4))


def _scripted_validation(monkeypatch, accuracies: dict[int, float]):
    """Makes ``greedy_accuracy`` on the validation split return ``accuracies[evaluation number]``
    (test-set accuracy stays real); returns the list of evaluation calls."""
    real = sft.greedy_accuracy
    calls = []

    def fake(config, params, tokenizer, rows, **kwargs):
        if len(rows) == 8:  # the validation split of the `task` fixture
            calls.append(1)
            return accuracies.get(len(calls), 0.0)
        return real(config, params, tokenizer, rows, **kwargs)

    monkeypatch.setattr(sft, "greedy_accuracy", fake)
    return calls


def test_band_stopped_sft_rewinds_and_replays_bit_identically(task, tmp_path, monkeypatch):
    """Evaluations every 3 steps: 0 at step 3, above the band at 6 -> replay from step 3 with one
    evaluation per step: 0 at 4, in the band at 5. The saved model must be exactly the one a plain
    5-step run produces (the replay repeats the same data order and arithmetic)."""
    import jax

    task_dir, tokenizer = task
    tok_dir = os.path.join(task_dir, "tokenizer")
    config = sft.qwen3_for_task(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    plain = sft.SFTSettings(steps=5, batch_size=8, warmup_steps=1, seed=3, max_test_examples=4, schedule="constant")
    sft.run_sft(config, task_dir, tok_dir, str(tmp_path / "plain"), plain, log=lambda *a: None)
    calls = _scripted_validation(monkeypatch, {1: 0.0, 2: 0.9, 3: 0.1, 4: 0.3})
    banded = dataclasses.replace(plain, steps=50, stop_band=(0.2, 0.4), stop_eval_every=3)
    result = sft.run_sft(config, task_dir, tok_dir, str(tmp_path / "banded"), banded, log=lambda *a: None)
    assert len(calls) == 4
    assert result["steps_trained"] == 5 and result["validation_accuracy"] == 0.3
    assert result["validation_history"] == [[3, 0.0], [6, 0.9], [4, 0.1], [5, 0.3]]
    _, pa = convert.load_hf(str(tmp_path / "plain"))
    _, pb = convert.load_hf(str(tmp_path / "banded"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    # Never reaching the band is an error naming the setting, not a silently weaker model.
    _scripted_validation(monkeypatch, {})
    with pytest.raises(sft.SFTStopError, match="never reached"):
        sft.run_sft(config, task_dir, tok_dir, str(tmp_path / "never"),
                    dataclasses.replace(banded, steps=6), log=lambda *a: None)


def test_fast_settings_student_stops_in_its_band(tmp_path):
    """The real rule on the fast settings: the student stops at the first evaluation in the band,
    and the marker's accuracy is that of the saved model (recomputed here)."""
    settings = demo_settings.fast_settings(seed=0)
    root = demo_settings.asset_root(settings, str(tmp_path))
    task_dir = os.path.join(root, "task")
    arithmetic.make_task_files(task_dir, settings.seed, settings.n_train, settings.n_val, settings.n_test,
                               max_digits=settings.max_digits)
    arithmetic.save_tokenizer(os.path.join(task_dir, "tokenizer"))
    tokenizer = data.load_tokenizer(os.path.join(task_dir, "tokenizer"))
    from examples.demo.prepare import _model_config

    config = _model_config(settings.student, tokenizer)
    result = sft.run_sft(config, task_dir, os.path.join(task_dir, "tokenizer"), str(tmp_path / "student"),
                         settings.student_sft, log=lambda *a: None)
    low, high = settings.student_sft.stop_band
    history = result["validation_history"]
    assert low <= result["validation_accuracy"] <= high and history[-1][1] == result["validation_accuracy"]
    assert all(acc < low for _, acc in history[:-1])  # no earlier evaluation was in (or above) the band
    assert result["steps_trained"] == history[-1][0] < settings.student_sft.steps
    _, params = convert.load_hf(str(tmp_path / "student"))
    rows = sft.read_rows(os.path.join(task_dir, "validation.jsonl"))
    again = sft.greedy_accuracy(config, params, tokenizer, rows, max_new_tokens=result["max_new_tokens"])
    assert again == result["validation_accuracy"]


def test_a_changed_stopping_rule_is_a_new_cache_key():
    base = demo_settings.DemoSettings()
    other_band = dataclasses.replace(base, student_sft=dataclasses.replace(base.student_sft, stop_band=(0.2, 0.3)))
    other_every = dataclasses.replace(base, student_sft=dataclasses.replace(base.student_sft, stop_eval_every=5))
    keys = {base.cache_key(), other_band.cache_key(), other_every.cache_key()}
    assert len(keys) == 3
    # Run-only settings (the OPD arms) do not touch the assets.
    assert dataclasses.replace(base, effopd_rule="followup", effopd_val_batch_prompts=8).cache_key() == base.cache_key()


def _tree_listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fake_assets(settings, out_dir, *, teacher_tokens: int, student_tokens: int) -> None:
    """The files :func:`load_assets` looks for, with SFT markers, and no models (nothing trains)."""
    root = demo_settings.asset_root(settings, str(out_dir))
    os.makedirs(os.path.join(root, "task", "tokenizer"))
    for split in demo_settings.TASK_SPLITS:
        open(os.path.join(root, "task", f"{split}.jsonl"), "w").close()
    open(os.path.join(root, "task", "tokenizer", "tokenizer.json"), "w").close()
    for role, accuracy, tokens in (("teacher", 0.9, teacher_tokens), ("student", 0.4, student_tokens)):
        os.makedirs(os.path.join(root, role))
        with open(os.path.join(root, role, sft.MARKER_FILE), "w") as f:
            json.dump({"key": {}, "result": {"test_accuracy": accuracy, "max_new_tokens": tokens}}, f)


def test_demo_config_is_pure_and_arms_differ_only_in_effopd(tmp_path):
    from effopd_jax.config import default_config
    from examples.demo.configs import demo_config

    settings = demo_settings.fast_settings(seed=3)
    _fake_assets(settings, tmp_path, teacher_tokens=12, student_tokens=17)
    before = _tree_listing(tmp_path)
    opd = demo_config(effopd=False, settings=settings, out_dir=str(tmp_path)).to_dict()
    eff = demo_config(effopd=True, settings=settings, out_dir=str(tmp_path)).to_dict()
    assert _tree_listing(tmp_path) == before  # reads only
    # Plain OPD sets no EffOPD field besides `enabled` (the schema refuses ignored settings).
    assert opd["effopd"] == dict(default_config().effopd.to_dict(), enabled=False)
    root = demo_settings.asset_root(settings, str(tmp_path))
    assert eff["effopd"]["enabled"] is True
    assert eff["effopd"]["val_files"] == (os.path.join(root, "task", "validation.jsonl"),)
    assert (eff["effopd"]["val_max_prompts"], eff["effopd"]["max_candidates"], eff["effopd"]["val_temperature"]) == (
        settings.effopd_val_prompts, settings.effopd_max_candidates, settings.effopd_val_temperature)
    assert {k: v for k, v in opd.items() if k != "effopd"} == {k: v for k, v in eff.items() if k != "effopd"}
    assert opd["rollout"]["max_new_tokens"] == 17  # the longer of the two models' responses
    assert opd["student"]["path"] == os.path.join(root, "student") and opd["seed"] == 3


def test_demo_config_without_assets_names_the_prepare_command(tmp_path):
    from examples.demo.configs import demo_config

    with pytest.raises(demo_settings.DemoAssetsMissingError,
                       match=re.escape(f"python -m examples.demo.prepare --seed 2 --fast --out {tmp_path}")):
        demo_config(effopd=True, settings=demo_settings.fast_settings(seed=2), out_dir=str(tmp_path))
    assert _tree_listing(tmp_path) == []  # nothing written, nothing trained
    assert demo_settings.prepare_command(demo_settings.DemoSettings()) == "python -m examples.demo.prepare"


@pytest.fixture(scope="module")
def fast_assets(tmp_path_factory):
    """The fast settings' task, teacher and student, prepared once for the tests below."""
    from examples.demo.prepare import prepare_assets

    out = str(tmp_path_factory.mktemp("fast_assets"))
    prepare_assets(demo_settings.fast_settings(seed=0), out, log=lambda *a, **k: None)
    return out


@pytest.mark.slow  # ~35 s of CPU; 80 s warm-cache / ~9 min cold-cache wall under heavy shared load
def test_fast_demo_end_to_end(tmp_path, fast_assets):
    settings = demo_settings.fast_settings(seed=0)
    summary = demo.run_demo(settings, str(tmp_path), foresight=False, assets_dir=fast_assets,
                            log=lambda *a, **k: None)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    for key in ("teacher_accuracy", "student_initial_accuracy", "target", "target_definition",
                "speedup_steps", "speedup_wallclock"):
        assert key in on_disk
    for arm in ("opd", "effopd"):
        for key in ("final_accuracy", "steps_to_target", "seconds_to_target", "curve"):
            assert key in on_disk[arm]
        curve = on_disk[arm]["curve"]
        assert [p["step"] for p in curve] == [0, 2, 4]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in curve)
        assert all(b["seconds"] >= a["seconds"] for a, b in zip(curve, curve[1:]))
        assert on_disk[arm]["final_accuracy"] == curve[-1]["accuracy"]
    for key in ("teacher_accuracy", "student_initial_accuracy"):
        assert 0.0 <= on_disk[key] <= 1.0
    # Both arms start from the same student: identical step-0 evaluations.
    assert on_disk["opd"]["curve"][0]["accuracy"] == on_disk["effopd"]["curve"][0]["accuracy"]
    assert on_disk["student_initial_accuracy"] == on_disk["opd"]["curve"][0]["accuracy"]
    # The summary is a function of the curves: recomputing it gives the same numbers.
    again = demo.summarize(on_disk["opd"]["curve"], on_disk["effopd"]["curve"],
                           teacher_accuracy=on_disk["teacher_accuracy"])
    for key in ("target", "speedup_steps", "speedup_wallclock"):
        assert again[key] == on_disk[key]
    if on_disk["target"] is not None and on_disk["effopd"]["steps_to_target"]:
        assert on_disk["speedup_steps"] == pytest.approx(
            on_disk["opd"]["steps_to_target"] / on_disk["effopd"]["steps_to_target"])
    assert summary["teacher_accuracy"] == on_disk["teacher_accuracy"]
    expected_bar = (on_disk["teacher_accuracy"] >= demo.TEACHER_MIN_ACCURACY
                    and on_disk["teacher_accuracy"] - on_disk["student_sft_accuracy"] >= demo.MIN_ACCURACY_GAP)
    assert on_disk["pair_meets_bar"] is expected_bar


def _own_answers_file(assets, path: str) -> str:
    """The test split with each row's answer replaced by the initial student's own greedy boxed
    answer ("none" when it boxes nothing): a validation set on which the fast demo's tiny student
    scores well above 0 and its candidates differ, so searches accept, reject and stop early."""
    import jax.numpy as jnp

    from effopd_jax import grading, models, sampling

    config, params = models.load_hf(assets.student_dir, param_dtype=jnp.float32, scan_layers=False)
    tokenizer = data.load_tokenizer(assets.tokenizer_dir)
    rows = sft.read_rows(os.path.join(assets.task_dir, "test.jsonl"))
    out = sampling.generate(config, params, [sft.prompt_token_ids(tokenizer, r["prompt"]) for r in rows],
                            max_new_tokens=assets.max_new_tokens, temperature=0.0,
                            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    with open(path, "w") as f:
        for row, tokens, mask in zip(rows, out.tokens, out.mask):
            answer = grading.extract_boxed(tokenizer.decode(tokens[mask], skip_special_tokens=True))
            f.write(json.dumps(dict(row, answer=answer if answer is not None else "none")) + "\n")
    return path


@pytest.mark.slow  # four 4-step EffOPD runs of the fast demo
@pytest.mark.parametrize("rule", ["paper", "followup"])
def test_early_stopped_validation_makes_the_same_decisions_end_to_end(tmp_path, fast_assets, rule):
    """The EffOPD arm of the fast demo with and without early-stopped validation: every search,
    every score that was computed exactly, every loss and evaluation identical, and fewer prompts
    decoded. One prompt per batch and a validation set of the student's own answers (so that
    scores vary), at a learning rate that moves the tiny student."""
    from examples.demo.configs import demo_config

    settings = dataclasses.replace(demo_settings.fast_settings(seed=0), effopd_rule=rule, effopd_val_batch_prompts=1,
                                   effopd_val_prompts=32, learning_rate=1e-3)
    val_file = _own_answers_file(demo_settings.load_assets(settings, fast_assets), str(tmp_path / "own.jsonl"))
    records = {}
    for early in (True, False):
        config = demo_config(effopd=True, settings=dataclasses.replace(settings, effopd_val_early_stop=early),
                             out_dir=fast_assets)
        config.effopd.val_files = (val_file,)
        records[early] = demo._train(config, str(tmp_path / f"early_{early}"), lambda *a, **k: None)
    early, full = records[True], records[False]
    assert len(early) == len(full)
    searches, skipped = 0, 0
    for e, f in zip(early, full):
        assert e["step"] == f["step"] and e.get("kind") == f.get("kind")
        if e.get("kind") == "eval":
            assert e["eval/mean_at_n"] == f["eval/mean_at_n"]
            assert e["eval/exact_reverse_kl"] == f["eval/exact_reverse_kl"]
            continue
        assert e["loss"] == f["loss"]
        if "effopd/searched" not in f:
            continue
        searches += 1
        for key in ("effopd/accepted_multiplier", "effopd/multipliers", "effopd/num_evals"):
            assert e[key] == f[key], key
        assert all(f["effopd/scores_exact"]) and f["effopd/val_prompts_skipped"] == 0
        for es, fs, exact in zip(e["effopd/scores"], f["effopd/scores"], e["effopd/scores_exact"]):
            assert es == fs if exact else es >= fs
        assert e["effopd/val_prompts_decoded"] + e["effopd/val_prompts_skipped"] == f["effopd/val_prompts_decoded"]
        assert e["effopd/val_tokens"] <= f["effopd/val_tokens"]
        skipped += e["effopd/val_prompts_skipped"]
    assert searches == (3 if rule == "paper" else 4)  # updates 1, 2, 4 / every update
    assert skipped > 0  # the comparison is not vacuous: some candidate stopped early


def test_intervention_replaces_the_top_subspace_at_equal_norm():
    """The foresight study's perturbation (examples/demo/foresight.py, finding (d))."""
    from examples.demo.foresight import replace_top_subspace

    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((24, 2)))[0]
    v = np.linalg.qr(rng.standard_normal((16, 2)))[0]
    delta = (u * [5.0, 3.0]) @ v.T + 0.05 * rng.standard_normal((24, 16))
    new = replace_top_subspace(delta, 2, np.random.default_rng(1))
    assert np.linalg.norm(new) == pytest.approx(np.linalg.norm(delta), rel=1e-12)
    top = lambda m: np.linalg.svd(m)[0][:, :2]  # noqa: E731
    overlap = lambda a, b: float(np.sum((a.T @ b) ** 2) / 2)  # noqa: E731
    assert overlap(top(delta), u) > 0.99  # the original's top subspace is the planted one
    assert overlap(top(new), u) < 0.3  # the replacement's is not (random: about 2/24)
    # Its singular values are kept (up to the rescaling by the norm).
    np.testing.assert_allclose(np.linalg.svd(new, compute_uv=False)[:2], [5.0, 3.0], rtol=0.1)
    assert np.array_equal(replace_top_subspace(np.zeros((3, 2)), 1, rng), np.zeros((3, 2)))
