"""Device meshes, T5X-style logical-axis rules and multi-host set-up.

One `jax.sharding.Mesh` with axes ('data', 'model'). Parameters and
activations carry logical axis names (model/layers.py); `LOGICAL_AXIS_RULES` maps
them to mesh axes as T5X's standard rules do: the frozen weights are split
over 'model' (heads, mlp, vocab), batches over 'data', and the prompt (axes
'prompt', 'prompt_embed') with its optimizer state is replicated. The same code
runs on one CPU device and on a TPU pod slice.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = 'data', 'model'

LOGICAL_AXIS_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    ('batch', DATA),
    ('vocab', MODEL),
    ('mlp', MODEL),
    ('heads', MODEL),
    ('joined_kv', MODEL),
    ('kv', None),
    ('embed', None),
    ('length', None),
    ('relpos_buckets', None),
    # Prompt tuning: the prompt is small and replicated on every device.
    ('prompt', None),
    ('prompt_embed', None),
)


@gin.configurable
def make_mesh(num_partitions: int = 1, mesh_shape: Optional[Sequence[int]] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A (data, model) mesh over all devices of all processes.

  num_partitions: size of the 'model' axis (T5X's NUM_PARTITIONS); the rest
  of the devices form 'data'. mesh_shape: an explicit (data, model) shape.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if mesh_shape is None:
    if n % num_partitions:
      raise ValueError(f'num_partitions={num_partitions} does not divide the {n} devices.')
    mesh_shape = (n // num_partitions, num_partitions)
  mesh_shape = tuple(int(x) for x in mesh_shape)
  if int(np.prod(mesh_shape)) != n:
    raise ValueError(f'Mesh shape {mesh_shape} needs {int(np.prod(mesh_shape))} devices; '
                     f'there are {n}.')
  try:
    grid = mesh_utils.create_device_mesh(mesh_shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # CPU and odd device counts have no topology to optimise for.
    grid = np.asarray(devices).reshape(mesh_shape)
  return Mesh(grid, (DATA, MODEL))


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
  """Mesh and axis rules in scope: activation constraints become shardings."""
  set_mesh = getattr(jax, 'set_mesh', None) or getattr(jax.sharding, 'use_mesh', None)
  with (set_mesh(mesh) if set_mesh else mesh), nn.logical_axis_rules(list(LOGICAL_AXIS_RULES)):
    yield


def logical_shardings(mesh: Mesh, logical_axes: Any,
                      rules: Sequence[Tuple[str, Optional[str]]] = LOGICAL_AXIS_RULES) -> Any:
  """Tree of PartitionSpecs of logical names -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_axes, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def put(tree: Any, shardings: Any) -> Any:
  """Host values (identical on every process) -> global arrays with shardings.

  Built shard by shard from host memory, which works for shardings that span
  several processes (plain device_put of a committed array does not).
  """
  def one(x, sharding):
    host = np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: one(x, shardings), tree)
  return jax.tree_util.tree_map(one, tree, shardings)


def put_consuming(tree: dict, shardings: Any,
                  dtype_of: Optional[Callable[[Tuple[str, ...], Any], Any]] = None) -> dict:
  """`put` for a nested dict of large host arrays, emptying `tree` as it goes.

  Each host array is released as soon as its device copy exists, so loading a
  model peaks at about one copy of the weights plus one array, not two copies.
  The caller must hold no other reference to the arrays. dtype_of(path, dtype)
  -> dtype, when given, casts each array on the host before it is moved.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(tree)
  flat_shardings = (None if isinstance(shardings, jax.sharding.Sharding)
                    else traverse_util.flatten_dict(shardings))

  def clear(d: dict) -> None:
    for v in d.values():
      if isinstance(v, dict):
        clear(v)
    d.clear()
  clear(tree)
  out = {}
  for key in list(flat):
    host = flat.pop(key)
    if dtype_of is not None:
      host = host.astype(dtype_of(key, host.dtype), copy=False)
    sharding = shardings if flat_shardings is None else flat_shardings[key]
    out[key] = put(host, sharding)
    # Transfers are asynchronous: wait, or every host array stays alive (and
    # its freed pages unreleased by release_host_memory) until all are done.
    jax.block_until_ready(out[key])
    del host
  return traverse_util.unflatten_dict(out)


def release_host_memory() -> bool:
  """Hands freed heap pages back to the OS (glibc malloc_trim; elsewhere a no-op).

  XLA's compiler and the checkpoint readers free hundreds of MB that glibc
  otherwise keeps mapped, which inflates the process's resident memory.
  """
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    return bool(ctypes.CDLL('libc.so.6').malloc_trim(0))
  except (OSError, AttributeError):
    return False


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This host's rows -> global arrays split over 'data' (all hosts call it)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(x: Any) -> np.ndarray:
  """A global array's full value on this host (replicated or gathered)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM (or GKE TPU pod): TPU devices or the TPU runtime's variables."""
  import glob  # pylint: disable=g-import-not-at-top
  tpu_env = ('TPU_WORKER_ID', 'CLOUD_TPU_TASK_ID', 'TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE',
             'TPU_NAME')
  return any(v in os.environ for v in tpu_env) or bool(glob.glob('/dev/accel*')) or \
      os.path.exists('/dev/vfio/0')


@gin.configurable
def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           cpu_collectives: str = 'gloo') -> None:
  """Starts JAX's distributed runtime when the run spans several processes.

  On Cloud TPU VMs and pod slices all arguments are discovered by JAX (from the
  TPU metadata). GPU clusters and the localhost tests pass the coordinator
  explicitly (T5X's --coordinator_address/--process_count/--process_index);
  then JAX's own cluster detection is switched off, because under SLURM it
  would pin each process to the single GPU of SLURM_LOCALID even when one
  process drives all GPUs of a node. CPU processes exchange data with gloo.
  """
  if coordinator_address is None:
    if num_processes not in (None, 1) or not on_cloud_tpu_vm():
      if num_processes not in (None, 1):
        raise ValueError('--process_count > 1 needs --coordinator_address.')
      return  # a single process: nothing to start
    jax.distributed.initialize()  # Cloud TPU: topology from the TPU metadata
    return
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  local_ids = os.environ.get('JAX_LOCAL_DEVICE_IDS')
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id,
      local_device_ids=[int(i) for i in local_ids.split(',')] if local_ids else None,
      cluster_detection_method='deactivate')
