#!/usr/bin/env python
"""Prompt tuning speed and memory: this project vs Hugging Face PEFT, paired, on CPU.

Run by hand (not part of the test suite):

    python bench/peft_compare.py                       # tiny and small, 3 pairs each
    python bench/peft_compare.py --configs tiny --pairs 1 --steps 3   # smoke run
    python bench/peft_compare.py --out bench_results.json

Both sides get the SAME frozen model and the SAME initial prompt: the parent
process initialises a random T5 with our code (seeded), exports it as a Hugging
Face directory (prompt_transfer.model.export) and saves the prompt as .npy; each side
loads that directory with its own loader (ours: checkpoint_import.read_hf_checkpoint,
as the trainer does; theirs: T5ForConditionalGeneration.from_pretrained).

  ours:   prompt_transfer.model.models.build_model + a jitted prompt-only train step
          written like trainer.train's (value_and_grad w.r.t. the prompt subtree
          only, frozen weights passed as a constant argument, optax.adafactor
          lr 0.3 / decay 0.8 / no parameter scaling / weight decay 1e-5 /
          clipping 1.0, state donated, dropout on, z-loss 1e-4).
  theirs: T5ForConditionalGeneration + peft PromptTuningConfig(SEQ_2_SEQ_LM,
          num_virtual_tokens=L, num_transformer_submodules=1 so both train
          exactly L x d_model numbers; PEFT's seq2seq default of 2 would add L
          rows that PROMPT_TUNING never reads), transformers' Adafactor with the
          same settings (lr 0.3, relative_step/scale_parameter/warmup_init off,
          decay_rate -0.8, clip_threshold 1.0, weight_decay 1e-5; --torch-optim
          adamw for AdamW), model.train() (dropout on), torch threads = cores.

Each measurement is a fresh subprocess, alternating ours, theirs, ours, theirs,
... so peak RSS (the child's own VmHWM) covers exactly one framework
and slow drifts in machine load hit both sides alike. Per run: the first train
step (compile for ours, allocator warm-up for theirs) and the warm-up steps are
timed separately; then `--steps` steps give examples/s. Greedy decoding of
`--decode-tokens` new tokens: ours `model.predict_batch` (KV cache,
lax.while_loop), theirs PEFT `generate(do_sample=False, num_beams=1)`; both
with the frozen model + the shared initial prompt, so they must emit the same
tokens (the agreement is reported). Generated tokens are counted up to and
including EOS, identically on both sides.

Ratios are ours/theirs per pair, then the median over pairs (for memory,
lower is better; for throughput, higher is better).

--tuned adds a third side to every pair, `ours_tuned`: the same step with the
trainer's speed/memory options on: `model_config.remat=True` (remat_policy
'dots': keep the weight projections, recompute the rest) with the CPU scheduler
flag `t5x` sets for remat (perf.use_remat_friendly_cpu_scheduler), and
`train.rng_impl='rbg'` dropout keys. Its ratios are reported as `ratios_tuned`
(vs theirs) and `ratios_tuned_vs_ours`. Both of our sides load like the
trainer (only the prompt initialised in a jit, frozen weights moved to the
device one at a time, malloc_trim after loading and after the compiling step).

--dtype bfloat16 runs both sides with bfloat16 activations: ours
`model_config.dtype='bfloat16'` (bf16 x bf16 -> float32 matmuls forward and
backward, frozen kernels and embeddings stored in bf16, prompt and optimizer
state float32), theirs the model loaded with `dtype=torch.bfloat16` and the
PEFT prompt embedding kept in float32 (PEFT casts it to the input embeddings'
dtype in the forward pass). Decoded tokens may then differ between the sides.

--compile-cache measures our sides as `t5x` runs them after the first time:
with JAX's persistent compilation cache (`--compilation_cache_dir`, on by
default) already filled by one untimed run, so the first step and the first
decode load compiled programs instead of compiling (time and compiler memory).

Per config one more fresh process measures the matmul rate of both frameworks
on the step's main shape ([batch x (prompt + inputs), d_model] x [d_model,
d_ff], run's dtype): `matmul_ceiling` gives each side's achieved GFLOP/s as a
fraction of its framework's rate and the best train ratio ours could reach
with every FLOP at XLA's rate against theirs as measured.

Timings on a shared machine are noisy: the load average before and after each
run is recorded with it, and every number is a median over pairs.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# get_config(variant, size, **overrides) of each benchmark configuration.
CONFIGS = {
    # The quick-start model (gin/models/t5_1_1_tiny.gin): byte vocabulary.
    'tiny': dict(variant='t5_1_1', size='tiny', vocab_size=384),
    # T5 1.1 small: d_model 512, 8+8 layers, 6 heads of 64, d_ff 1024, vocab 32128.
    'small': dict(variant='t5_1_1', size='small'),
}
# Timed train steps per run unless --steps is given (tiny steps take ~0.1 s).
DEFAULT_STEPS = {'tiny': 50, 'small': 10}
PROMPT_PARAMS = 'encoder/prompt/.*'
EOS, PAD = 1, 0


# ---------------------------------------------------------------------------
# Machine and versions.
# ---------------------------------------------------------------------------
def machine_info() -> Dict[str, Any]:
  model = platform.processor() or '?'
  flags: List[str] = []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
        elif line.startswith('flags'):
          # The matmul ISAs that decide float32 vs bfloat16 speed (AMX: bf16 GEMMs ~5x).
          flags = sorted(x for x in line.split(':', 1)[1].split()
                         if x.startswith(('avx512f', 'avx512_bf16', 'amx', 'avx2')))
          break
  except OSError:
    pass
  mem = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal'):
          mem = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {'cpu_model': model, 'cpu_flags': flags, 'cpu_count': os.cpu_count(), 'usable_cores': usable,
          'memory_bytes': mem, 'platform': platform.platform(),
          'python': platform.python_version()}


def versions() -> Dict[str, Optional[str]]:
  out = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'transformers', 'peft',
               'accelerate', 'safetensors'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _proc_status() -> Dict[str, int]:
  """Current and peak resident set size of this process, in bytes."""
  out = {}
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(('VmRSS', 'VmHWM')):
          key, val = line.split(':', 1)
          out[key] = int(val.split()[0]) * 1024
  except OSError:
    pass
  return {'rss': out.get('VmRSS'), 'hwm': out.get('VmHWM')}


def _generated_lengths(tokens) -> List[int]:
  """Tokens per row up to and including the first EOS (all if none)."""
  lengths = []
  for row in tokens.tolist():
    n = len(row)
    for i, t in enumerate(row):
      if t == EOS:
        n = i + 1
        break
    lengths.append(n)
  return lengths


# ---------------------------------------------------------------------------
# Shared inputs: frozen model, prompt, batches.
# ---------------------------------------------------------------------------
def prepare(name: str, args: argparse.Namespace, directory: str) -> Dict[str, Any]:
  """Writes the HF export, prompt.npy and data.npz for config `name`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.config import get_config  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.export import export_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top

  config = get_config(**CONFIGS[name])
  params = build_model(config).init_params(jax.random.PRNGKey(args.seed))
  hf_dir = export_hf_checkpoint(params, config, os.path.join(directory, 'hf'), overwrite=True)
  n_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  del params
  rs = np.random.RandomState(args.seed)
  prompt = rs.uniform(-0.5, 0.5, (args.prompt_length, config.emb_dim)).astype(np.float32)
  np.save(os.path.join(directory, 'prompt.npy'), prompt)

  # A few distinct batches, cycled: padded inputs of varying length, targets
  # ending in EOS. Token ids avoid 0 (pad) and 1 (EOS) inside sequences.
  b, s, t, n = args.batch, args.input_len, args.target_len, args.num_batches
  enc = np.zeros((n, b, s), np.int32)
  tgt = np.zeros((n, b, t), np.int32)
  for i in range(n):
    for j in range(b):
      ls = rs.randint(max(1, s // 2), s + 1)
      enc[i, j, :ls] = rs.randint(2, config.vocab_size, ls)
      lt = rs.randint(max(1, t // 2), t + 1)
      tgt[i, j, :lt - 1] = rs.randint(2, config.vocab_size, lt - 1)
      tgt[i, j, lt - 1] = EOS
  dec_in = np.zeros_like(tgt)
  dec_in[:, :, 1:] = tgt[:, :, :-1]
  np.savez(os.path.join(directory, 'data.npz'), encoder_input_tokens=enc,
           decoder_input_tokens=dec_in, decoder_target_tokens=tgt)
  flops = None
  if not args.no_flops:
    flops = our_step_flops(hf_dir, prompt, args)
  return {'config': config.describe(), 'num_params': n_params, 'hf_dir': hf_dir,
          'train_step_flops': flops}


def our_step_flops(hf_dir: str, prompt, args) -> Optional[float]:
  """XLA's FLOP count of our train step (compiled here, outside the paired runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import perf  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.step import compile_train_step  # pylint: disable=g-import-not-at-top
  setup = _our_setup(hf_dir, prompt, dtype=args.dtype)
  step, state, frozen = compile_train_step(setup), setup.state, setup.frozen
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  batch = {'encoder_input_tokens': shape(args.batch, args.input_len),
           'decoder_input_tokens': shape(args.batch, args.target_len),
           'decoder_target_tokens': shape(args.batch, args.target_len)}
  return perf.step_flops(step, state, frozen, batch, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------
# Ours.
# ---------------------------------------------------------------------------
def _train_timings(first_step_s: float, warmup_s: float, steps: int, train_s: float,
                   batch_size: int, losses: List[float]) -> Dict[str, Any]:
  """The training fields both sides report, computed one way."""
  return {'first_step_s': first_step_s, 'warmup_steps_s': warmup_s, 'train_steps': steps,
          'train_s': train_s, 'train_examples_per_s': steps * batch_size / train_s,
          'loss_first': losses[0], 'loss_last': losses[-1]}


def _decode_fields(first_decode_s: float, times: List[float], tokens: Any) -> Dict[str, Any]:
  """The decoding fields both sides report, computed one way (tokens: zeros after EOS)."""
  n_tokens = sum(_generated_lengths(tokens))
  return {'first_decode_s': first_decode_s, 'decode_s': statistics.median(times),
          'decode_tokens': n_tokens, 'decode_tokens_per_s': n_tokens / statistics.median(times),
          'tokens': tokens.tolist()}


def _our_setup(hf_dir: str, prompt, tuned: bool = False, dtype: str = 'float32'):
  """Loads as trainer.train does, with its own set-up (training.state.set_up):
  prompt initialised against the loaded weights, frozen weights moved to the
  device one array at a time, on a one-device mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.checkpoint_import import read_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.free import free_prompt  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.initializers import from_array  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import partitioning  # pylint: disable=g-import-not-at-top
  # Importing the set-up loads no TF, seqio or orbax.
  from prompt_transfer.training.state import prompt_tuning_optimizer, set_up  # pylint: disable=g-import-not-at-top
  config, host_params = read_hf_checkpoint(hf_dir)
  # --dtype bfloat16: `--gin.model_config.dtype="bfloat16"` (weights stay float32;
  # the frozen kernels and embeddings are stored in bf16, as the trainer does).
  config = config.replace(dtype=dtype)
  if tuned:
    config = config.replace(remat=True)  # remat_policy 'dots' (the default)
  model = build_model(config, free_prompt(prompt.shape[0], from_array(prompt)))
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  # trainer.train's default optimizer (runs/prompt_tune.gin).
  return set_up(model, host_params, prompt_tuning_optimizer(0.3), mesh, jax.random.PRNGKey(0),
                PROMPT_PARAMS)


def run_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
  """Our side; spec['tuned'] turns on the trainer's speed/memory options."""
  tuned = bool(spec.get('tuned'))
  if tuned:  # what `t5x train --gin.model_config.remat=True` does before JAX starts
    from prompt_transfer.training import perf as perf_lib  # pylint: disable=g-import-not-at-top
    perf_lib.use_remat_friendly_cpu_scheduler()
  phases = {'start': _proc_status()}
  t_import = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import partitioning, perf  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.state import merge_params  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.step import compile_train_step, dropout_key  # pylint: disable=g-import-not-at-top
  t_import = time.perf_counter() - t_import
  phases['after_import'] = _proc_status()
  if spec.get('compilation_cache'):  # what `t5x --compilation_cache_dir` does
    perf.use_compilation_cache(spec['compilation_cache'])

  t_load = time.perf_counter()
  prompt = np.load(spec['prompt'])
  setup = _our_setup(spec['hf_dir'], prompt, tuned=tuned, dtype=spec.get('dtype', 'float32'))
  model, frozen = setup.model, setup.frozen
  jax.block_until_ready((setup.state, frozen))
  t_load = time.perf_counter() - t_load
  phases['after_load'] = _proc_status()

  with np.load(spec['data']) as f:
    data = {k: f[k] for k in f.files}
  n = data['encoder_input_tokens'].shape[0]
  batches = [partitioning.global_batch({k: v[i] for k, v in data.items()}, setup.mesh)
             for i in range(n)]
  batch_size = batches[0]['encoder_input_tokens'].shape[0]
  out: Dict[str, Any] = {}

  if spec['steps'] > 0:
    step_fn = compile_train_step(setup)  # the trainer's jitted step (state donated)
    state, setup.state = setup.state, None
    # tuned: train.rng_impl='rbg', dropout bits from XLA's RngBitGenerator
    # (T5X's use_hardware_rng) instead of threefry.
    rng = dropout_key(spec['seed'], 'rbg' if tuned else 'threefry')
    losses = []
    t0 = time.perf_counter()
    state, metrics = step_fn(state, frozen, batches[0], jax.random.fold_in(rng, 0))
    losses.append(float(metrics['loss']))
    first_step_s = time.perf_counter() - t0
    phases['after_first_step'] = _proc_status()
    partitioning.release_host_memory()  # as the trainer does after the first step
    t0 = time.perf_counter()
    for i in range(1, 1 + spec['warmup_steps']):
      state, metrics = step_fn(state, frozen, batches[i % n], jax.random.fold_in(rng, i))
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - t0
    start = 1 + spec['warmup_steps']
    with perf.CompileCounter() as compiles:
      t0 = time.perf_counter()
      for i in range(start, start + spec['steps']):
        state, metrics = step_fn(state, frozen, batches[i % n], jax.random.fold_in(rng, i))
      losses.append(float(metrics['loss']))  # blocks on the last step
      train_s = time.perf_counter() - t0
    phases['after_train'] = _proc_status()
    out.update({
        **_train_timings(first_step_s, warmup_s, spec['steps'], train_s, batch_size, losses),
        'recompilations_during_timed_steps': compiles.count,
    })
    del state

  if spec['decode_tokens'] > 0:
    initial = {'encoder': {'prompt': {'prompt': {'prompt': jnp.asarray(prompt)}}}}
    params = merge_params(initial, frozen)
    dec = {'encoder_input_tokens': batches[0]['encoder_input_tokens'],
           'decoder_input_tokens': np.zeros((batch_size, spec['decode_tokens']), np.int32)}
    t0 = time.perf_counter()
    tokens = np.asarray(model.predict_batch(params, dec))
    first_decode_s = time.perf_counter() - t0
    times = []
    for _ in range(spec['decode_reps']):
      t0 = time.perf_counter()
      tokens = np.asarray(model.predict_batch(params, dec))
      times.append(time.perf_counter() - t0)
    out.update(_decode_fields(first_decode_s, times, tokens))
  phases['end'] = _proc_status()
  out.update({'import_s': t_import, 'load_s': t_load, 'rss_phases': phases,
              'device': str(jax.devices()[0].device_kind), 'tuned': tuned})
  return out


# ---------------------------------------------------------------------------
# Theirs: transformers + PEFT.
# ---------------------------------------------------------------------------
def run_theirs(spec: Dict[str, Any]) -> Dict[str, Any]:
  phases = {'start': _proc_status()}
  t_import = time.perf_counter()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  from transformers import T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
  from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
  t_import = time.perf_counter() - t_import
  phases['after_import'] = _proc_status()
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['seed'])

  t_load = time.perf_counter()
  prompt = np.load(spec['prompt'])
  # --dtype bfloat16: the model loaded in bf16 (transformers' way; its T5 may
  # keep some modules in float32), the trainable prompt in float32 (PEFT casts
  # it to the input embeddings' dtype in the forward pass).
  dtype = getattr(torch, spec.get('dtype', 'float32'))
  base = T5ForConditionalGeneration.from_pretrained(spec['hf_dir'], dtype=dtype)
  peft_config = peft.PromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt.shape[0],
      num_transformer_submodules=1, prompt_tuning_init=peft.PromptTuningInit.RANDOM)
  model = peft.get_peft_model(base, peft_config)
  embedding = model.prompt_encoder['default'].embedding
  embedding.float()
  with torch.no_grad():
    embedding.weight.copy_(torch.from_numpy(prompt))
  trainable = [p for p in model.parameters() if p.requires_grad]
  t_load = time.perf_counter() - t_load
  phases['after_load'] = _proc_status()

  with np.load(spec['data']) as f:
    data = {k: torch.from_numpy(f[k].astype(np.int64)) for k in f.files}
  n = data['encoder_input_tokens'].shape[0]
  batch_size = data['encoder_input_tokens'].shape[1]
  batches = []
  for i in range(n):
    enc, tgt = data['encoder_input_tokens'][i], data['decoder_target_tokens'][i]
    # HF shifts labels right itself; -100 marks padding (ignored by the loss).
    batches.append({'input_ids': enc, 'attention_mask': (enc > 0).long(),
                    'labels': torch.where(tgt > 0, tgt, torch.full_like(tgt, -100))})
  out: Dict[str, Any] = {
      'trainable_params': int(sum(p.numel() for p in trainable)),
      'param_dtypes': sorted({str(p.dtype) for p in base.parameters()}),
  }

  if spec['steps'] > 0:
    if spec['torch_optim'] == 'adamw':
      opt = torch.optim.AdamW(trainable, lr=spec['adamw_lr'], weight_decay=1e-5)
    else:
      opt = Adafactor(trainable, lr=0.3, scale_parameter=False, relative_step=False,
                      warmup_init=False, decay_rate=-0.8, clip_threshold=1.0,
                      weight_decay=1e-5)
    model.train()

    def step(b):
      loss = model(**b).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss

    losses = []
    t0 = time.perf_counter()
    losses.append(float(step(batches[0])))
    first_step_s = time.perf_counter() - t0
    phases['after_first_step'] = _proc_status()
    t0 = time.perf_counter()
    for i in range(1, 1 + spec['warmup_steps']):
      step(batches[i % n])
    warmup_s = time.perf_counter() - t0
    start = 1 + spec['warmup_steps']
    t0 = time.perf_counter()
    for i in range(start, start + spec['steps']):
      loss = step(batches[i % n])
    losses.append(float(loss))
    train_s = time.perf_counter() - t0
    phases['after_train'] = _proc_status()
    out.update({
        **_train_timings(first_step_s, warmup_s, spec['steps'], train_s, batch_size, losses),
    })
    del opt

  if spec['decode_tokens'] > 0:
    with torch.no_grad():
      embedding.weight.copy_(torch.from_numpy(prompt))  # the shared initial prompt
    model.eval()
    enc = batches[0]['input_ids']
    kwargs = dict(input_ids=enc, attention_mask=batches[0]['attention_mask'],
                  max_new_tokens=spec['decode_tokens'], do_sample=False, num_beams=1,
                  use_cache=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
      gen = model.generate(**kwargs)
    first_decode_s = time.perf_counter() - t0
    times = []
    for _ in range(spec['decode_reps']):
      t0 = time.perf_counter()
      with torch.inference_mode():
        gen = model.generate(**kwargs)
      times.append(time.perf_counter() - t0)
    tokens = gen[:, 1:].numpy()  # drop the decoder start token
    if tokens.shape[1] < spec['decode_tokens']:  # generation stopped early: pad
      tokens = np.pad(tokens, ((0, 0), (0, spec['decode_tokens'] - tokens.shape[1])))
    # Zeros after EOS, as ours returns them.
    after = np.cumsum(np.cumsum(tokens == EOS, axis=1), axis=1) > 1
    tokens = np.where(after, 0, tokens)
    out.update(_decode_fields(first_decode_s, times, tokens))
  phases['end'] = _proc_status()
  out.update({'import_s': t_import, 'load_s': t_load, 'rss_phases': phases,
              'torch_threads': torch.get_num_threads()})
  return out


# ---------------------------------------------------------------------------
# Matmul ceiling: how fast each framework multiplies the step's main shape.
# ---------------------------------------------------------------------------
def run_gemm(spec: Dict[str, Any]) -> Dict[str, Any]:
  """GFLOP/s of one [tokens, d_model] x [d_model, d_ff] matmul (the encoder
  MLP's input projection, the step's most common product) in XLA and in torch,
  in the run's dtype, best of `reps` after warm-up. Almost all of a train
  step's FLOPs are matmuls of this size, so step_flops / these rates bound
  each side's examples/s (summarise's `matmul_ceiling`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(spec['threads'])
  m, k, n = spec['gemm_shape']
  flop = 2.0 * m * k * n
  rs = np.random.RandomState(0)
  a, b = rs.randn(m, k).astype(np.float32), rs.randn(k, n).astype(np.float32)
  bf16 = spec.get('dtype') == 'bfloat16'

  def best(fn, reps=30):
    fn()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return flop / min(times) / 1e9
  # Ours as layers.einsum runs it: bf16 operands accumulate into float32.
  dt = jnp.bfloat16 if bf16 else jnp.float32
  ja, jb = jnp.asarray(a, dt), jnp.asarray(b, dt)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  xla = best(lambda: f(ja, jb).block_until_ready())
  tdt = torch.bfloat16 if bf16 else torch.float32
  ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
  with torch.no_grad():
    theirs = best(lambda: torch.matmul(ta, tb))
  return {'shape': [m, k, n], 'dtype': spec.get('dtype', 'float32'),
          'xla_gflop_per_s': xla, 'torch_gflop_per_s': theirs}


def matmul_ceiling(gemm: Dict[str, Any], achieved: Dict[str, float]) -> Dict[str, Any]:
  """What the matmul rates allow: each side's achieved GFLOP/s as a fraction
  of its framework's matmul rate, and the best train ratio ours could reach
  if every FLOP ran at XLA's rate while theirs stays as measured."""
  out = dict(gemm)
  rates = {'ours': gemm['xla_gflop_per_s'], 'ours_tuned': gemm['xla_gflop_per_s'],
           'theirs': gemm['torch_gflop_per_s']}
  out['fraction_of_matmul_rate'] = {side: v / rates[side] for side, v in achieved.items()}
  if achieved.get('theirs'):
    out['best_train_ratio_at_xla_matmul_rate'] = gemm['xla_gflop_per_s'] / achieved['theirs']
  return out


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------
def add_worker_args(parser: argparse.ArgumentParser, sides: Sequence[str]) -> None:
  """The hidden flags run_worker passes to the child (`--worker SIDE --spec
  JSON --result JSON`)."""
  parser.add_argument('--worker', choices=list(sides), help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  parser.add_argument('--result', help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace,
                 run: Callable[[str, Dict[str, Any]], Dict[str, Any]]) -> int:
  """The child's side of run_worker: run(side, spec) on the spec file, the
  result to the result file."""
  with open(args.spec) as f:
    spec = json.load(f)
  result = run(args.worker, spec)
  with open(args.result, 'w') as f:
    json.dump(result, f)
  return 0


def run_worker(side: str, spec: Dict[str, Any], timeout: float,
               script: Optional[str] = None) -> Dict[str, Any]:
  """One measurement in a fresh process (`script --worker side`, this file
  by default); peak RSS from wait4's rusage."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, result_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'result.json')
    with open(spec_path, 'w') as f:
      json.dump(spec, f)
    cmd = [sys.executable, script or os.path.abspath(__file__), '--worker', side, '--spec', spec_path,
           '--result', result_path]
    env = dict(os.environ)
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    # Drain output while waiting (a full pipe would block the child).
    chunks: List[bytes] = []
    import threading  # pylint: disable=g-import-not-at-top
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while True:
      pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.time() > deadline:
        proc.kill()
        pid, status, rusage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    log = b''.join(chunks).decode(errors='replace')
    if proc.returncode != 0 or not os.path.exists(result_path):
      raise RuntimeError(f'{side} worker failed (exit {proc.returncode}):\n{log[-4000:]}')
    with open(result_path) as f:
      result = json.load(f)
  result.update({'side': side, 'peak_rss_bytes': peak_rss(result),
                 'ru_maxrss_bytes': rusage.ru_maxrss * 1024,
                 'cpu_user_s': rusage.ru_utime, 'cpu_sys_s': rusage.ru_stime,
                 'process_wall_s': wall, 'loadavg_before': load_before,
                 'loadavg_after': os.getloadavg()})
  return result


def peak_rss(result: Dict[str, Any]) -> Optional[int]:
  """The worker's own peak RSS: VmHWM of its address space, read at its end.

  Not wait4's ru_maxrss: Linux carries the parent's resident size into a
  forked child's maxrss, so every worker reported at least the driver's RSS
  (which holds the prepared model): ~540 MB on the tiny config, a floor
  that hid the tiny sides' real peaks.
  """
  hwm = [p.get('hwm') for p in result.get('rss_phases', {}).values() if p.get('hwm')]
  return max(hwm) if hwm else None


METRICS = ('train_examples_per_s', 'peak_rss_bytes', 'decode_tokens_per_s', 'first_step_s',
           'first_decode_s', 'load_s', 'import_s')


def _median(runs: List[dict], key: str) -> Optional[float]:
  vals = [r[key] for r in runs if r.get(key) is not None]
  return statistics.median(vals) if vals else None


def _ratios(num: List[dict], den: List[dict]) -> Dict[str, Any]:
  """Per-pair num/den of the headline metrics and their medians."""
  out = {}
  for k in ('train_examples_per_s', 'peak_rss_bytes', 'decode_tokens_per_s'):
    per_pair = [a[k] / b[k] for a, b in zip(num, den) if a.get(k) and b.get(k)]
    out[k] = {'median': statistics.median(per_pair) if per_pair else None,
              'per_pair': per_pair}
  return out


def _agreement(a_runs: List[dict], b_runs: List[dict]) -> Optional[float]:
  agree = []
  for a, b in zip(a_runs, b_runs):
    if 'tokens' in a and 'tokens' in b:
      agree.append(sum(x == y for x, y in zip(a['tokens'], b['tokens'])) / len(a['tokens']))
  return statistics.median(agree) if agree else None


def summarise(runs: Dict[str, List[dict]], flops: Optional[float],
              batch_size: int) -> Dict[str, Any]:
  """Medians per side, ours/theirs ratios (and ours_tuned/theirs, ours_tuned/ours)."""
  med = {side: {k: _median(r, k) for k in METRICS} for side, r in runs.items()}
  out: Dict[str, Any] = {'median': med, 'ratios': _ratios(runs['ours'], runs['theirs']),
                         'decode_sequence_agreement': _agreement(runs['ours'], runs['theirs'])}
  if 'ours_tuned' in runs:
    out['ratios_tuned'] = _ratios(runs['ours_tuned'], runs['theirs'])
    out['ratios_tuned_vs_ours'] = _ratios(runs['ours_tuned'], runs['ours'])
  out['train_step_gflops'] = flops / 1e9 if flops else None
  # Same model and batch on every side: the same FLOPs per step (XLA's count).
  out['achieved_train_gflop_per_s'] = {
      side: flops * m['train_examples_per_s'] / batch_size / 1e9
      for side, m in med.items() if flops and m['train_examples_per_s']}
  return out


def targets_met(r: Dict[str, Any]) -> Dict[str, Optional[bool]]:
  """Issue #7's targets, from a ratios dict (ours/theirs medians over pairs)."""
  def check(key, op):
    v = r[key]['median']
    return None if v is None else op(v)
  return {'train_throughput_ge_2x': check('train_examples_per_s', lambda v: v >= 2.0),
          'peak_memory_le_0.7x': check('peak_rss_bytes', lambda v: v <= 0.7),
          'greedy_decode_ge_2x': check('decode_tokens_per_s', lambda v: v >= 2.0)}


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', default='tiny,small', help='comma-separated: ' + ','.join(CONFIGS))
  p.add_argument('--pairs', type=int, default=3, help='alternating (ours, theirs) pairs')
  p.add_argument('--prompt-length', type=int, default=100)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--input-len', type=int, default=128)
  p.add_argument('--target-len', type=int, default=8)
  p.add_argument('--steps', type=int, default=None,
                 help=f'timed train steps per run (default per config: {DEFAULT_STEPS})')
  p.add_argument('--warmup-steps', type=int, default=2,
                 help='untimed steps after the first (compile) step')
  p.add_argument('--decode-tokens', type=int, default=32, help='max new tokens (0: skip)')
  p.add_argument('--decode-reps', type=int, default=3)
  p.add_argument('--num-batches', type=int, default=4, help='distinct batches, cycled')
  p.add_argument('--threads', type=int, default=None, help='torch threads (default: cores)')
  p.add_argument('--torch-optim', choices=('adafactor', 'adamw'), default='adafactor')
  p.add_argument('--adamw-lr', type=float, default=0.03,
                 help="AdamW's learning rate (PEFT's prompt-tuning examples use 3e-2)")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='activations (both sides): bfloat16 = ours model_config.dtype, '
                      'theirs the model loaded in bf16; weights updated in float32 on both')
  p.add_argument('--no-flops', action='store_true', help='skip the XLA FLOP count')
  p.add_argument('--tuned', action='store_true',
                 help="add a third side per pair, ours_tuned: the trainer's options "
                      "model_config.remat=True (remat_policy 'dots', with the CPU scheduler "
                      "flag the CLI sets) and train.rng_impl='rbg'")
  p.add_argument('--compile-cache', action='store_true',
                 help="our sides use JAX's persistent compilation cache (t5x's default), "
                      'filled by one untimed run each before the pairs: measures a repeated '
                      'or restarted run, which skips compilation')
  p.add_argument('--timeout', type=float, default=3600, help='seconds per worker')
  p.add_argument('--workdir', default=None, help='keep the exported models here')
  p.add_argument('--out', default=None, help='also write the JSON here')
  p.add_argument('--keep-tokens', action='store_true', help='keep decoded tokens in the JSON')
  add_worker_args(p, ('ours', 'theirs', 'ours_tuned', 'gemm'))
  args = p.parse_args(argv)

  if args.worker:
    def run(side, spec):
      if side == 'theirs':
        return run_theirs(spec)
      if side == 'gemm':
        return run_gemm(spec)
      return run_ours(dict(spec, tuned=side == 'ours_tuned'))
    return serve_worker(args, run)

  names = [c.strip() for c in args.configs.split(',') if c.strip()]
  unknown = [c for c in names if c not in CONFIGS]
  if unknown:
    p.error(f'unknown config(s) {unknown}; choose from {sorted(CONFIGS)}')
  machine = machine_info()
  threads = args.threads or machine['usable_cores'] or os.cpu_count()
  report: Dict[str, Any] = {
      'benchmark': 'prompt tuning: prompt-transfer (JAX/Flax) vs transformers+peft (torch)',
      'machine': machine, 'versions': versions(),
      'settings': {k: v for k, v in vars(args).items()
                   if k not in ('worker', 'spec', 'result', 'out', 'workdir')},
      'torch_threads': threads, 'loadavg_start': os.getloadavg(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'configs': {}}
  workdir = args.workdir or tempfile.mkdtemp(prefix='peft_compare_')
  for name in names:
    directory = os.path.join(workdir, name)
    os.makedirs(directory, exist_ok=True)
    print(f'[{name}] preparing model and data in {directory}', file=sys.stderr)
    prep = prepare(name, args, directory)
    spec = {'hf_dir': prep['hf_dir'], 'prompt': os.path.join(directory, 'prompt.npy'),
            'data': os.path.join(directory, 'data.npz'),
            'steps': args.steps if args.steps is not None else DEFAULT_STEPS.get(name, 10),
            'warmup_steps': args.warmup_steps, 'decode_tokens': args.decode_tokens,
            'decode_reps': args.decode_reps, 'seed': args.seed, 'threads': threads,
            'torch_optim': args.torch_optim, 'adamw_lr': args.adamw_lr, 'dtype': args.dtype}
    sides = ('ours', 'theirs') + (('ours_tuned',) if args.tuned else ())
    if args.compile_cache:
      # As after a user's first `t5x` run: the compiled programs are on disk.
      spec['compilation_cache'] = os.path.join(directory, 'xla_cache')
      for side in sides:
        if side != 'theirs':
          run_worker(side, spec, args.timeout)
      print(f'[{name}] compilation cache filled: {spec["compilation_cache"]}', file=sys.stderr)
    runs: Dict[str, List[dict]] = {side: [] for side in sides}
    for pair in range(args.pairs):
      for side in sides:
        r = run_worker(side, spec, args.timeout)
        runs[side].append(r)
        print(f'[{name}] pair {pair + 1}/{args.pairs} {side}: '
              f'{r.get("train_examples_per_s", float("nan")):.2f} ex/s, '
              f'peak RSS {r["peak_rss_bytes"] / 2**20:.0f} MiB, '
              f'decode {r.get("decode_tokens_per_s", float("nan")):.1f} tok/s, '
              f'first step {r.get("first_step_s", float("nan")):.1f}s, '
              f'load {r["loadavg_before"][0]:.2f}', file=sys.stderr)
    summary = summarise(runs, prep['train_step_flops'], args.batch)
    gemm_shape = [args.batch * (args.prompt_length + args.input_len),
                  prep['config']['emb_dim'], prep['config']['mlp_dim']]
    gemm = run_worker('gemm', dict(spec, gemm_shape=gemm_shape), args.timeout)
    summary['matmul_ceiling'] = matmul_ceiling(
        {k: gemm[k] for k in ('shape', 'dtype', 'xla_gflop_per_s', 'torch_gflop_per_s')},
        summary['achieved_train_gflop_per_s'])
    summary['targets_met'] = targets_met(summary['ratios'])
    if args.tuned:
      summary['targets_met_tuned'] = targets_met(summary['ratios_tuned'])
    if not args.keep_tokens:
      for side_runs in runs.values():
        for r in side_runs:
          r.pop('tokens', None)
    prep.pop('hf_dir')
    report['configs'][name] = {**prep, **summary, 'runs': runs}
  report['loadavg_end'] = os.getloadavg()
  if not args.workdir:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(workdir, ignore_errors=True)
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  parts = []
  fmt = lambda v: 'n/a' if v is None else f'{v:.2f}x'  # noqa: E731
  for name, r in report['configs'].items():
    for label, key in (('', 'ratios'), (' tuned', 'ratios_tuned')):
      if key in r:
        ra = r[key]
        parts.append(f'{name}{label}: train {fmt(ra["train_examples_per_s"]["median"])}, '
                     f'peak RSS {fmt(ra["peak_rss_bytes"]["median"])}, '
                     f'decode {fmt(ra["decode_tokens_per_s"]["median"])}')
    ceiling = r.get('matmul_ceiling', {}).get('best_train_ratio_at_xla_matmul_rate')
    if ceiling:
      parts[-1] += f' (train ceiling at XLA\'s matmul rate {fmt(ceiling)})'
  print('SUMMARY ours/theirs (median of ' f'{args.pairs} pairs, load {report["loadavg_start"][0]:.2f}'
        f'->{report["loadavg_end"][0]:.2f}): ' + '; '.join(parts))
  return 0


if __name__ == '__main__':
  sys.exit(main())
