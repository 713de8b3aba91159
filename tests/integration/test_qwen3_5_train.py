"""A Qwen3.5 student distilled from a Qwen3.5 teacher by the Trainer, end to end (CPU).

The student is a tiny *published-layout* checkpoint (`Qwen3_5ForConditionalGeneration`: the
language model under `model.language_model.`, a vision tower, `mtp.*` tensors) written by
`transformers`; the teacher is a random-init text-only Qwen3.5 (`qwen3_5_text`). Both use the
Qwen3 tokenizer's vocabulary size (the repository's chat template and GSM8K prompts), a
non-default `layer_types` and two layers, so rollouts (prefill + decode through the conv and
recurrent state), teacher scoring, the loss and the update all go through both layer kinds.

Checked against independent references: the metrics are finite and the linear layers moved;
the HF export is loaded by `transformers` as the class it came from, its logits equal ours on
the trained weights, and the vision tower and MTP tensors are the source's, byte for byte.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from effopd_jax import models
from effopd_jax.models.hf import SAFE_WEIGHTS_NAME
from tests.integration.test_train import run, small_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForConditionalGeneration"):
    pytest.skip("transformers has no Qwen3.5 (needs >= 5.2)", allow_module_level=True)

from tests.unit.test_qwen3_5 import MTP_TENSORS, VISION, _add_tensors, _randomize_  # noqa: E402

VOCAB = 151936  # the Qwen3 tokenizer's model vocabulary (configs/tiny)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"],
            bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def _safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path / SAFE_WEIGHTS_NAME)


@pytest.mark.slow  # two compiled models through rollout, scoring and update: ~2.5 min wall under shared load
def test_trainer_distils_a_qwen3_5_student_from_a_qwen3_5_teacher_and_exports_it(tmp_path):
    student_dir = tmp_path / "student"
    torch.manual_seed(0)
    hf_config = transformers.Qwen3_5Config(text_config=TEXT, vision_config=VISION, tie_word_embeddings=True)
    source_model = transformers.Qwen3_5ForConditionalGeneration(hf_config).float()
    _randomize_(source_model, 0)
    source_model.save_pretrained(student_dir)
    _add_tensors(student_dir, MTP_TENSORS)
    teacher_json = tmp_path / "teacher.json"
    teacher_json.write_text(json.dumps({**TEXT, "model_type": "qwen3_5_text", "hidden_size": 48,
                                        "architectures": ["Qwen3_5ForCausalLM"]}))

    config = small_config(**{
        "total_steps": 2, "checkpoint_every": 2, "export_hf": True,
        "student.path": str(student_dir), "student.init": "checkpoint", "student.init_seed": 0,
        "teachers[0].path": str(teacher_json), "rollout.max_new_tokens": 8, "data.prompts_per_step": 4,
        "optimizer.learning_rate": 1e-2,
    })
    records = run(config, tmp_path / "run", devices=jax.devices()[:1])
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["loss"]) and np.isfinite(r["reverse_kl"]) and r["grad_norm"] > 0

    export = tmp_path / "run" / "hf"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    source, exported = _safetensors(student_dir), _safetensors(export)
    assert set(exported) == set(source)
    carried = [n for n in source if n.startswith(("model.visual.", "mtp."))]
    assert len(carried) > len(MTP_TENSORS)
    for name in carried:  # untouched: same dtype, shape and bytes
        assert exported[name].dtype == source[name].dtype
        np.testing.assert_array_equal(exported[name], source[name])
    for name in ("model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                 "model.language_model.layers.0.linear_attn.conv1d.weight",
                 "model.language_model.layers.1.self_attn.q_proj.weight"):
        assert not np.array_equal(exported[name], source[name]), name  # trained

    loaded = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        export, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.RandomState(0).randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        theirs = loaded(input_ids=torch.as_tensor(ids)).logits.numpy()
    model_config, params = models.load_hf(export, param_dtype="float32", compute_dtype="float32")
    ours = np.asarray(models.forward(model_config, params, ids))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
