"""Performance accounting: FLOPs of a compiled step, MFU, compilation counting.

  * `step_flops(fn, *args)`: XLA's own FLOP count of the compiled program
    (`jax.jit(fn).lower(*args).compile().cost_analysis()`), so MFU needs no
    hand-derived formula that drifts from the model (prompt rows, gating, tied
    head, remat recomputation are all counted as compiled).
  * `peak_flops_per_device()`: dense bf16 peak of the local accelerator, from
    a table keyed by `jax.devices()[0].device_kind`; None where unknown (CPU).
  * `mfu(flops_per_step, steps_per_second, n_devices)`.
  * `CompileCounter`: counts XLA compilations inside a `with` block, through
    the `/jax/core/compile/backend_compile_duration` event JAX records around
    every backend compile (JAX 0.4.30 to 0.10 at least). A training loop
    wraps its steps after the first in one and asserts the count stays 0: a
    batch whose shape or dtype changes, or a Python scalar where an array was
    expected, shows up as a recompilation instead of a silent slowdown.
"""
from __future__ import annotations

import os
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax

# Events JAX records (jax/_src/dispatch.py). BACKEND_COMPILE fires once per
# XLA compilation request that missed jit's in-memory caches (a persistent
# compilation-cache hit still fires it, with a short duration).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
JAXPR_TRACE_EVENT = '/jax/core/compile/jaxpr_trace_duration'

# Dense (no sparsity) bf16 peak FLOP/s of one JAX device, by device_kind.
# JAX exposes one device per TPU chip from v4 on (megacore) and one per
# TensorCore on v2/v3; GPUs are one device each. First matching row wins, so
# the more specific spellings come first. Sources: Google Cloud TPU system
# architecture pages; NVIDIA A100/H100/H200 datasheets (SXM unless named).
_PEAK_BF16_FLOPS: Tuple[Tuple[str, float], ...] = (
    (r'TPU v2', 22.5e12),            # 45 TFLOP/s per chip, 2 cores
    (r'TPU v3', 61.5e12),            # 123 per chip, 2 cores
    (r'TPU v4 ?lite', 137.5e12),     # v4i (inference), 1 core
    (r'TPU v4', 275e12),
    (r'TPU v5 ?lite|TPU v5e', 197e12),
    (r'TPU v5p|TPU v5$', 459e12),    # v5p reports device_kind 'TPU v5'
    (r'TPU v6 ?lite|TPU v6e|TPU v6', 918e12),  # Trillium
    (r'TPU7x|TPU v7', 2307e12),      # Ironwood
    (r'H200', 989e12),
    (r'H100.*PCIe', 756e12),
    (r'H100.*NVL', 835e12),
    (r'H100|GH200', 989e12),
    (r'A100', 312e12),
    (r'L4\b', 121e12),
    (r'A10G', 70e12),
    (r'V100', 125e12),               # fp16 tensor cores (no bf16)
)


# ---------------------------------------------------------------------------
# XLA settings that must be in place before the backend starts / first compile.
# ---------------------------------------------------------------------------
# XLA's concurrency-optimised CPU scheduler moves the recomputation remat
# introduces back next to the forward pass, which undoes the memory saving
# (measured on T5-small shape: peak RSS 1943 MB with it, 1592 MB without).
# It is read from XLA_FLAGS when the backend starts; jit's per-call
# compiler_options do not reach it.
CPU_REMAT_XLA_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def use_remat_friendly_cpu_scheduler(environ: Any = None) -> bool:
  """Adds CPU_REMAT_XLA_FLAG to XLA_FLAGS unless the user set that option.

  Must run before JAX starts its backend; it only affects the CPU backend.
  Returns True when the flag was added.
  """
  environ = os.environ if environ is None else environ
  flags = environ.get('XLA_FLAGS', '')
  if 'xla_cpu_enable_concurrency_optimized_scheduler' in flags:
    return False
  environ['XLA_FLAGS'] = f'{flags} {CPU_REMAT_XLA_FLAG}'.strip()
  return True


def use_compilation_cache(directory: Optional[str]) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `directory`.

  A cache the user already configured (JAX_COMPILATION_CACHE_DIR or
  jax.config) wins; '' or None leaves the cache off. Returns the directory in
  use, or None. Call it before the first compilation.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not directory:
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  return directory


# ---------------------------------------------------------------------------
# FLOPs from XLA's cost analysis.
# ---------------------------------------------------------------------------
def _merge_cost(analysis: Any) -> Dict[str, float]:
  """cost_analysis() as one {metric: value} dict.

  JAX < 0.4.30 returns a list with one dict per executable (one per device
  for pmap); later versions a dict. Lists are summed.
  """
  if analysis is None:
    return {}
  if isinstance(analysis, dict):
    return {k: float(v) for k, v in analysis.items() if _is_number(v)}
  total: Dict[str, float] = {}
  for part in analysis:
    for k, v in _merge_cost(part).items():
      total[k] = total.get(k, 0.0) + v
  return total


def _is_number(v: Any) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def _lower(fn: Callable, args: tuple, kwargs: dict) -> Any:
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  return jitted.lower(*args, **kwargs)


def step_cost(fn: Callable, *args: Any, **kwargs: Any) -> Dict[str, float]:
  """XLA's cost analysis of `fn` compiled for these arguments.

  fn: a `jax.jit`-wrapped function (its shardings, donation and static
  arguments are kept) or a plain function (jitted here). Arguments may be
  arrays or `jax.ShapeDtypeStruct`s. Keys include 'flops', 'transcendentals'
  and 'bytes accessed' where the backend reports them. Falls back to the
  unoptimised (lowered) module's analysis where the compiled one is missing.
  """
  lowered = _lower(fn, args, kwargs)
  cost: Dict[str, float] = {}
  try:
    cost = _merge_cost(lowered.compile().cost_analysis())
  except NotImplementedError:
    pass
  if 'flops' not in cost:
    try:
      cost = {**_merge_cost(lowered.cost_analysis()), **cost}
    except NotImplementedError:
      pass
  return cost


def step_flops(fn: Callable, *args: Any, **kwargs: Any) -> Optional[float]:
  """FLOPs of one call of `fn(*args, **kwargs)` as XLA compiled it, or None.

  For a program partitioned over several devices the compiled module is the
  per-device one, so this is FLOPs per device; pass it to `mfu` with
  n_devices=1, or multiply by the device count for the global number.
  A matmul [m, k] x [k, n] counts 2*m*n*k.
  """
  flops = step_cost(fn, *args, **kwargs).get('flops')
  return None if flops is None or flops < 0 else float(flops)


# ---------------------------------------------------------------------------
# Peak FLOP/s and MFU.
# ---------------------------------------------------------------------------
def peak_flops_per_device(device: Any = None) -> Optional[float]:
  """Dense bf16 peak FLOP/s of `device` (default: jax.devices()[0]).

  None for CPUs and accelerators not in the table; MFU then is unknown
  rather than wrong.
  """
  device = device if device is not None else jax.devices()[0]
  if getattr(device, 'platform', '') == 'cpu':
    return None
  return peak_flops_for_kind(getattr(device, 'device_kind', ''))


def peak_flops_for_kind(device_kind: str) -> Optional[float]:
  """Table lookup by a device_kind string such as 'TPU v4' or 'NVIDIA H100 80GB HBM3'."""
  for pattern, peak in _PEAK_BF16_FLOPS:
    if re.search(pattern, device_kind or '', flags=re.IGNORECASE):
      return peak
  return None


def mfu(flops_per_step: Optional[float], steps_per_second: float, n_devices: int = 1,
        peak_flops: Optional[float] = None) -> Optional[float]:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak.

  flops_per_step: FLOPs of one step summed over all devices (for a
  `step_flops` of an SPMD program: per-device FLOPs times n_devices).
  peak_flops: per-device peak, default `peak_flops_per_device()`. Returns a
  fraction (0.42 = 42%), or None when the FLOPs or the peak are unknown.
  """
  if n_devices <= 0:
    raise ValueError(f'n_devices must be positive, got {n_devices}.')
  peak = peak_flops if peak_flops is not None else peak_flops_per_device()
  if flops_per_step is None or peak is None or peak <= 0:
    return None
  return float(flops_per_step) * float(steps_per_second) / (n_devices * float(peak))


# ---------------------------------------------------------------------------
# Compilation counting.
# ---------------------------------------------------------------------------
def _unregister_duration_listener(callback: Callable) -> None:
  unregister = getattr(jax.monitoring, 'unregister_event_duration_listener', None)
  if unregister is not None:
    unregister(callback)
    return
  # JAX before unregister_* existed: remove it from the private list.
  from jax._src import monitoring as _monitoring  # pylint: disable=g-import-not-at-top
  listeners = getattr(_monitoring, '_event_duration_secs_listeners', [])
  if callback in listeners:
    listeners.remove(callback)


class CompileCounter:
  """Counts XLA compilations (and jaxpr traces) while the context is open.

      with perf.CompileCounter() as compiles:
        for batch in batches:
          state, metrics = p_train_step(state, frozen, batch, rng)
      assert compiles.count == 0, compiles.names

  match: only count functions whose name matches this regex (e.g.
  'train_step'); by default every compilation, eager op-by-op ones included.
  `count` is the number of backend compilations, `names` their function
  names in order, `seconds` the total compile time, `traces` the number of
  jaxpr traces (a retrace without recompilation also shows up there).
  JAX's listeners are process-wide: compilations in other threads count too.
  A persistent compilation-cache hit still counts (it is a compile request
  that missed jit's in-memory cache).
  """

  def __init__(self, match: Optional[Union[str, re.Pattern]] = None):
    self._match = re.compile(match) if isinstance(match, str) else match
    self._lock = threading.Lock()
    self.names: List[str] = []
    self.seconds = 0.0
    self.traces = 0
    self._active = False

  @property
  def count(self) -> int:
    return len(self.names)

  def _wanted(self, kwargs: dict) -> bool:
    if self._match is None:
      return True
    return bool(self._match.search(str(kwargs.get('fun_name', ''))))

  def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
    if not self._wanted(kwargs):
      return
    with self._lock:
      if event == BACKEND_COMPILE_EVENT:
        self.names.append(str(kwargs.get('fun_name', '?')))
        self.seconds += float(duration)
      elif event == JAXPR_TRACE_EVENT:
        self.traces += 1

  def __enter__(self) -> 'CompileCounter':
    if self._active:
      raise RuntimeError('CompileCounter is already active.')
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    self._active = True
    return self

  def __exit__(self, *exc: Any) -> None:
    _unregister_duration_listener(self._listener)
    self._active = False

  def __repr__(self) -> str:
    return (f'CompileCounter(count={self.count}, traces={self.traces}, '
            f'seconds={self.seconds:.3f}, names={self.names})')


def lowered_flops(jitted: Callable, *args: Any, **kwargs: Any) -> Optional[float]:
  """Global FLOPs of one call from the lowered (not yet compiled) program.

  Cheap (no compilation) and independent of partitioning: the trainer logs it
  as model FLOPs per step.
  """
  try:
    flops = _merge_cost(_lower(jitted, args, kwargs).cost_analysis()).get('flops')
  except Exception:  # pylint: disable=broad-except  (backends differ in support)
    return None
  return None if flops is None or flops < 0 else float(flops)
