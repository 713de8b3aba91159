"""The ahead-of-time memory plan (effopd_jax.plan) against sizes counted by hand.

The programs are compiled for a small TPU topology (v5e:2x2, through libtpu: no TPU needed) and
for a GPU node estimated on virtual CPU devices. The expected figures are counted here from the
models' config.json (parameters, KV cache, prompts), independently of the library: XLA:CPU lays
arrays out without padding, so its argument sizes must match the count exactly; XLA:TPU pads
small minor dimensions to its tiles, so there the count is a lower bound.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import config as config_lib
from effopd_jax import models, plan, published_configs
from effopd_jax import sharding as sharding_lib
from effopd_jax.effopd import effopd, find_effopd_state
from effopd_jax.trainer import setup
from effopd_jax.trainer.state import init_optimizer_state
from helpers_tiny import REPO_ROOT

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU,
    reason=f"libtpu is not installed, so nothing can be compiled for a TPU topology here: pip install "
           f"'jax[tpu]=={jax.__version__}' (the test extra installs it on Linux x86_64 only)")

TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_cpu.py")
PAPER_CONFIGS = [os.path.join(REPO_ROOT, "configs", name)
                 for name in ("qwen3_1p7b_opd_effopd.py", "qwen3_1p7b_exopd_effopd.py")]


def load_config(path: str):
    return config_lib.load_config_file(path)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- counted by hand from a Qwen3 config.json ------------------------------------------------


def qwen3_param_counts(hf: dict) -> tuple[int, int]:
    """(entries of the matrices and embedding, which an fsdp mesh splits; entries of the norm
    scales, which stay whole): the Qwen3 architecture with tied embeddings."""
    hidden, heads, kv_heads, head_dim = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    matrices = (hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
                + 3 * hidden * hf["intermediate_size"])
    assert hf["tie_word_embeddings"]
    split = hf["vocab_size"] * hidden + hf["num_hidden_layers"] * matrices
    whole = hf["num_hidden_layers"] * (2 * head_dim + 2 * hidden) + hidden
    return split, whole


def effopd_anchor_entries(hf: dict) -> int:
    """EffOPD's anchor holds the attention and MLP matrices (the authors' filter), nothing else."""
    hidden, heads, kv_heads, head_dim = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    return hf["num_hidden_layers"] * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                                      + 3 * hidden * hf["intermediate_size"])


# -- cheap: no compilation ------------------------------------------------------------------


def test_bundled_configs_are_the_third_party_table():
    bundled = read_json(published_configs.TABLE_FILE)
    tables = os.path.join(REPO_ROOT, "third_party", "qwen_configs")
    qwen3_5 = {k: v for k, v in read_json(os.path.join(tables, "qwen3_5_configs.json")).items() if not k.startswith("_")}
    assert bundled == {**read_json(os.path.join(tables, "qwen_configs.json")),
                       **read_json(os.path.join(tables, "qwen_moe_configs.json")), **qwen3_5}
    assert published_configs.names() == tuple(sorted(bundled))
    assert published_configs.hf_config("Qwen/Qwen3-4B")["hidden_size"] == 2560
    with pytest.raises(ValueError, match="no bundled config for 'Qwen/Qwen9'.*Qwen/Qwen3-1.7B"):
        published_configs.hf_config("Qwen/Qwen9")


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_paper_configs_plan_as_they_are(path):
    config = load_config(path)
    with pytest.raises(ValueError, match=r"config\.student\.path: is required"):
        config_lib.validate_config(config)  # training needs the user's checkpoints and data
    config_lib.validate_config(config, for_plan=True)  # the plan needs neither
    student = plan.model_config(config.student, "student", remat=config.student.remat)
    teacher = plan.model_config(config.teachers[0], "teachers[0]")
    for model, name in ((student, "Qwen/Qwen3-1.7B"), (teacher, "Qwen/Qwen3-4B")):
        hf = published_configs.hf_config(name)
        assert (model.hidden_size, model.num_hidden_layers, model.vocab_size) == (
            hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"])
    assert student.param_dtype == jnp.float32 and teacher.param_dtype == jnp.bfloat16


def test_qwen3_5_config_plans_as_it_is():
    """The hybrid config's models come from their bundled configs (no checkpoint), as the plan reads them."""
    config = load_config(os.path.join(REPO_ROOT, "configs", "qwen3p5_0p8b_from_9b_opd_effopd.py"))
    config_lib.validate_config(config, for_plan=True)
    student = plan.model_config(config.student, "student", remat=config.student.remat)
    teacher = plan.model_config(config.teachers[0], "teachers[0]")
    for model, name in ((student, "Qwen/Qwen3.5-0.8B"), (teacher, "Qwen/Qwen3.5-9B")):
        hf = published_configs.hf_config(name)
        text = hf.get("text_config", hf)
        assert model.model_type == "qwen3_5" and model.scan_layers
        assert (model.hidden_size, model.num_hidden_layers, model.vocab_size) == (
            text["hidden_size"], text["num_hidden_layers"], text["vocab_size"])
    assert student.layer_types.count("full_attention") == 6 and teacher.num_hidden_layers == 32


def test_plan_checks_name_the_field():
    config = load_config(PAPER_CONFIGS[0])
    config.teachers[0].hf_name = ""
    with pytest.raises(ValueError, match=r"config\.teachers\[0\]\.path is empty and config\.teachers\[0\]\.hf_name"):
        plan.model_config(config.teachers[0], "teachers[0]")
    config.student.hf_name = "Qwen/Qwen3-1.7B-typo"
    with pytest.raises(ValueError, match=r"config\.student\.hf_name: must be one of"):
        config_lib.validate_config(config, for_plan=True)
    config = load_config(PAPER_CONFIGS[0])
    config.rollout.temperature = -1.0  # values are still checked, only files are not read
    with pytest.raises(ValueError, match=r"config\.rollout\.temperature"):
        config_lib.validate_config(config, for_plan=True)
    config = load_config(PAPER_CONFIGS[0])
    config.plan_only = True
    with pytest.raises(ValueError, match=r"config\.plan_only: a Trainer trains"):
        from effopd_jax.trainer import Trainer  # noqa: PLC0415
        tiny = load_config(TINY_CONFIG)
        tiny.plan_only = True
        Trainer(tiny, "/nonexistent/never-created")


def test_targets():
    v5e = plan.parse_target("v5e:2x2")
    assert (v5e.platform, v5e.num_devices, v5e.device_memory_bytes, v5e.usable_bytes) == ("tpu", 4, 16 * 2**30, 16 * 2**30)
    v5p = plan.parse_target("v5p:4x4x4")
    assert (v5p.num_devices, v5p.device_memory_bytes) == (64, 95 * 2**30)
    h100 = plan.parse_target("8xH100-80GB")
    assert (h100.platform, h100.num_devices, h100.device_memory_bytes) == ("gpu", 8, 81559 * 2**20)
    assert h100.usable_bytes == int(81559 * 2**20 * 0.75) and h100.estimate  # JAX's default preallocation
    assert plan.parse_target("4xH200", memory_fraction=0.9).usable_bytes == int(143771 * 2**20 * 0.9)
    for bad, message in (("v9:2x2", "unknown TPU chip 'v9'"), ("8xT4", "expected a TPU topology"),
                         ("v5e", "expected a TPU topology")):
        with pytest.raises(ValueError, match=message):
            plan.parse_target(bad)
    with pytest.raises(ValueError, match="memory_fraction"):
        plan.parse_target("v5e:2x2", memory_fraction=1.5)


def test_largest_hlo_buffer_skips_fusion_bodies_and_follows_loops():
    hlo = "\n".join([
        "%fused_computation (p: f32[4096,4096]) -> f32[] {",
        "  %big = f32[4096,4096]{1,0} multiply(%p, %p)",  # inside a fusion: never materialised
        "  ROOT %r = f32[] reduce(%big, %c), to_apply=%add",
        "}",
        "%body (carry: (s32[], bf16[8,1024,64])) -> (s32[], bf16[8,1024,64]) {",
        "  %carry = (s32[], bf16[8,1024,64]) parameter(0)",
        '  %scores = f32[8,1024,1024]{2,1,0} dot(%q, %k), metadata={op_name="jit(f)/while/body/attention"}',
        "  ROOT %t = (s32[], bf16[8,1024,64]) tuple(%i, %x)",
        "}",
        "ENTRY %main (a: f32[16384,1024]) -> f32[] {",
        "  %a = f32[16384,1024]{1,0} parameter(0)",  # an argument, not a new buffer
        "  %w = (s32[], bf16[8,1024,64]) while(%init), condition=%cond, body=%body",
        "  %f = f32[] fusion(%a), kind=kLoop, calls=%fused_computation",
        "  ROOT %o = f32[2,1024]{1,0} add(%x, %y)",
        "}",
    ])
    size, what = plan.largest_hlo_buffer(hlo)
    assert size == 8 * 1024 * 1024 * 4
    assert what == "f32[8,1024,1024] from 'jit(f)/while/body/attention'"


def test_optimizer_state_is_laid_out_like_the_params():
    """The plan found it: left to XLA, jax.jit(optimizer.init) replicates AdamW's moments on every
    device. init_optimizer_state lays them (and EffOPD's anchor) out like the parameters."""
    config = models.config_from_hf(os.path.join(REPO_ROOT, "configs", "tiny", "qwen3_h32.json"),
                                   param_dtype="float32", dtype="float32", scan_layers=True)
    mesh = sharding_lib.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    params = models.init_params(config, jax.random.key(0), sharding_lib.param_shardings(config, mesh))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3),
                            effopd(search="host", param_filter=models.layout(config).effopd_filter()))
    with sharding_lib.sharding_context(mesh):
        state = init_optimizer_state(optimizer, params, mesh)
        default = jax.jit(optimizer.init)(params)
    adam = state[1][0]
    param_specs = [p.sharding.spec for p in jax.tree.leaves(params)]
    assert [m.sharding.spec for m in jax.tree.leaves(adam.mu)] == param_specs
    assert [m.sharding.spec for m in jax.tree.leaves(adam.nu)] == param_specs
    assert any(spec != P() for spec in param_specs)
    assert all(m.sharding.spec == P() for m in jax.tree.leaves(default[1][0].mu))  # what XLA chose alone
    anchor = find_effopd_state(state).anchor
    by_path = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(anchor)[0]:
        assert leaf.sharding == by_path[path].sharding
    assert find_effopd_state(state).multipliers.sharding == NamedSharding(mesh, P())
    np.testing.assert_array_equal(np.asarray(adam.mu["embed_tokens"]["embedding"]), 0.0)


# -- compiled: a TPU topology, a GPU estimate, the trainer's plan_only -----------------------


@needs_libtpu
def test_tiny_config_fits_a_v5e_2x2_slice():
    config = load_config(TINY_CONFIG)
    config.mesh.update(data=1, fsdp=-1)  # parameters, moments and anchor split 4 ways
    target = plan.parse_target("v5e:2x2")
    # The trainer's matmul precision (the suite's "highest" would compile different, slower programs).
    with jax.default_matmul_precision(None):
        result = plan.make_plan(config, target, log=lambda line: None)

    assert result.fits and result.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    assert list(result.programs) == ["optimizer_init", "rollout", "teacher_scoring", "update", "effopd_candidate",
                                     "effopd_validation_rollout", "eval_rollout"]
    summary = plan.plan_json(result)
    assert summary["fits"] is True and summary["devices"] == 4 and summary["topology"] == "v5e:2x2"
    assert summary["device_memory_bytes"] == 16 * 2**30 and summary["estimate"] is False
    assert summary["largest"] == max(summary["programs"], key=lambda n: summary["programs"][n]["peak_bytes"])
    for name, p in result.programs.items():
        assert p.exact, name
        assert p.peak_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes + p.resident_bytes
        assert 0 < p.peak_bytes < target.usable_bytes

    # Lower bounds counted by hand (XLA:TPU pads to its tiles; nothing may be missing).
    student, teacher = (read_json(os.path.join(REPO_ROOT, "configs", "tiny", f)) for f in ("qwen3_h32.json", "qwen3_h64.json"))
    split, whole = qwen3_param_counts(student)
    student_bytes = (split // 4 + whole) * 4  # float32, embed dimension over 4 devices
    rows, prompt, response = 8 // 4, 256, 24
    cache_bytes = 2 * student["num_hidden_layers"] * rows * (prompt + response) * student["num_key_value_heads"] \
        * student["head_dim"] * 4
    rollout = result.programs["rollout"]
    assert rollout.argument_bytes >= student_bytes + cache_bytes + rows * prompt * 5
    assert rollout.alias_bytes >= cache_bytes  # the donated cache comes back in place
    state_bytes = 3 * student_bytes + effopd_anchor_entries(student) // 4 * 4  # params, Adam mu and nu, anchor
    assert result.programs["update"].alias_bytes >= state_bytes  # the donated state comes back in place
    assert result.programs["update"].alias_bytes < 1.5 * state_bytes  # ... split 4 ways, not replicated
    teacher_split, teacher_whole = qwen3_param_counts(teacher)
    assert result.programs["teacher_scoring"].argument_bytes >= (teacher_split // 4 + teacher_whole) * 4


@needs_libtpu
def test_continuous_rollout_is_planned_with_a_page_pool_that_follows_slots_not_rows():
    devices = plan.target_devices(plan.parse_target("v5e:2x2"))
    cache = plan.CompileCache()

    def rollout_step(prompts_per_step: int) -> plan.ProgramMemory:
        config = load_config(TINY_CONFIG)  # mesh data=-1: 4 batch shards
        config.rollout.update(engine="continuous", slots=4, page_size=16)
        config.data.prompts_per_step = prompts_per_step
        config_lib.validate_config(config, for_plan=True)
        mesh = setup.make_mesh(config, devices)
        step = plan.abstract_step(config, mesh)
        programs = plan.rollout_programs(step, "rollout", step.student_params(), {})
        assert list(programs) == ["rollout_step", "rollout_finish"]
        return plan.measure(programs["rollout_step"], mesh, compile_fn=cache)

    small, large = rollout_step(8), rollout_step(16)
    assert small.exact and large.exact
    student = read_json(os.path.join(REPO_ROOT, "configs", "tiny", "qwen3_h32.json"))
    per_position = 2 * student["num_hidden_layers"] * student["num_key_value_heads"] * student["head_dim"] * 4
    # Per device: one slot, the pages of one longest row (256 + 24 - 1 positions) + the null page.
    pool_bytes = (math.ceil((256 + 24 - 1) / 16) + 1) * 16 * per_position
    assert small.alias_bytes >= pool_bytes  # the donated pool comes back in place
    # Twice the rows: the pool and the temporaries stay; only the rows' own arrays grow (the
    # static engine's dense cache would grow by 2 * (256 + 24) * per_position per device).
    assert large.temp_bytes <= small.temp_bytes
    assert large.alias_bytes - small.alias_bytes < pool_bytes / 8


def test_partial_plan_compiles_the_packed_micro_batched_programs():
    """``--programs=scoring,update`` with ``pack_sequences``: the teacher scores and the update
    differentiates packed micro-batches, whose plan arrays are arguments of both programs."""
    config = load_config(TINY_CONFIG)
    config.update(micro_batch_size=4, pack_sequences=True)
    with jax.default_matmul_precision(None):
        result = plan.make_plan(config, plan.parse_target("v5e:2x2"), log=lambda line: None,
                                groups=("scoring", "update"))
    assert list(result.programs) == ["teacher_scoring", "update"] and result.fits
    summary = plan.plan_json(result)
    assert summary["skipped_groups"] == ["optimizer_init", "rollout", "effopd", "eval"]
    assert "packed rows of 280 tokens, 4 per micro-batch" in result.docs["teacher_scoring"]
    assert "packed micro-batches of 4 rows" in result.docs["update"]
    assert "PARTIAL PLAN" in plan.format_report(result)
    # Per device (data=4), counted by hand: the token ids packed scoring reads (2 rows of int32
    # prompt and response ids; unused arguments are pruned) and the plan's five int32
    # [shards 4, micro-batches 8/4, 4/4, 256 + 24] arrays split over the 4 devices, plus its count.
    rows, length = 8 // 4, 256 + 24
    plan_bytes = 5 * 2 * 1 * length * 4 + 4
    rollout_bytes = rows * (256 + 24) * 4
    assert result.programs["teacher_scoring"].argument_bytes >= rollout_bytes + plan_bytes
    with pytest.raises(ValueError, match="unknown program groups"):
        plan.make_plan(config, plan.parse_target("v5e:2x2"), log=lambda line: None, groups=("updates",))


@needs_libtpu
def test_a_program_xla_refuses_for_memory_is_reported_as_not_fitting():
    devices = plan.target_devices(plan.parse_target("v5e:2x2"))
    mesh = sharding_lib.make_mesh(data=-1, devices=devices)
    x = jax.ShapeDtypeStruct((64, 16384, 128), jnp.float32, sharding=sharding_lib.batch_sharding(mesh, 3))
    scores = jax.jit(lambda x: jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", x, x), axis=-1).sum(axis=(1, 2)))
    memory = plan.measure(plan.Program(scores, (x,)), mesh, compile_fn=plan.CompileCache())
    # 16 rows per device of [16384, 16384] float32 scores: 16 GiB, more than a v5e chip holds.
    assert not memory.exact
    assert memory.temp_bytes >= 16 * 16384 * 16384 * 4
    assert memory.argument_bytes == 16 * 16384 * 128 * 4
    assert memory.peak_bytes == memory.argument_bytes + memory.temp_bytes
    assert "XLA refused to compile" in memory.largest_buffer and "f32[64,16384,16384]" in memory.largest_buffer


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT, **env})


def test_gpu_estimate_of_a_config_that_cannot_fit_exits_1():
    # 512 prompts x (256 + 3000) tokens: the teacher's and the update's [rows, heads, seq, seq]
    # attention scores need far more than 0.75 x 80 GB per GPU (256 rows per GPU).
    # The dense (reference) attention: the blockwise default would not hold the scores.
    result = _run(["-m", "effopd_jax.plan", f"--config={TINY_CONFIG}", "--topology=2xH100-80GB",
                   "--config.data.prompts_per_step=512", "--config.rollout.max_new_tokens=3000",
                   "--config.student.attention=direct", "--config.teachers[0].attention=direct"])
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["fits"] is False and summary["estimate"] is True and summary["devices"] == 2
    assert summary["topology"] == "2xH100-80GB" and summary["usable_bytes"] == int(81559 * 2**20 * 0.75)
    assert set(summary["programs"]) == {"optimizer_init", "rollout", "teacher_scoring", "update", "effopd_candidate",
                                        "effopd_validation_rollout", "eval_rollout"}
    assert {"teacher_scoring", "update"} <= set(summary["too_large"])
    assert "optimizer_init" not in summary["too_large"]
    assert any(line.startswith("DOES NOT FIT: teacher_scoring needs") and "largest buffer:" in line for line in lines)
    assert "ESTIMATE: XLA:CPU on 2 virtual CPU devices" in result.stdout

    # XLA:CPU lays arrays out unpadded: the rollout's arguments are exactly the student's params
    # (replicated: data=2), the KV cache of its 256 rows per device, the prompts and the key.
    student = read_json(os.path.join(REPO_ROOT, "configs", "tiny", "qwen3_h32.json"))
    split, whole = qwen3_param_counts(student)
    rows = 512 // 2
    cache = 2 * student["num_hidden_layers"] * rows * (256 + 3000) * student["num_key_value_heads"] \
        * student["head_dim"] * 4 + 4  # k and v in float32, the write index
    rollout = summary["programs"]["rollout"]
    assert rollout["argument_bytes"] == (split + whole) * 4 + cache + rows * 256 * (4 + 1) + 8
    assert rollout["alias_bytes"] == cache
    update = summary["programs"]["update"]
    state = (3 * (split + whole) + effopd_anchor_entries(student)) * 4  # params, Adam mu and nu, EffOPD anchor
    assert 0 <= update["alias_bytes"] - state < 1024  # + the counters, the rng and EffOPD's ladder and scores
    scores = rows * student["num_attention_heads"] * (256 + 3000) ** 2 * 4
    assert summary["programs"]["teacher_scoring"]["temp_bytes"] >= scores


def test_trainer_plan_only_plans_on_its_devices_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = _run(["-m", "effopd_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
                   "--config.plan_only=True"],
                  XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["topology"] == "local" and summary["devices"] == 4 and summary["fits"] is True
    assert summary["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert set(summary["programs"]) == {"optimizer_init", "rollout", "teacher_scoring", "update", "effopd_candidate",
                                        "effopd_validation_rollout", "eval_rollout"}
    assert not workdir.exists()
    # A CPU device's memory: the host's, shared by the 4 devices.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert summary["device_memory_bytes"] == host // 4
    assert math.isclose(summary["programs"]["rollout"]["argument_bytes"],
                        summary["programs"]["eval_rollout"]["argument_bytes"])
