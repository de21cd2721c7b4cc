"""prompt_transfer.training.perf: compile counting, XLA FLOP counts, MFU arithmetic."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from prompt_transfer.training import perf


def test_compile_counter_counts_one_compile_for_same_shapes_then_one_more():
  # A fresh function object: jit's caches are per function, so no earlier test
  # can have compiled it already.
  step = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(axis=0))
  w = jnp.ones((8, 4), jnp.float32)
  xs = [jnp.full((3, 8), i, jnp.float32) for i in range(4)]
  with perf.CompileCounter(match='lambda') as compiles:
    for x in xs:
      step(x, w).block_until_ready()
    assert compiles.count == 1, compiles
    step(jnp.ones((5, 8), jnp.float32), w).block_until_ready()  # new shape
    step(jnp.ones((5, 8), jnp.float32), w).block_until_ready()
    step(xs[0], w).block_until_ready()  # first shape: still cached
  assert compiles.count == 2, compiles
  assert all('lambda' in n for n in compiles.names)
  assert compiles.seconds > 0 and compiles.traces == 2


def test_compile_counter_stops_listening_after_exit():
  f = jax.jit(lambda x: x + 1)
  with perf.CompileCounter() as compiles:
    f(jnp.ones(3))
  n = compiles.count
  assert n >= 1
  f(jnp.ones(4))  # compiles, but outside the block
  assert compiles.count == n


def test_compile_counter_match_filters_other_functions():
  def other_fn(x):
    return x - 1
  target = jax.jit(lambda x: x * 3)
  with perf.CompileCounter(match='other_fn') as compiles:
    target(jnp.ones(7))
    jax.jit(other_fn)(jnp.ones(7))
  assert compiles.names == ['jit(other_fn)'], compiles


def test_step_flops_of_a_matmul_is_2mnk():
  m, k, n = 64, 48, 32
  f = jax.jit(lambda a, b: a @ b)
  flops = perf.step_flops(f, jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops is not None and flops > 0
  assert flops == pytest.approx(2 * m * n * k, rel=0.1)


def test_step_flops_accepts_plain_functions_and_shape_structs():
  m, k, n = 16, 16, 16
  spec = jax.ShapeDtypeStruct((m, k), jnp.float32)
  flops = perf.step_flops(lambda a, b: a @ b, spec, spec)
  assert flops == pytest.approx(2 * m * n * k, rel=0.1)
  cost = perf.step_cost(lambda a, b: a @ b, spec, spec)
  assert cost['flops'] == pytest.approx(flops)


def test_merge_cost_handles_list_and_dict_forms():
  assert perf._merge_cost({'flops': 10.0, 'name': 'x'}) == {'flops': 10.0}
  assert perf._merge_cost([{'flops': 10.0}, {'flops': 5.0, 'bytes accessed': 2}]) == {
      'flops': 15.0, 'bytes accessed': 2.0}
  assert perf._merge_cost(None) == {}


def test_peak_flops_table():
  assert perf.peak_flops_for_kind('TPU v4') == 275e12
  assert perf.peak_flops_for_kind('TPU v5 lite') == 197e12
  assert perf.peak_flops_for_kind('TPU v5') == 459e12
  assert perf.peak_flops_for_kind('TPU v5p') == 459e12
  assert perf.peak_flops_for_kind('TPU v6 lite') == 918e12
  assert perf.peak_flops_for_kind('NVIDIA A100-SXM4-80GB') == 312e12
  assert perf.peak_flops_for_kind('NVIDIA H100 80GB HBM3') == 989e12
  assert perf.peak_flops_for_kind('NVIDIA H100 PCIe') == 756e12
  assert perf.peak_flops_for_kind('NVIDIA H200') == 989e12
  assert perf.peak_flops_for_kind('Some CPU') is None
  if jax.devices()[0].platform == 'cpu':
    assert perf.peak_flops_per_device() is None


def test_mfu_arithmetic():
  # 1e12 FLOPs per step, 10 steps/s, 4 devices of 10 TFLOP/s peak: 25%.
  assert perf.mfu(1e12, 10.0, 4, peak_flops=10e12) == pytest.approx(0.25)
  assert perf.mfu(2e12, 0.5, 1, peak_flops=4e12) == pytest.approx(0.25)
  assert perf.mfu(None, 10.0, 1, peak_flops=1e12) is None
  assert perf.mfu(1e12, 10.0, 1, peak_flops=None) == (
      None if perf.peak_flops_per_device() is None
      else pytest.approx(1e13 / perf.peak_flops_per_device()))
  with pytest.raises(ValueError):
    perf.mfu(1.0, 1.0, 0, peak_flops=1.0)


def test_remat_friendly_cpu_scheduler_flag_is_added_once_and_respects_the_user():
  env = {}
  assert perf.use_remat_friendly_cpu_scheduler(env)
  assert env['XLA_FLAGS'] == perf.CPU_REMAT_XLA_FLAG
  assert not perf.use_remat_friendly_cpu_scheduler(env)  # already there
  assert env['XLA_FLAGS'] == perf.CPU_REMAT_XLA_FLAG
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                      '--xla_cpu_enable_concurrency_optimized_scheduler=true'}
  assert not perf.use_remat_friendly_cpu_scheduler(env)  # the user's choice wins
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert perf.use_remat_friendly_cpu_scheduler(env)
  assert env['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=8',
                                      perf.CPU_REMAT_XLA_FLAG]


def test_use_compilation_cache_respects_a_configured_cache(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    assert perf.use_compilation_cache('') is None
    assert jax.config.jax_compilation_cache_dir is None
    assert perf.use_compilation_cache(str(tmp_path)) == str(tmp_path)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    # Already configured (JAX_COMPILATION_CACHE_DIR or the user): kept.
    assert perf.use_compilation_cache(str(tmp_path / 'other')) == str(tmp_path)
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
