"""Intrinsic prompt tuning (IPT, Qin et al. 2021): a low-dimensional subspace
of prompts found over many tasks, and tuning inside it.

Three prompt modules (prompts/slot.py's contract), so every stage is a
`t5x train` run of the frozen model:

* `SubspaceAutoencoder`: multi-task subspace finding (MSF,
  gin/runs/ipt_msf.gin). The zoo's K prompts [K, L, d] (zoo.py) are frozen
  inputs; encoder Linear(L*d -> r), no activation; decoder Linear(r ->
  hidden), tanh, Linear(hidden -> L*d). Each example gets its task's decoded
  prompt (by `task_ids`); the loss is the task loss plus
  `reconstruction_weight` (authors: 200) x MSE(decoded, original), sown as
  `losses/reconstruction`. The run's numpy checkpoint is a subspace: the
  decoder's weights (`encoder.prompt.prompt.decode_in.kernel`, ...) beside
  `subspace.json` (model, L, d, r, hidden, tasks).
* `IntrinsicPrompt`: intrinsic subspace tuning (IST, gin/prompts/intrinsic.gin):
  only v in R^r trains (init N(0, 0.02)); prompt = Decoder(v), the decoder
  frozen, from an MSF run, or untrained (`subspace_dir=None`: the same
  decoder at its random initialisation, the paper's random-subspace baseline).
* `FastfoodPrompt`: the intrinsic-dimension baseline (Aghajanyan et al.
  2021, as the IPT authors apply it: per parameter tensor, here the prompt,
  v initialised at zero): prompt = P0 + Fastfood(v), P0 the initial prompt.

With `num_prompts` K > 1, IST and Fastfood tune K vectors at once, one per
task of a `task_ids` mixture (AdamW updates each element on its own
gradient, so this is K independent runs sharing one compiled program).
Stage two (a full prompt started from Decoder(v)) is prompt tuning from the
IST run's prompt file: `prompts/from_file.gin`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.projector import Frozen
from prompt_transfer.prompts import files
from prompt_transfer.prompts.initializers import PromptInit, from_sampled_vocab

Array = jax.Array
TASK_IDS = 'task_ids'
SUBSPACE_FILE = 'subspace.json'
DECODER_LAYERS = ('decode_in', 'decode_out')


class SubspaceError(ValueError):
  """A subspace that cannot be used here (files missing, another model or shape)."""


class Decoder(nn.Module):
  """v [..., r] -> flattened prompt [..., out_dim]: Linear, tanh, Linear."""
  hidden: int
  out_dim: int

  @nn.compact
  def __call__(self, v: Array) -> Array:
    h = jnp.tanh(nn.Dense(self.hidden, name='decode_in')(v))  # [..., hidden]
    return nn.Dense(self.out_dim, name='decode_out')(h)  # [..., L*d]


def decode(params: Mapping[str, Any], v: Array) -> Array:
  """The decoder with given weights ({'decode_in': {kernel, bias}, 'decode_out': ...})."""
  hidden, out_dim = (int(np.shape(params[n]['kernel'])[1]) for n in DECODER_LAYERS)
  return Decoder(hidden, out_dim).apply({'params': params}, v)


def random_decoder(dim: int, hidden: int, out_dim: int, seed: int = 0) -> dict:
  """The decoder at its initialisation (what MSF starts from): numpy arrays."""
  with jax.ensure_compile_time_eval():  # concrete even inside a jit trace
    params = Decoder(hidden, out_dim).init(jax.random.PRNGKey(seed), jnp.zeros((dim,)))
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                nn.unbox(params['params']))


class _PerTask:
  """A module with one prompt per task (`num_prompts`) reads `task_ids` when K > 1."""
  num_prompts: int

  @property
  def per_example_features(self) -> Tuple[str, ...]:
    return (TASK_IDS,) if self.num_prompts > 1 else ()


def _select(prompts: Array, features: Optional[Mapping[str, Array]], who: str) -> Array:
  """[K, L, d] -> [L, d] (K = 1) or each example's by task id [b, L, d]."""
  if prompts.shape[0] == 1:
    return prompts[0]
  if not features or TASK_IDS not in features:
    raise KeyError(f'{who} over {prompts.shape[0]} tasks needs the per-example feature '
                   f"'{TASK_IDS}' (MIXTURE_OR_TASK_NAME = @task_ids_mixture()).")
  ids = jnp.asarray(features[TASK_IDS]).astype(jnp.int32).reshape(-1)
  return jnp.take(prompts, ids, axis=0)


# ---------------------------------------------------------------------------
# MSF: the auto-encoder over the zoo's prompts.
# ---------------------------------------------------------------------------
class SubspaceAutoencoder(_PerTask, nn.Module):
  """K zoo prompts [K, L, d] -> encode -> r numbers each -> decode -> [K, L, d]."""
  sources: Frozen
  dim: int = 5
  hidden: int = 768
  reconstruction_weight: float = 200.0
  task_names: Tuple[str, ...] = ()
  source_files: Tuple[str, ...] = ()

  @property
  def num_prompts(self) -> int:
    return int(self.sources.value.shape[0])

  def extra_files(self, info: files.PromptInfo) -> dict:
    k, length, width = self.sources.value.shape
    sub = SubspaceInfo(model=dict(info.model), weights=info.weights, length=int(length),
                       width=int(width), dim=self.dim, hidden=self.hidden,
                       tasks=list(self.task_names), source_files=list(self.source_files),
                       reconstruction_weight=self.reconstruction_weight, training='msf')
    return {SUBSPACE_FILE: json.dumps(dataclasses.asdict(sub), indent=1)}

  @nn.compact
  def __call__(self, embedding: Array, features: Optional[Mapping[str, Array]] = None
               ) -> Array:
    src = jnp.asarray(self.sources.value)  # [K, L, d]
    k, length, width = src.shape
    if width != embedding.shape[-1]:
      raise SubspaceError(f'The zoo prompts are {width} wide; this model embeds in '
                          f'{embedding.shape[-1]} (prompts of another model?).')
    z = nn.Dense(self.dim, name='encode')(src.reshape(k, -1))  # [K, r]
    y = Decoder(self.hidden, length * width, name='decoder')(z).reshape(k, length, width)
    if features and TASK_IDS in features and k > 1:
      ids = jnp.asarray(features[TASK_IDS]).astype(jnp.int32).reshape(-1)
      err = jnp.take(y - src, ids, axis=0)  # [b, L, d]: each example's task
    else:
      err = y - src
    self.sow('losses', 'reconstruction', self.reconstruction_weight * jnp.mean(jnp.square(err)))
    return _select(y, features, 'The MSF auto-encoder')


def msf_autoencoder(zoo_dir: str, tasks: Sequence[str], dim: int = 5, hidden: int = 768,
                    reconstruction_weight: float = 200.0) -> Callable[..., SubspaceAutoencoder]:
  """The MSF prompt-module factory over the zoo's prompts of `tasks` (in
  order: task i is `task_ids` i of the mixture over the same list)."""
  from prompt_transfer import zoo  # pylint: disable=g-import-not-at-top
  # A mixture name stands for its tasks (the order task_ids_mixture gives them).
  tasks = zoo.expand_tasks([tasks]) if isinstance(tasks, str) else list(tasks)
  paths = zoo.prompt_files(zoo_dir, tasks)
  arrays = [files.load_prompt_file(p) for p in paths]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise SubspaceError(f'The zoo {zoo_dir} holds prompts of several shapes: ' + ', '.join(
        f'{t}: {a.shape}' for t, a in zip(tasks, arrays)))
  return functools.partial(SubspaceAutoencoder, sources=Frozen(np.stack(arrays)), dim=dim,
                           hidden=hidden, reconstruction_weight=reconstruction_weight,
                           task_names=tuple(tasks), source_files=tuple(paths))


# ---------------------------------------------------------------------------
# A found subspace on disk.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class SubspaceInfo:
  """subspace.json: what the decoder decodes to."""
  model: dict
  weights: str
  length: int
  width: int
  dim: int
  hidden: int
  tasks: list = dataclasses.field(default_factory=list)
  source_files: list = dataclasses.field(default_factory=list)
  reconstruction_weight: float = 200.0
  training: str = 'msf'


def subspace_folder(path: fileio.PathLike) -> str:
  """An MSF run's MODEL_DIR (its latest numpy checkpoint) or a checkpoint folder."""
  folder = files.folder_with(path, SUBSPACE_FILE)
  if folder is None:
    raise SubspaceError(f'{path} is not a subspace: no {SUBSPACE_FILE} in it or in its '
                        'latest numpy checkpoint (find one with runs/ipt_msf.gin).')
  return folder


def load_subspace(path: fileio.PathLike) -> Tuple[SubspaceInfo, dict]:
  """(SubspaceInfo, decoder params) of an MSF run."""
  folder = epath.Path(subspace_folder(path))
  info = SubspaceInfo(**json.loads((folder / SUBSPACE_FILE).read_text()))
  names = [f'decoder.{layer}.{leaf}' for layer in DECODER_LAYERS for leaf in ('kernel', 'bias')]
  saved = files.read_module_params(folder, names)
  if saved is None:
    raise SubspaceError(f'{folder} lacks one of {files.MODULE_PREFIX}{{{", ".join(names)}}}: '
                        'not a complete subspace.')
  params = saved['decoder']
  want = {('decode_in', 'kernel'): (info.dim, info.hidden),
          ('decode_out', 'kernel'): (info.hidden, info.length * info.width)}
  for (layer, leaf), shape in want.items():
    if params[layer][leaf].shape != shape:
      raise SubspaceError(f'{folder}: {files.MODULE_PREFIX}decoder.{layer}.{leaf} has shape '
                          f'{params[layer][leaf].shape}; {SUBSPACE_FILE} says {shape}.')
  return info, params


# ---------------------------------------------------------------------------
# IST: tuning v inside the subspace.
# ---------------------------------------------------------------------------
class IntrinsicPrompt(_PerTask, nn.Module):
  """prompt = Decoder(v): v [r] (or [K, r], one per task) is all that trains.

  decoder: an MSF run's weights, or None for the untrained decoder of
  r=`dim`, `hidden` at `seed` (the random-subspace baseline; made at trace
  time, when the model's width is known)."""
  decoder: Optional[Frozen]  # {'decode_in': {kernel, bias}, 'decode_out': {...}}
  length: int
  dim: int = 5
  hidden: int = 768
  seed: int = 0
  num_prompts: int = 1
  init_scale: float = 0.02
  source: str = ''  # where the decoder came from, for messages
  # The frozen model the subspace was found on (its sidecar), checked by the
  # trainer before training through check_frozen_weights.
  model_name: str = ''
  weights: str = ''

  def check_frozen_weights(self, config: Any, weights: str) -> None:
    if self.weights and weights and self.weights != weights:
      raise SubspaceError(
          f'The subspace {self.source} was found on {self.model_name or "a model"} (weights '
          f'{self.weights}); this run freezes {config.name} (weights {weights}). Find one '
          'on this model (runs/ipt_msf.gin).')

  @nn.compact
  def __call__(self, embedding: Array, features: Optional[Mapping[str, Array]] = None
               ) -> Array:
    width = embedding.shape[-1]
    if self.decoder is None:
      params = random_decoder(self.dim, self.hidden, self.length * width, self.seed)
    else:
      params = self.decoder.value
    dim = int(params['decode_in']['kernel'].shape[0])
    out_dim = int(params['decode_out']['kernel'].shape[1])
    if out_dim != self.length * width:
      raise SubspaceError(
          f'The subspace {self.source} decodes {out_dim} numbers; a prompt of length '
          f'{self.length} for this model (d_model {width}) has {self.length * width}.')
    v = self.param('v', nn.initializers.normal(self.init_scale), (self.num_prompts, dim))
    prompts = decode(jax.tree_util.tree_map(jnp.asarray, params), v)  # [K, L*d]
    return _select(prompts.reshape(self.num_prompts, self.length, width), features,
                   'An intrinsic prompt')


def intrinsic_prompt(subspace_dir: Optional[str] = None, length: Optional[int] = None,
                     dim: Optional[int] = None, hidden: int = 768, seed: int = 0, num_prompts: int = 1,
                     init_scale: float = 0.02) -> Callable[..., IntrinsicPrompt]:
  """IST's prompt-module factory: the decoder of the MSF run `subspace_dir`
  (its length and r come from subspace.json; `length` and `dim`, when given,
  must agree), or with `subspace_dir=None` the untrained decoder of r=`dim`
  and `hidden` for prompts of `length` rows (the random-subspace baseline)."""
  if subspace_dir:
    info, params = load_subspace(subspace_dir)
    source = subspace_folder(subspace_dir)
    for what, given, has in (('PROMPT_LENGTH', length, info.length),
                             ('INTRINSIC_DIM', dim, info.dim)):
      if given is not None and given != has:
        raise SubspaceError(f'{what} is {given}; the subspace {source} has {has}.')
    return functools.partial(IntrinsicPrompt, decoder=Frozen(params), length=info.length,
                             dim=info.dim, hidden=info.hidden, num_prompts=num_prompts,
                             init_scale=init_scale, source=source,
                             model_name=info.model.get('name', ''), weights=info.weights)
  if length is None or dim is None:
    raise SubspaceError('A random subspace needs the prompt length and its dimension '
                        '(intrinsic_prompt.length, intrinsic_prompt.dim).')
  return functools.partial(
      IntrinsicPrompt, decoder=None, length=length, dim=dim, hidden=hidden, seed=seed,
      num_prompts=num_prompts, init_scale=init_scale,
      source=f'random decoder (r={dim}, hidden={hidden}, seed={seed})')


# ---------------------------------------------------------------------------
# The Fastfood random subspace (intrinsic dimension).
# ---------------------------------------------------------------------------
def fwht(x: Array) -> Array:
  """The Walsh-Hadamard transform over the last axis (length a power of 2),
  unnormalised, in Sylvester order: x @ scipy.linalg.hadamard(n), in
  O(n log n). Hand-written: neither jax nor optax ships one."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f'fwht needs a power-of-two length; got {n}.')
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
    h *= 2
  return x


@dataclasses.dataclass(frozen=True)
class Fastfood:
  """P = H G Pi H B (scaled), a [D, d] random map applied in O(D log D)
  (Le et al. 2013; Li et al. 2018's intrinsic dimension): B random signs, H
  Walsh-Hadamard, Pi a permutation, G Gaussian, over the next power of two
  above D. Scaled so that ||P v|| ~= ||v||."""
  out_dim: int
  signs: np.ndarray
  perm: np.ndarray
  gauss: np.ndarray

  @classmethod
  def make(cls, out_dim: int, seed: int) -> 'Fastfood':
    n = 1 << max(0, (out_dim - 1).bit_length())
    rng = np.random.default_rng(seed)
    return cls(out_dim, rng.choice([-1.0, 1.0], n).astype(np.float32),
               rng.permutation(n), rng.standard_normal(n).astype(np.float32))

  def __call__(self, v: Array) -> Array:
    """v [..., d] (d <= padded size) -> [..., out_dim]."""
    n = self.signs.shape[0]
    d = v.shape[-1]
    if d > n:
      raise ValueError(f'Fastfood of {d} dimensions into {self.out_dim}: d must be <= {n}.')
    x = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, n - d)])
    x = fwht(x * self.signs)[..., self.perm] * self.gauss
    x = fwht(x) / math.sqrt(n * float(np.sum(self.gauss ** 2)))
    return x[..., :self.out_dim] * math.sqrt(n / self.out_dim)


class FastfoodPrompt(_PerTask, nn.Module):
  """prompt = P0 + reshape(Fastfood(v)); v [d] (or [K, d]) starts at zero."""
  length: int
  dim: int = 5
  p0_init: PromptInit = from_sampled_vocab()  # not `init`: that is Module.init
  seed: int = 0
  num_prompts: int = 1

  @nn.compact
  def __call__(self, embedding: Array, features: Optional[Mapping[str, Array]] = None
               ) -> Array:
    width = embedding.shape[-1]
    shape = (self.length, width)
    # P0: the initialiser's prompt at a fixed key, recomputed (it reads the
    # frozen table) rather than stored, so it is not a trainable parameter.
    p0 = self.p0_init(jax.random.PRNGKey(self.seed), shape, embedding)  # [L, d]
    v = self.param('v', nn.initializers.zeros, (self.num_prompts, self.dim))
    delta = Fastfood.make(self.length * width, self.seed)(v)  # [K, L*d]
    prompts = p0[None] + delta.reshape((self.num_prompts,) + shape)
    return _select(prompts, features, 'A Fastfood prompt')


def fastfood_prompt(length: int, dim: int = 5, init: Optional[PromptInit] = None,
                    seed: int = 0, num_prompts: int = 1) -> Callable[..., FastfoodPrompt]:
  return functools.partial(FastfoodPrompt, length=length, dim=dim,
                           p0_init=init or from_sampled_vocab(), seed=seed,
                           num_prompts=num_prompts)
