"""Compiled memory of the trainer's update step at long sequences: attention forms and micro-batches.

For a real Qwen shape (default Qwen3-1.7B, from third_party/qwen_configs) the script compiles the
trainer's jitted update (`trainer.update_step`: sampled-token loss, chunked lm-head, AdamW; fp32
params, bf16 compute, `scan_layers`, `remat="full"`, parameters and rows split over an `fsdp`
axis of all devices) for abstract arguments only (`jax.ShapeDtypeStruct`, nothing is allocated),
and prints XLA's memory analysis per device: arguments, outputs, temporaries. Rows are
prompt + response of `--prompt` + (L - prompt) tokens.

Target: a TPU topology (`--topology v5p:4x4x4`; needs `libtpu`, e.g. `pip install
"jax[tpu]==<jax version>"` into a separate environment or `--target` directory on PYTHONPATH;
no TPU is needed to compile), or `--topology cpu` (this machine's CPU devices: the same sharded
program for the CPU backend, whose temporaries differ from a TPU's).

Printed: one line per (attention form, sequence length, rows per device, micro-batch rows per
device), the ratio of temporaries between the longest and the shortest sequence for each form
(quadratic growth shows as ~(L2/L1)^2, linear as ~L2/L1), and the ratio between forms.

Usage::

    PYTHONPATH=.:/path/to/libtpu_site python benchmarks/attention_memory.py --topology v5p:4x4x4
    python benchmarks/attention_memory.py --topology cpu --model Qwen/Qwen3-0.6B --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import config as config_lib
from effopd_jax import models, objectives
from effopd_jax import sharding as sharding_lib
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.trainer import FullFineTuning, TrainState, make_optimizer, update_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3


def _devices(topology: str):
    if topology == "cpu":
        return jax.devices()
    from jax.experimental import topologies  # noqa: PLC0415

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def abstract_update_arguments(config: QwenConfig, mesh: Mesh, optimizer, *, rows: int, prompt: int,
                              new_tokens: int):
    """(state, batch, frozen) of `update_step` as sharded `jax.ShapeDtypeStruct`s."""
    param_shardings = sharding_lib.param_shardings(config, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          models.abstract_params(config), param_shardings)
    replicated = NamedSharding(mesh, P())
    # Moments are laid out like their params; everything else (counters) is replicated.
    opt_state = optax.tree_map_params(
        optimizer, lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(optimizer.init, params), param_shardings,
        transform_non_params=lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated))
    counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step=counter, trainable_params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                       skipped_updates=counter, consecutive_skips=counter)
    rows_of = lambda length, dtype: jax.ShapeDtypeStruct((rows, length), dtype,
                                                        sharding=sharding_lib.batch_sharding(mesh, 2))
    batch = OPDBatch(prompt_ids=rows_of(prompt, jnp.int32), prompt_mask=rows_of(prompt, jnp.bool_),
                     response_ids=rows_of(new_tokens, jnp.int32), response_mask=rows_of(new_tokens, jnp.bool_),
                     behaviour_logprobs=rows_of(new_tokens, jnp.float32),
                     teacher_logprobs=rows_of(new_tokens, jnp.float32))
    return state, batch, {}


def compile_update(hf: dict, impl: str, mesh: Mesh, *, rows: int, prompt: int, new_tokens: int,
                   micro_batch_size: int):
    config = QwenConfig.from_hf(hf, param_dtype="float32", dtype="bfloat16", scan_layers=True, remat="full",
                                attention_impl=impl)
    defaults = config_lib.default_config()
    optimizer, _ = make_optimizer(defaults.optimizer, total_steps=100, effopd_config=defaults.effopd,
                                  param_filter=FullFineTuning().param_filter(models.layout(config)))
    # Built outside the mesh context: eager work (a PRNG key) must not target abstract devices.
    state, batch, frozen = abstract_update_arguments(config, mesh, optimizer, rows=rows, prompt=prompt,
                                                     new_tokens=new_tokens)
    with sharding_lib.sharding_context(mesh):
        update = jax.jit(functools.partial(
            update_step, optimizer=optimizer, model_config=config, parameterization=FullFineTuning(),
            loss=objectives.get_loss("sampled_token"), settings=LossSettings(chunk_size=512),
            micro_batch_size=micro_batch_size), donate_argnums=(0,))
        return update.lower(state, batch, frozen).compile()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:4x4x4", help="a TPU topology name, or 'cpu'")
    parser.add_argument("--model", default="Qwen/Qwen3-1.7B", help="a key of third_party/qwen_configs")
    parser.add_argument("--lengths", default="4096,18432", help="prompt + response tokens per row")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens (the rest is response)")
    parser.add_argument("--impls", default="direct,blockwise,splash", help="attention forms (splash: TPU only)")
    parser.add_argument("--rows-per-device", default="1", help="rows per device, comma-separated")
    parser.add_argument("--micro-rows-per-device", type=int, default=0,
                        help="also compile with micro-batches of this many rows per device (0: off)")
    args = parser.parse_args(argv)

    with open(os.path.join(REPO, "third_party", "qwen_configs", "qwen_configs.json")) as f:
        hf = json.load(f)[args.model]
    devices = _devices(args.topology)
    mesh = Mesh(np.asarray(devices).reshape(1, len(devices), 1), sharding_lib.MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)
    impls = [i for i in args.impls.split(",") if i != "splash" or args.topology != "cpu"]
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{args.model} update step on {args.topology} ({len(devices)} devices, fsdp), per device:", flush=True)
    print(f"{'attention':>10} {'tokens':>7} {'rows/dev':>8} {'micro/dev':>9} {'args GiB':>9} {'out GiB':>8} "
          f"{'temp GiB':>9} {'compile s':>9}", flush=True)
    temps: dict = {}
    for rows_per_device in (int(x) for x in args.rows_per_device.split(",")):
        micro_options = [0] + ([args.micro_rows_per_device] if args.micro_rows_per_device else [])
        for micro in micro_options:
            for impl in impls:
                for length in lengths:
                    start = time.perf_counter()
                    compiled = compile_update(hf, impl, mesh, rows=rows_per_device * len(devices),
                                              prompt=args.prompt, new_tokens=length - args.prompt,
                                              micro_batch_size=micro * len(devices))
                    memory = compiled.memory_analysis()
                    temps[(impl, length, rows_per_device, micro)] = memory.temp_size_in_bytes
                    print(f"{impl:>10} {length:>7} {rows_per_device:>8} {micro or '-':>9} "
                          f"{memory.argument_size_in_bytes / GIB:9.2f} {memory.output_size_in_bytes / GIB:8.2f} "
                          f"{memory.temp_size_in_bytes / GIB:9.2f} {time.perf_counter() - start:9.1f}", flush=True)
    if len(lengths) > 1:
        short, long = min(lengths), max(lengths)
        print(f"temporaries at {long} / at {short} tokens (linear: {long / short:.1f}x, quadratic: "
              f"{(long / short) ** 2:.1f}x):")
        for (impl, length, rows, micro), temp in temps.items():
            if length == long and (impl, short, rows, micro) in temps:
                print(f"  {impl:>10} rows/dev {rows} micro {micro or '-'}: {temp / temps[(impl, short, rows, micro)]:.2f}x")
    for key, temp in temps.items():
        impl, length, rows, micro = key
        if impl != "direct" and ("direct", length, rows, micro) in temps:
            print(f"direct / {impl} temporaries at {length} tokens, rows/dev {rows}, micro {micro or '-'}: "
                  f"{temps[('direct', length, rows, micro)] / temp:.1f}x")


if __name__ == "__main__":
    main()
