#!/usr/bin/env python
"""Prompt-tuning train-step throughput and MFU of one device (run by hand).

    python bench/mfu.py                                   # T5-base, bf16, on this device
    python bench/mfu.py --size tiny --steps 3 --batch 4 --input-len 32   # smoke run

Issue #7's accelerator target (T5-base prompt tuning at >= 40% MFU) in one
command with nothing to download: a randomly initialised T5 of the named size
(the frozen weights' values do not change the speed), random full-length
token batches, the trainer's own set-up and step (training.state.set_up and
training.step.compile_train_step: prompt-only gradients, Adafactor, dropout on,
state donated, frozen weights stored as the trainer stores them).
Needs jax, flax, optax and gin (no TensorFlow, seqio or data).

Reports JSON: device kind, step time (median of the timed steps), examples
and tokens per second, FLOPs per step and MFU. Model FLOPs are XLA's count of
the step WITHOUT remat (perf.lowered_flops), so with --remat the recomputed
forward pass is not counted as useful work (MFU, not hardware utilisation).
MFU is against the device's dense bf16 peak (perf.peak_flops_per_device); on
a CPU it is null and the achieved GFLOP/s is what to read.

On the workplace's lent H200 (jax, flax, optax, orbax, etils are in its image;
gin-config is not): here, `echo /.whl/ >> .git/info/exclude; python3 -m pip
download --no-deps -d .whl gin-config==0.5.0`, then one device call with
carry ['.whl'] and the command
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/mfu.py --out $OUT/mfu.json &&
  python3 bench/mfu.py --batch 64 --out $OUT/mfu_b64.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(args: argparse.Namespace) -> Dict[str, Any]:
  """The trainer's set-up (training.state.set_up) of a random model on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.config import get_config  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.free import free_prompt  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.state import prompt_tuning_optimizer, set_up  # pylint: disable=g-import-not-at-top
  overrides = {'vocab_size': args.vocab_size} if args.vocab_size else {}
  config = get_config(args.variant, args.size, dtype=args.dtype, remat=args.remat,
                      **overrides)
  model = build_model(config, free_prompt(args.prompt_length))
  frozen = jax.device_get(build_model(config).init_params(jax.random.PRNGKey(args.seed)))
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  return set_up(model, frozen, prompt_tuning_optimizer(0.3), mesh,
                jax.random.PRNGKey(args.seed))


def batches(args: argparse.Namespace, vocab_size: int, n: int = 4) -> List[Dict[str, Any]]:
  """n random full-length batches (no padding: every position is real work)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(args.seed)
  out = []
  for _ in range(n):
    tgt = rs.randint(2, vocab_size, (args.batch, args.target_len)).astype(np.int32)
    tgt[:, -1] = 1  # EOS
    din = np.zeros_like(tgt)
    din[:, 1:] = tgt[:, :-1]
    out.append({'encoder_input_tokens':
                rs.randint(2, vocab_size, (args.batch, args.input_len)).astype(np.int32),
                'decoder_input_tokens': din, 'decoder_target_tokens': tgt})
  return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import partitioning, perf  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.step import compile_train_step, dropout_key, model_flops_step  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  setup = build(args)
  data = batches(args, setup.model.config.vocab_size)
  data = [partitioning.global_batch(b, setup.mesh) for b in data]
  step_fn = compile_train_step(setup)  # the trainer's jitted step (state donated)
  rng = dropout_key(args.seed)
  state, frozen = setup.state, setup.frozen
  setup.state = None

  # Model FLOPs: the same step without remat, counted before compiling (no
  # recomputation in the count).
  flops = perf.lowered_flops(model_flops_step(setup, True, step_fn), state, frozen, data[0], rng)
  load_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  state, metrics = step_fn(state, frozen, data[0], jax.random.fold_in(rng, 0))
  loss_first = float(metrics['loss'])
  first_step_s = time.perf_counter() - t0
  for i in range(1, 1 + args.warmup_steps):
    state, metrics = step_fn(state, frozen, data[i % len(data)], jax.random.fold_in(rng, i))
  jax.block_until_ready(state)

  times = []
  start = 1 + args.warmup_steps
  with perf.CompileCounter() as compiles:
    for i in range(start, start + args.steps):
      t = time.perf_counter()
      state, metrics = step_fn(state, frozen, data[i % len(data)], jax.random.fold_in(rng, i))
      jax.block_until_ready(metrics)  # per-step times; dispatch overlap is lost, not gained
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  peak = perf.peak_flops_per_device(device)
  tokens = args.batch * (args.prompt_length + args.input_len + args.target_len)
  return {
      'benchmark': 'prompt-tuning train step, one device',
      'device_kind': device.device_kind, 'platform': device.platform,
      'jax': jax.__version__,
      'config': setup.model.config.describe(), 'dtype': args.dtype, 'remat': args.remat,
      'prompt_length': args.prompt_length, 'batch': args.batch,
      'input_len': args.input_len, 'target_len': args.target_len,
      'load_s': load_s, 'first_step_s': first_step_s, 'timed_steps': args.steps,
      'step_s_median': step_s, 'step_s_min': min(times),
      'examples_per_s': args.batch / step_s, 'tokens_per_s': tokens / step_s,
      'model_flops_per_step': flops,
      'achieved_tflop_per_s': flops / step_s / 1e12 if flops else None,
      'peak_bf16_tflop_per_s': peak / 1e12 if peak else None,
      'mfu': perf.mfu(flops, 1.0 / step_s, 1, peak),
      'recompilations_during_timed_steps': compiles.count,
      'loss_first': loss_first, 'loss_last': float(metrics['loss']),
  }


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  from prompt_transfer.model.config import SIZES, VARIANTS  # pylint: disable=g-import-not-at-top
  p.add_argument('--variant', choices=VARIANTS, default='t5_1_1')
  p.add_argument('--size', choices=SIZES, default='base')
  p.add_argument('--vocab-size', type=int, default=None,
                 help='override the config (tiny configs default to a byte vocabulary)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='bfloat16')
  p.add_argument('--remat', action='store_true', help='model_config.remat=True')
  p.add_argument('--prompt-length', type=int, default=100)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--input-len', type=int, default=412,
                 help='input tokens after the prompt (default: 100 + 412 = 512 encoder positions)')
  p.add_argument('--target-len', type=int, default=16)
  p.add_argument('--steps', type=int, default=20, help='timed steps')
  p.add_argument('--warmup-steps', type=int, default=3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='also write the JSON here')
  args = p.parse_args(argv)
  for name in ('batch', 'input_len', 'target_len', 'steps'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
  result = run(args)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  mfu = result['mfu']
  print(f'SUMMARY {result["device_kind"]} {result["config"]["name"]} {args.dtype}: '
        f'{result["examples_per_s"]:.1f} ex/s, {result["step_s_median"] * 1e3:.1f} ms/step, '
        f'{(result["achieved_tflop_per_s"] or 0):.2f} TFLOP/s, '
        f'MFU {"n/a" if mfu is None else f"{100 * mfu:.1f}%"}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
