"""Reads pretrained T5 weights into the T5X parameter tree of CONTRACT.md.

Two sources:
  * Hugging Face T5 directories (`config.json` + `model.safetensors` or a
    sharded `model.safetensors.index.json`), read with the safetensors numpy
    API (no torch) and renamed/transposed into T5X names;
  * native T5X checkpoints: the legacy format (a msgpack `checkpoint` file whose
    large leaves are tensorstore specs pointing at zarr directories beside it),
    which is what the public T5 1.1 / LM-adapted checkpoints use, and the newer
    orbax layout (`checkpoint_N/state/`, OCDBT or not).

`write_t5x_checkpoint` writes the legacy T5X format (tests use it to make
checkpoints; T5X itself can restore the result). A T5X checkpoint carries no
config, so `config_from_params` infers one from the array shapes.

All readers return nested dicts of numpy arrays, float32 unless asked
otherwise.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from prompt_transfer.model.config import T5Config

PathLike = Union[str, 'os.PathLike[str]']
Params = Dict[str, Any]
Shape = Tuple[int, ...]

# Version of the msgpack layout T5X has written since 2021 (bfloat16 stored
# natively in zarr; version 2 stored it as uint16).
T5X_CHECKPOINT_VERSION = 3
# T5X aims at 64 MiB zarr chunks.
_DESIRED_CHUNK_BYTES = 64 * 1024 * 1024
# Longest list an error message prints per category.
_MAX_LISTED = 20

HF_CONFIG = 'config.json'
HF_WEIGHTS = 'model.safetensors'
HF_INDEX = 'model.safetensors.index.json'

# feed_forward_proj -> mlp_activations. HF's 'gated-gelu' runs gelu_new (tanh
# approximation), which is what the network's 'gelu' computes; HF's plain
# 'gelu' is the exact erf GELU, which the network does not implement.
_HF_ACTIVATIONS = {
    'relu': ('relu',),
    'silu': ('silu',),
    'swish': ('silu',),
    'gelu_new': ('gelu',),
    'gated-relu': ('relu', 'linear'),
    'gated-gelu': ('gelu', 'linear'),
    'gated-gelu_new': ('gelu', 'linear'),
    'gated-silu': ('silu', 'linear'),
    'gated-swish': ('silu', 'linear'),
}

# Every parameter name of the CONTRACT tree (the prompt module's subtree is free).
_T5X_NAME_PATTERNS = tuple(re.compile(p) for p in (
    r'token_embedder/embedding',
    r'(encoder|decoder)/relpos_bias/rel_embedding',
    r'encoder/layers_\d+/(pre_attention_layer_norm|pre_mlp_layer_norm)/scale',
    r'encoder/layers_\d+/attention/(query|key|value|out)/kernel',
    r'(encoder|decoder)/layers_\d+/mlp/(wi|wi_\d+|wo)/kernel',
    r'encoder/encoder_norm/scale',
    r'encoder/prompt/.+',
    r'decoder/layers_\d+/(pre_self_attention_layer_norm|pre_cross_attention_layer_norm'
    r'|pre_mlp_layer_norm)/scale',
    r'decoder/layers_\d+/(self_attention|encoder_decoder_attention)/(query|key|value|out)/kernel',
    r'decoder/decoder_norm/scale',
    r'decoder/logits_dense/kernel',
))


# ----------------------------------------------------------------------------
# Errors and shape checks.


def _fmt_shape(shape: Optional[Sequence[int]]) -> str:
  return '?' if shape is None else str(tuple(int(s) for s in shape))


def _listing(title: str, lines: Sequence[str]) -> List[str]:
  if not lines:
    return []
  out = [f'  {title} ({len(lines)}):']
  out += [f'    {line}' for line in lines[:_MAX_LISTED]]
  if len(lines) > _MAX_LISTED:
    out.append(f'    ... and {len(lines) - _MAX_LISTED} more')
  return out


class CheckpointReadError(ValueError):
  """A checkpoint file that cannot be parsed (invalid JSON, a truncated or
  damaged safetensors file); the message names the file and what is wrong."""


def _read_json(file_name: str) -> Any:
  try:
    with open(file_name) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointReadError(f'{file_name} is not valid JSON ({e}).') from None


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters differ from what the model expects.

  Attributes:
    source: the file or directory the parameters came from.
    missing: [(name, expected shape or None)] expected but absent.
    unexpected: [(name, actual shape or None)] present but not expected.
    mismatched: [(name, expected shape, actual shape)].
  """

  def __init__(self, source: str,
               missing: Iterable[Tuple[str, Optional[Shape]]] = (),
               unexpected: Iterable[Tuple[str, Optional[Shape]]] = (),
               mismatched: Iterable[Tuple[str, Shape, Shape]] = (),
               hint: str = ''):
    self.source = str(source)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    counts = []
    if self.missing:
      counts.append(f'{len(self.missing)} missing')
    if self.unexpected:
      counts.append(f'{len(self.unexpected)} unexpected')
    if self.mismatched:
      counts.append(f'{len(self.mismatched)} with the wrong shape')
    lines = [f'{self.source}: parameters do not match the expected model '
             f'({", ".join(counts) or "no details"}).']
    lines += _listing('missing', [f'{n}  expected {_fmt_shape(s)}' for n, s in self.missing])
    lines += _listing('unexpected',
                      [f'{n}  {_fmt_shape(s)}' if s is not None else n
                       for n, s in self.unexpected])
    lines += _listing('wrong shape', [f'{n}  expected {_fmt_shape(e)}, got {_fmt_shape(a)}'
                                      for n, e, a in self.mismatched])
    if hint:
      lines.append(hint)
    super().__init__('\n'.join(lines))


def _unbox(x: Any) -> Any:
  # Flax's LogicallyPartitioned / Partitioned boxes (module.init with
  # nn.with_logical_partitioning) hold the array in `.value`.
  if hasattr(x, 'unbox') and callable(x.unbox) and not isinstance(x, np.ndarray):
    return x.unbox()
  return x


def _unwrap(tree: Any) -> Any:
  """Drops a lone top-level 'params' collection key."""
  if isinstance(tree, Mapping) and set(tree.keys()) == {'params'}:
    return tree['params']
  return tree


def flatten_params(tree: Any) -> Dict[str, Any]:
  """{'a/b/c': leaf} for a nested mapping; boxes are unboxed, empty dicts dropped."""
  out: Dict[str, Any] = {}

  def visit(node: Any, prefix: str) -> None:
    node = _unbox(node)
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(value, f'{prefix}/{key}' if prefix else str(key))
    else:
      out[prefix] = node

  visit(_unwrap(tree), '')
  return out


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten_params` (plain nested dicts)."""
  tree: Params = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _shape_of(leaf: Any) -> Shape:
  if hasattr(leaf, 'shape'):
    return tuple(int(s) for s in leaf.shape)
  if isinstance(leaf, (tuple, list)):  # a bare shape
    return tuple(int(s) for s in leaf)
  return tuple(np.shape(leaf))


def _name_order(name: str) -> Tuple[int, List[Any], str]:
  # Model-wide parameters (embedding, relpos, norms) first, then layers in
  # numeric order: the first lines of a long listing are the telling ones.
  layers = [int(i) for i in re.findall(r'layers_(\d+)', name)]
  return (1 if layers else 0, layers, name)


def _check_flat(actual: Mapping[str, Any], expected: Mapping[str, Any], source: str,
                labels: Optional[Mapping[str, str]] = None, hint: str = '') -> None:
  labels = labels or {}
  label = lambda n: f'{n} ({labels[n]})' if n in labels else n
  order = lambda names: sorted(names, key=_name_order)
  missing = [(n, _shape_of(expected[n])) for n in order(expected) if n not in actual]
  unexpected = [(label(n), _shape_of(actual[n])) for n in order(actual) if n not in expected]
  mismatched = []
  for n in order(set(actual) & set(expected)):
    e, a = _shape_of(expected[n]), _shape_of(actual[n])
    if e != a:
      mismatched.append((label(n), e, a))
  if missing or unexpected or mismatched:
    if not hint and (mismatched or (missing and unexpected)):
      hint = '  (a checkpoint of another model size or variant?)'
      try:  # Say what both sides look like when that can be inferred.
        found = config_from_params(unflatten_params(dict(actual))).describe()
        wanted = config_from_params(unflatten_params(dict(expected))).describe()
        diff = {k: (wanted[k], found[k]) for k in wanted if k != 'name' and wanted[k] != found[k]}
        hint += f'\n  expected vs found: {diff}'
      except (ValueError, KeyError, IndexError):
        pass
    raise CheckpointMismatchError(source, missing, unexpected, mismatched, hint)


def check_params(params: Any, expected: Any, source: str) -> None:
  """Raises CheckpointMismatchError unless `params` has exactly the expected shapes.

  Args:
    params: nested dict of arrays (e.g. from a reader below).
    expected: nested dict whose leaves have a `.shape` (arrays,
      jax.ShapeDtypeStruct from `jax.eval_shape`, flax boxes) or are shapes.
    source: the checkpoint path, quoted in the error.
  """
  _check_flat(flatten_params(params), flatten_params(expected), str(source))


def param_shapes(config: T5Config, prompt_length: int = 0) -> Params:
  """The CONTRACT parameter tree of `config`, with shape tuples as leaves."""
  e, h, d, m = config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim
  hd = h * d
  mlp_names = ['wi'] if len(config.mlp_activations) == 1 else [
      f'wi_{i}' for i in range(len(config.mlp_activations))]

  def attention() -> Params:
    return {'query': {'kernel': (e, hd)}, 'key': {'kernel': (e, hd)},
            'value': {'kernel': (e, hd)}, 'out': {'kernel': (hd, e)}}

  def mlp() -> Params:
    tree = {n: {'kernel': (e, m)} for n in mlp_names}
    tree['wo'] = {'kernel': (m, e)}
    return tree

  scale = lambda: {'scale': (e,)}
  relpos = lambda: {'rel_embedding': (h, config.relative_attention_num_buckets)}
  encoder: Params = {'relpos_bias': relpos(), 'encoder_norm': scale()}
  for i in range(config.num_encoder_layers):
    encoder[f'layers_{i}'] = {'pre_attention_layer_norm': scale(), 'attention': attention(),
                              'pre_mlp_layer_norm': scale(), 'mlp': mlp()}
  if prompt_length:
    encoder['prompt'] = {'prompt': {'prompt': (prompt_length, e)}}
  decoder: Params = {'relpos_bias': relpos(), 'decoder_norm': scale()}
  for i in range(config.num_decoder_layers):
    decoder[f'layers_{i}'] = {
        'pre_self_attention_layer_norm': scale(), 'self_attention': attention(),
        'pre_cross_attention_layer_norm': scale(), 'encoder_decoder_attention': attention(),
        'pre_mlp_layer_norm': scale(), 'mlp': mlp()}
  if not config.logits_via_embedding:
    decoder['logits_dense'] = {'kernel': (e, config.vocab_size)}
  return {'token_embedder': {'embedding': (config.vocab_size, e)},
          'encoder': encoder, 'decoder': decoder}


def _cast(arr: Any, dtype: Any) -> np.ndarray:
  arr = np.asarray(arr)
  # Integers, bools and strings stay; floats (bfloat16 is kind 'V') are cast.
  if dtype is None or arr.dtype.kind in 'iubSUO':
    return arr
  return arr.astype(dtype, copy=False)


# ----------------------------------------------------------------------------
# Config inference.


def _layer_indices(flat: Mapping[str, Any], stack: str, source: str) -> int:
  found = set()
  for name in flat:
    match = re.match(rf'{stack}/layers_(\d+)/', name)
    if match:
      found.add(int(match.group(1)))
  if found != set(range(len(found))):
    raise ValueError(f'{source}: {stack} layers are not numbered 0..n-1: {sorted(found)}')
  return len(found)


def config_from_params(params: Any, base: Optional[T5Config] = None) -> T5Config:
  """Infers the T5Config of a CONTRACT parameter tree from its array shapes.

  Inferred: vocab_size, emb_dim, num_heads and relative_attention_num_buckets
  (relpos_bias), head_dim (query width / heads), mlp_dim, layer counts, gating
  and tying. Everything else (relative_attention_max_distance, dropout,
  layer_norm_epsilon, dtypes, name, the gated activation) comes from `base`,
  or T5Config defaults.
  """
  flat = flatten_params(params)
  source = 'config_from_params'

  def shape(name: str) -> Shape:
    if name not in flat:
      raise CheckpointMismatchError(
          source, missing=[(name, None)],
          hint='  (cannot infer a T5 config: not a T5X T5 encoder-decoder parameter tree)')
    return _shape_of(flat[name])

  vocab, emb = shape('token_embedder/embedding')
  heads, buckets = shape('encoder/relpos_bias/rel_embedding')
  dec_heads, dec_buckets = shape('decoder/relpos_bias/rel_embedding')
  if (dec_heads, dec_buckets) != (heads, buckets):
    raise ValueError(f'{source}: encoder relpos_bias {(heads, buckets)} and decoder '
                     f'relpos_bias {(dec_heads, dec_buckets)} disagree.')
  joined = shape('encoder/layers_0/attention/query/kernel')[1]
  if joined % heads:
    raise ValueError(f'{source}: query width {joined} is not a multiple of {heads} heads.')
  wi = sorted({m.group(1) for n in flat
               for m in [re.fullmatch(r'encoder/layers_0/mlp/(wi(?:_\d+)?)/kernel', n)] if m})
  if not wi:
    shape('encoder/layers_0/mlp/wi/kernel')  # raises, naming the parameter
  mlp_dim = shape(f'encoder/layers_0/mlp/{wi[0]}/kernel')[1]
  base = base or T5Config()
  num_proj = 1 if wi == ['wi'] else len(wi)
  if len(base.mlp_activations) == num_proj:
    activations = tuple(base.mlp_activations)
  elif num_proj == 1:
    activations = ('relu',)
  elif num_proj == 2:
    activations = ('gelu', 'linear')
  else:
    raise ValueError(f'{source}: {num_proj} MLP input projections; pass a base config '
                     'with matching mlp_activations.')
  return base.replace(
      vocab_size=vocab,
      emb_dim=emb,
      num_heads=heads,
      head_dim=joined // heads,
      mlp_dim=mlp_dim,
      num_encoder_layers=_layer_indices(flat, 'encoder', source),
      num_decoder_layers=_layer_indices(flat, 'decoder', source),
      mlp_activations=activations,
      logits_via_embedding='decoder/logits_dense/kernel' not in flat,
      relative_attention_num_buckets=buckets,
  )


# ----------------------------------------------------------------------------
# Hugging Face.


def _hf_config(path: str) -> T5Config:
  config_file = os.path.join(path, HF_CONFIG)
  hf = _read_json(config_file)
  if not isinstance(hf, dict):
    raise CheckpointReadError(f'{config_file} holds a {type(hf).__name__}, not a JSON object.')

  def get(key: str, default: Any = KeyError) -> Any:
    if key in hf:
      return hf[key]
    if default is KeyError:
      raise ValueError(f'{config_file}: required field {key!r} is missing.')
    return default

  model_type = hf.get('model_type', 't5')
  if model_type not in ('t5', 'mt5'):
    raise NotImplementedError(
        f'{config_file}: model_type {model_type!r} is not supported (only T5 / mT5 '
        'encoder-decoders with one relative position bias per stack).')
  proj = get('feed_forward_proj', 'relu')
  if proj not in _HF_ACTIVATIONS:
    raise NotImplementedError(
        f'{config_file}: feed_forward_proj {proj!r} is not supported; supported: '
        f'{sorted(_HF_ACTIVATIONS)} (plain "gelu" is the exact erf GELU, which the '
        'network does not implement).')
  num_layers = int(get('num_layers'))
  return T5Config(
      vocab_size=int(get('vocab_size')),
      emb_dim=int(get('d_model')),
      num_heads=int(get('num_heads')),
      num_encoder_layers=num_layers,
      num_decoder_layers=int(get('num_decoder_layers', None) or num_layers),
      head_dim=int(get('d_kv')),
      mlp_dim=int(get('d_ff')),
      mlp_activations=_HF_ACTIVATIONS[proj],
      dropout_rate=float(get('dropout_rate', 0.1)),
      # Provisional: read_hf_checkpoint settles the head from the tensors too.
      logits_via_embedding=bool(get('tie_word_embeddings', True)) and bool(
          get('scale_decoder_outputs', True)),
      relative_attention_num_buckets=int(get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(get('relative_attention_max_distance', 128)),
      layer_norm_epsilon=float(get('layer_norm_epsilon', 1e-6)),
      name=os.path.basename(os.path.normpath(path)) or 't5',
  )


def hf_name_map(config: T5Config) -> Dict[str, Tuple[str, bool]]:
  """{HF tensor name: (T5X parameter name, transpose?)} for `config`."""
  names: Dict[str, Tuple[str, bool]] = {'shared.weight': ('token_embedder/embedding', False)}
  mlp = (['wi'] if len(config.mlp_activations) == 1 else
         [f'wi_{i}' for i in range(len(config.mlp_activations))]) + ['wo']
  qkvo = (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out'))

  def block(stack: str, i: int, sublayers: Sequence[Tuple[str, str, str]]) -> None:
    # sublayers: (HF module, T5X attention/mlp name, T5X pre-norm name) per layer.N.
    hf, t5x = f'{stack}.block.{i}.layer.', f'{stack}/layers_{i}/'
    for n, (hf_module, module, norm) in enumerate(sublayers):
      names[f'{hf}{n}.layer_norm.weight'] = (f'{t5x}{norm}/scale', False)
      if hf_module == 'DenseReluDense':
        for w in mlp:  # torch Linear [out, in] -> kernel [in, out]
          names[f'{hf}{n}.DenseReluDense.{w}.weight'] = (f'{t5x}mlp/{w}/kernel', True)
      else:
        for a, b in qkvo:
          names[f'{hf}{n}.{hf_module}.{a}.weight'] = (f'{t5x}{module}/{b}/kernel', True)

  for i in range(config.num_encoder_layers):
    block('encoder', i, [('SelfAttention', 'attention', 'pre_attention_layer_norm'),
                         ('DenseReluDense', 'mlp', 'pre_mlp_layer_norm')])
  for i in range(config.num_decoder_layers):
    block('decoder', i, [('SelfAttention', 'self_attention', 'pre_self_attention_layer_norm'),
                         ('EncDecAttention', 'encoder_decoder_attention',
                          'pre_cross_attention_layer_norm'),
                         ('DenseReluDense', 'mlp', 'pre_mlp_layer_norm')])
  for stack, norm in (('encoder', 'encoder_norm'), ('decoder', 'decoder_norm')):
    # [num_buckets, heads] -> [heads, num_buckets]
    names[f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'] = (
        f'{stack}/relpos_bias/rel_embedding', True)
    names[f'{stack}.final_layer_norm.weight'] = (f'{stack}/{norm}/scale', False)
  if not config.logits_via_embedding:
    names['lm_head.weight'] = ('decoder/logits_dense/kernel', True)
  return names


def _hf_weight_files(path: str) -> List[str]:
  index_file = os.path.join(path, HF_INDEX)
  if os.path.isfile(index_file):
    index = _read_json(index_file)
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{index_file}: no "weight_map" (tensor name -> shard file).')
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(path, name)):
        raise FileNotFoundError(f'{index_file} lists shard {name!r}, which is not in {path}.')
    return files
  if os.path.isfile(os.path.join(path, HF_WEIGHTS)):
    return [HF_WEIGHTS]
  others = [n for n in os.listdir(path) if n.endswith(('.bin', '.h5', '.msgpack', '.ckpt'))]
  raise FileNotFoundError(
      f'{path}: neither {HF_WEIGHTS} nor {HF_INDEX} found'
      + (f' (found {others}; convert them to safetensors, e.g. save_pretrained('
         'safe_serialization=True); torch weights are not read here)' if others else '.'))


@contextlib.contextmanager
def _open_safetensors(safe_open: Any, file_name: str) -> Iterator[Any]:
  """safe_open whose parse errors (a truncated or damaged file: safetensors
  raises its own SafetensorError, or OSError) name the file and its size."""
  try:
    with safe_open(file_name, framework='np') as f:
      yield f
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != 'SafetensorError' and not isinstance(e, OSError):
      raise
    size = os.path.getsize(file_name) if os.path.exists(file_name) else 0
    raise CheckpointReadError(
        f'{file_name} ({size:,} bytes) cannot be read as safetensors: {e}. '
        'Is it truncated? Download or copy it again.') from None


def read_hf_checkpoint(path: PathLike, dtype: Any = np.float32) -> Tuple[T5Config, Params]:
  """Reads a Hugging Face T5 directory into (T5Config, CONTRACT parameter tree).

  Args:
    path: directory with config.json and model.safetensors (or the sharded
      model.safetensors.index.json and its shards).
    dtype: dtype of the returned floating arrays (bf16/fp16 weights are upcast);
      None keeps the stored dtype.

  Raises:
    NotImplementedError: unsupported model_type or feed_forward_proj.
    CheckpointMismatchError: unknown, missing or wrongly shaped tensors (named
      with the file they are in).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: not a Hugging Face checkpoint directory.')
  config = _hf_config(path)
  hf_json = _read_json(os.path.join(path, HF_CONFIG))
  tied = bool(hf_json.get('tie_word_embeddings', True))
  # transformers >= 5 writes tie_word_embeddings=true for T5 1.1 too and says
  # with scale_decoder_outputs whether the head rescales by d_model**-0.5.
  scaled = bool(hf_json.get('scale_decoder_outputs', tied))
  names = hf_name_map(config.replace(logits_via_embedding=True))
  # Duplicates of shared.weight that some exports keep; lm_head is settled below.
  aliases = {'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'lm_head.weight'}

  flat: Dict[str, np.ndarray] = {}
  labels: Dict[str, str] = {}
  spare: Dict[str, Tuple[np.ndarray, str]] = {}
  unexpected: List[Tuple[str, Optional[Shape]]] = []
  seen: Dict[str, str] = {}
  for file_name in _hf_weight_files(path):
    with _open_safetensors(safe_open, os.path.join(path, file_name)) as f:
      for hf_name in f.keys():
        if hf_name in seen:
          raise ValueError(f'{path}: tensor {hf_name!r} is in both {seen[hf_name]} '
                           f'and {file_name}.')
        seen[hf_name] = file_name
        if hf_name in aliases:
          spare[hf_name] = (f.get_tensor(hf_name), file_name)
          continue
        if hf_name not in names:
          unexpected.append((f'{file_name}: {hf_name}', tuple(f.get_slice(hf_name).get_shape())))
          continue
        t5x_name, transpose = names[hf_name]
        arr = _cast(f.get_tensor(hf_name), dtype)
        flat[t5x_name] = np.ascontiguousarray(arr.T) if transpose else arr
        labels[t5x_name] = f'{file_name}: {hf_name}'

  if 'token_embedder/embedding' not in flat:
    # Some exports drop shared.weight and keep an embed_tokens copy.
    for hf_name in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'):
      if hf_name in spare:
        arr, file_name = spare[hf_name]
        flat['token_embedder/embedding'] = _cast(arr, dtype)
        labels['token_embedder/embedding'] = f'{file_name}: {hf_name}'
        break
  # The output layer: T5 1.0 attends to the embedding scaled by d_model**-0.5
  # (logits_via_embedding); T5 1.1 has its own lm_head, and an unscaled tied
  # head is the embedding copied into logits_dense.
  head = spare.get('lm_head.weight')
  emb = flat.get('token_embedder/embedding')
  if head is not None and (not tied or emb is None or head[0].shape != emb.shape or
                           not np.array_equal(_cast(head[0], dtype), emb)):
    config = config.replace(logits_via_embedding=False)
    flat['decoder/logits_dense/kernel'] = np.ascontiguousarray(_cast(head[0], dtype).T)
    labels['decoder/logits_dense/kernel'] = f'{head[1]}: lm_head.weight'
  elif tied and not scaled and emb is not None:
    config = config.replace(logits_via_embedding=False)
    flat['decoder/logits_dense/kernel'] = np.ascontiguousarray(emb.T)
    labels['decoder/logits_dense/kernel'] = 'shared.weight (unscaled tied head)'
  elif not tied:
    names = hf_name_map(config.replace(logits_via_embedding=False))
  else:
    config = config.replace(logits_via_embedding=True)
  files = ', '.join(sorted(set(seen.values()))) or HF_WEIGHTS
  t5x_to_hf = {t: h for h, (t, _) in names.items()}
  missing = [(f'{t5x_to_hf[n]} (-> {n})', None) for n in sorted(t5x_to_hf) if n not in flat]
  if missing or unexpected:
    raise CheckpointMismatchError(
        f'{path} [{files}]', missing, unexpected,
        hint=f'  (tensor names expected for the model described by {HF_CONFIG}: '
             f'{config.describe()})')
  _check_flat(flat, flatten_params(param_shapes(config)), f'{path} [{files}]', labels,
              hint=f'  ({HF_CONFIG} describes {config.describe()})')
  return config, unflatten_params(flat)


def is_hf_checkpoint(path: PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, HF_CONFIG)) and (
      os.path.isfile(os.path.join(path, HF_WEIGHTS)) or
      os.path.isfile(os.path.join(path, HF_INDEX)))


# ----------------------------------------------------------------------------
# T5X: locating the checkpoint.

_ORBAX_MARKERS = ('_METADATA', 'manifest.ocdbt', '_CHECKPOINT_METADATA', '_sharding')


def _looks_orbax(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, m)) for m in _ORBAX_MARKERS)


def _resolve_in_dir(directory: str) -> Optional[Tuple[str, str]]:
  msgpack_file = os.path.join(directory, 'checkpoint')
  if os.path.isfile(msgpack_file) and not _looks_orbax(directory):
    return 'msgpack', msgpack_file
  state = os.path.join(directory, 'state')  # T5X's orbax CheckpointManager item
  if os.path.isdir(state) and _looks_orbax(state):
    return 'orbax', state
  if _looks_orbax(directory):
    return 'orbax', directory
  return None


def _steps(directory: str) -> List[Tuple[int, str]]:
  steps = []
  for name in os.listdir(directory):
    match = re.fullmatch(r'checkpoint_(\d+)', name)  # skips checkpoint_N.tmp-<time>
    if match and os.path.isdir(os.path.join(directory, name)):
      steps.append((int(match.group(1)), os.path.join(directory, name)))
  return sorted(steps, reverse=True)


def resolve_t5x_checkpoint(path: PathLike) -> Tuple[str, str]:
  """('msgpack', checkpoint file) or ('orbax', item dir) for a T5X path.

  `path` may be the msgpack `checkpoint` file, a `checkpoint_N` directory, or
  the model directory holding `checkpoint_N` subdirectories (the highest N
  that holds a checkpoint is taken).
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return 'msgpack', path
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such T5X checkpoint file or directory.')
  found = _resolve_in_dir(path)
  if found:
    return found
  for _, step_dir in _steps(path):
    found = _resolve_in_dir(step_dir)
    if found:
      return found
  raise FileNotFoundError(
      f'{path}: not a T5X checkpoint (looked for a msgpack `checkpoint` file, an orbax '
      'checkpoint (_METADATA / manifest.ocdbt, possibly under state/), and '
      'checkpoint_N subdirectories holding one).')


# ----------------------------------------------------------------------------
# T5X: reading.


def _is_ts_spec(x: Any) -> bool:
  return isinstance(x, Mapping) and 'driver' in x and ('kvstore' in x or 'path' in x)


def _flatten_with_specs(tree: Any) -> Dict[str, Any]:
  out: Dict[str, Any] = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping) and not _is_ts_spec(node):
      for key, value in node.items():
        visit(value, f'{prefix}/{key}' if prefix else str(key))
    else:
      out[prefix] = node

  visit(tree, '')
  return out


def _absolute_spec(spec: Mapping[str, Any], ckpt_dir: str, where: str) -> Dict[str, Any]:
  spec = copy.deepcopy(dict(spec))
  kvstore = spec.pop('kvstore', None)
  if kvstore is None:  # tensorstore<0.1.14 layout: path at the top level
    kvstore = {'driver': 'file', 'path': spec.pop('path')}
  if not isinstance(kvstore, Mapping) or 'path' not in kvstore:
    raise ValueError(f'{where}: unsupported tensorstore kvstore {kvstore!r}.')
  if kvstore.get('driver') not in ('file', 'gfile', 'gcs'):
    raise ValueError(f'{where}: unsupported tensorstore kvstore driver '
                     f'{kvstore.get("driver")!r}.')
  # T5X writes paths relative to the checkpoint directory (gcs ones too, with a
  # dummy bucket), so the files are read from beside the msgpack file.
  opened = {'driver': spec.get('driver', 'zarr'),
            'kvstore': {'driver': 'file', 'path': os.path.join(ckpt_dir, kvstore['path'])}}
  return opened


def _read_msgpack_checkpoint(ckpt_file: str) -> Dict[str, Any]:
  """{name: np.ndarray} of `optimizer/target` in a legacy T5X checkpoint."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  with open(ckpt_file, 'rb') as f:
    raw = f.read()
  if raw.startswith(b'model_checkpoint_path'):
    raise ValueError(f'{ckpt_file}: a TensorFlow (Mesh TF) checkpoint index, not a T5X '
                     'checkpoint; convert it with T5X first.')
  try:
    contents = serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several types
    raise ValueError(f'{ckpt_file}: not a T5X msgpack checkpoint ({e}).') from e
  if not isinstance(contents, Mapping) or 'target' not in contents.get('optimizer', {}):
    keys = list(contents) if isinstance(contents, Mapping) else type(contents).__name__
    raise ValueError(f'{ckpt_file}: no optimizer/target in this msgpack file (top level: '
                     f'{keys}); not a T5X checkpoint.')
  version = int(contents.get('version', 0))
  if version > T5X_CHECKPOINT_VERSION:
    raise ValueError(f'{ckpt_file}: T5X checkpoint version {version} is newer than the '
                     f'supported {T5X_CHECKPOINT_VERSION}.')
  ckpt_dir = os.path.dirname(os.path.abspath(ckpt_file))
  flat = _flatten_with_specs(contents['optimizer']['target'])

  context = ts.Context({'file_io_concurrency': {'limit': 64}})
  pending = {}
  for name, leaf in flat.items():
    if _is_ts_spec(leaf):
      where = f'{ckpt_file}: {name}'
      spec = _absolute_spec(leaf, ckpt_dir, where)
      pending[name] = (spec, ts.open(spec, open=True, read=True, context=context))
  reads = {}
  for name, (spec, future) in pending.items():
    try:
      reads[name] = future.result().read()
    except Exception as e:  # tensorstore raises ValueError/OSError variants
      raise FileNotFoundError(f'{ckpt_file}: cannot open {name} at '
                              f'{spec["kvstore"]["path"]}: {e}') from e
  out: Dict[str, Any] = {}
  for name, leaf in flat.items():
    if name in reads:
      arr = np.asarray(reads[name].result())
      meta_shape = leaf.get('metadata', {}).get('shape')
      if meta_shape is not None and tuple(meta_shape) != arr.shape:
        raise ValueError(f'{ckpt_file}: {name} has shape {arr.shape} on disk but '
                         f'{tuple(meta_shape)} in its spec.')
      if version < 3 and arr.dtype == np.uint16:
        # Version 2 stored bfloat16 bit patterns as uint16.
        import ml_dtypes  # pylint: disable=g-import-not-at-top
        arr = arr.view(ml_dtypes.bfloat16)
      out[name] = arr
    else:
      out[name] = leaf
  return out


def _read_orbax_checkpoint(directory: str) -> Dict[str, Any]:
  """{name: np.ndarray} of the model parameters in an orbax (T5X) checkpoint."""
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{directory} is an orbax checkpoint; install orbax-checkpoint '
                      'to read it.') from e
  restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(directory))
  for keys in (('target',), ('optimizer', 'target'), ('params',)):
    node = restored
    for key in keys:
      node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
      return {n: np.asarray(v) for n, v in flatten_params(node).items()}
  raise ValueError(f'{directory}: orbax checkpoint without target / optimizer/target / '
                   f'params (top level: {list(restored)}).')


def _check_t5x_names(flat: Mapping[str, Any], source: str) -> None:
  unknown = [(n, _shape_of(v)) for n, v in sorted(flat.items())
             if not any(p.fullmatch(n) for p in _T5X_NAME_PATTERNS)]
  if unknown:
    raise CheckpointMismatchError(
        source, unexpected=unknown,
        hint='  (not the T5X T5 encoder-decoder tree of CONTRACT.md: scanned layers, '
             'another architecture? pass strict=False to read it anyway)')


def read_t5x_checkpoint(path: PathLike, dtype: Any = np.float32, strict: bool = True) -> Params:
  """Reads the model parameters (optimizer/target) of a native T5X checkpoint.

  Args:
    path: the msgpack `checkpoint` file, a `checkpoint_N` directory, or the
      model directory holding `checkpoint_N` subdirectories (latest taken);
      orbax-format T5X checkpoints (`checkpoint_N/state`, OCDBT or not) too.
    dtype: dtype of the returned floating arrays; None keeps the stored one.
    strict: reject names outside the CONTRACT tree (e.g. scanned layers).

  Returns:
    Nested dict of numpy arrays; optimizer slots and the step are dropped.
  """
  kind, location = resolve_t5x_checkpoint(path)
  if kind == 'msgpack':
    flat = _read_msgpack_checkpoint(location)
  else:
    flat = _read_orbax_checkpoint(location)
  if strict:
    _check_t5x_names(flat, location)
  return unflatten_params({n: _cast(v, dtype) for n, v in flat.items()})


def read_checkpoint(path: PathLike, base: Optional[T5Config] = None,
                    dtype: Any = np.float32) -> Tuple[T5Config, Params]:
  """(config, params) of a Hugging Face directory or a T5X checkpoint.

  A T5X checkpoint has no config: it is inferred with `config_from_params`,
  taking the non-inferable fields (relative_attention_max_distance, dropout...)
  from `base`.
  """
  if os.path.isdir(os.fspath(path)) and is_hf_checkpoint(path):
    return read_hf_checkpoint(path, dtype=dtype)
  params = read_t5x_checkpoint(path, dtype=dtype)
  return config_from_params(params, base), params


# ----------------------------------------------------------------------------
# T5X: writing.


def _choose_chunk_shape(shape: Sequence[int], target_elements: int) -> List[int]:
  """Largest chunk dividing `shape` with at most `target_elements` elements.

  Same rule as T5X: repeatedly shrink the currently largest chunk dimension to
  its next smaller divisor.
  """
  divisors = [[k for k in range(1, n + 1) if n % k == 0] or [1] for n in shape]
  while int(np.prod([d[-1] for d in divisors])) > target_elements:
    largest = max(range(len(shape)), key=lambda i: divisors[i][-1])
    if divisors[largest][-1] == 1:
      break
    divisors[largest].pop()
  return [d[-1] for d in divisors]


def _in_tensorstore(name: str, arr: np.ndarray) -> bool:
  # T5X stores partitioned arrays (kernels, the token embedding) in zarr and
  # replicated ones (layer-norm scales, relative position biases, prompts)
  # inline in the msgpack file, as in the real T5X-written checkpoints.
  return arr.ndim >= 2 and name.rsplit('/', 1)[-1] in ('kernel', 'embedding')


def _zarr_dtype(dtype: np.dtype) -> str:
  return 'bfloat16' if dtype.name == 'bfloat16' else dtype.str


def write_t5x_checkpoint(path: PathLike, params: Any, step: int,
                         dtype: Any = np.float32) -> str:
  """Writes `params` as a legacy-format T5X checkpoint directory `path`.

  Layout (as T5X's Checkpointer.save): `path/checkpoint` is a flax-msgpack
  file {'version': 3, 'optimizer': {'target': tree, 'state': {'step': int32}}}
  whose kernel / embedding leaves are tensorstore specs {'driver': 'zarr',
  'kvstore': {'driver': 'file', 'path': 'target.a.b.kernel'}, 'metadata':
  {chunks, compressor gzip, dtype, shape}} pointing at gzip zarr directories
  beside it; other leaves are inline arrays. Written to `path.tmp-<time>`,
  then renamed. No optimizer slots (param_states) are written.

  Args:
    path: the checkpoint directory to create, e.g. `model_dir/checkpoint_100`.
    params: CONTRACT parameter tree (arrays or flax boxes).
    step: the training step stored in optimizer/state/step.
    dtype: save dtype of floating arrays (T5X's default float32); None keeps.

  Returns:
    The checkpoint directory.
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  final_dir = os.path.abspath(os.fspath(path))
  if os.path.exists(final_dir):
    raise FileExistsError(f'{final_dir} already exists; T5X never overwrites a checkpoint.')
  tmp_dir = f'{final_dir}.tmp-{int(time.time())}'
  os.makedirs(tmp_dir)
  try:
    context = ts.Context({'file_io_concurrency': {'limit': 64}})
    target: Dict[str, Any] = {}
    writes = []
    for name, leaf in flatten_params(params).items():
      arr = _cast(np.asarray(leaf), dtype)
      if not _in_tensorstore(name, arr):
        target[name] = arr
        continue
      zarr_name = 'target.' + name.replace('/', '.')
      chunks = _choose_chunk_shape(arr.shape, max(1, _DESIRED_CHUNK_BYTES // arr.dtype.itemsize))
      metadata = {'chunks': chunks, 'compressor': {'id': 'gzip', 'level': 1},
                  'dtype': _zarr_dtype(arr.dtype), 'shape': list(arr.shape)}
      spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': zarr_name},
              'metadata': metadata}
      store = ts.open({'driver': 'zarr', 'metadata': metadata,
                       'kvstore': {'driver': 'file', 'path': os.path.join(tmp_dir, zarr_name)}},
                      create=True, open=False, context=context).result()
      writes.append(store.write(arr))
      target[name] = spec
    for future in writes:
      future.result()
    contents = {'version': T5X_CHECKPOINT_VERSION,
                'optimizer': {'target': unflatten_params(target),
                              'state': {'step': np.asarray(step, np.int32)}}}
    with open(os.path.join(tmp_dir, 'checkpoint'), 'wb') as f:
      f.write(serialization.msgpack_serialize(contents))
    os.rename(tmp_dir, final_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return final_dir
