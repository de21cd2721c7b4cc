#!/usr/bin/env python
"""Mixed-task batches: K prompts in one batch vs one prompt vs the K tasks one
after another (run by hand; prints JSON).

Three ways to serve B examples that belong to K tasks, each with its own
prompt, on one frozen model (the same shapes everywhere: inputs
--input_tokens, decoding --decode_tokens, prompts --prompt_length):

  one prompt    B examples, all with the same prompt (a plain prompt model):
                the ceiling, what a single-task batch costs;
  mixed bank    B examples with K prompts mixed in the batch (many_prompts:
                a PromptBank, each example picks its prompt by task id);
  one by one    the K tasks in turn, B/K examples each, one prompt per call:
                what PEFT's prompt tuning must do (it repeats one prompt over
                the batch), here with our own model so only the batching differs.

Both programs are measured: greedy decoding (predict_batch) and scoring
(score_batch, the rank-classification call). Compiles first, then --repeats
timed calls; examples/s is the median. The issue's targets: mixed >= 0.9x
one prompt; mixed several times one by one.

  python bench/many_prompts.py --json bench/results/many_prompts_cpu2.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prompt_transfer import build_model, load_pretrained  # pylint: disable=wrong-import-position
from prompt_transfer import many_prompts  # pylint: disable=wrong-import-position
from prompt_transfer.model.models import merge_prompt  # pylint: disable=wrong-import-position
from prompt_transfer.prompts.free import free_prompt  # pylint: disable=wrong-import-position


def timed(fn, repeats: int) -> float:
  """Median seconds of fn() after one compiling call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', default='pkg://assets/t5_1_1_mini_synthetic')
  parser.add_argument('--prompts', type=int, default=8, help='K')
  parser.add_argument('--batches', type=int, nargs='+', default=[8, 64],
                      help='B values: B = K is one example per task (what a server mixes)')
  parser.add_argument('--prompt_length', type=int, default=20)
  parser.add_argument('--input_tokens', type=int, default=64)
  parser.add_argument('--decode_tokens', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  k = args.prompts
  if any(b % k for b in args.batches):
    parser.error('every --batches value must be a multiple of --prompts')
  base, frozen = load_pretrained(args.checkpoint)
  config = base.config
  rs = np.random.RandomState(0)
  emb = np.asarray(frozen['token_embedder']['embedding'])
  prompts = [emb[rs.randint(3, 250, size=args.prompt_length)] for _ in range(k)]
  single = build_model(config, free_prompt(args.prompt_length))
  single_params = jax.device_put(merge_prompt({'prompt': {'prompt': prompts[0]}}, frozen))
  bank_model, bank_params = many_prompts.bank_model(config, prompts, frozen, capacity=k)
  per_task_params = [jax.device_put(merge_prompt({'prompt': {'prompt': p}}, frozen))
                     for p in prompts]
  result = {'checkpoint': args.checkpoint, 'model': config.name, 'device': str(jax.devices()[0]),
            'settings': {kk: v for kk, v in vars(args).items() if kk != 'json'}, 'batches': {}}
  for b in args.batches:
    enc = rs.randint(3, 250, size=(b, args.input_tokens)).astype(np.int32)
    enc[:, -1] = 1
    tgt = rs.randint(3, 250, size=(b, args.decode_tokens)).astype(np.int32)
    tgt[:, -1] = 1
    dec = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
    batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
             'decoder_target_tokens': tgt}
    ids = np.arange(b, dtype=np.int32) % k  # every batch mixes all K tasks
    mixed_batch = {**batch, 'task_ids': ids}
    per_task = [{key: v[ids == t] for key, v in batch.items()} for t in range(k)]
    out: dict = {}
    # The bank computes what each prompt alone computes (same greedy tokens).
    mixed_tokens = np.asarray(bank_model.predict_batch(bank_params, mixed_batch))
    out['mixed_equals_each_prompt_alone'] = bool(all(
        np.array_equal(mixed_tokens[ids == t],
                       np.asarray(single.predict_batch(per_task_params[t], per_task[t])))
        for t in range(k)))
    for program in ('predict', 'score'):
      def call(model, params, bt, program=program):
        return (model.predict_batch(params, bt) if program == 'predict'
                else model.score_batch(params, bt))
      one = timed(lambda: call(single, single_params, batch), args.repeats)
      mixed = timed(lambda: call(bank_model, bank_params, mixed_batch), args.repeats)
      by_task = timed(lambda: [call(single, per_task_params[t], per_task[t]) for t in range(k)],
                      args.repeats)
      rows = {'one prompt': b / one, 'mixed bank': b / mixed, 'one by one': b / by_task}
      out[program] = {
          'examples_per_s': {n: round(v, 1) for n, v in rows.items()},
          'mixed_vs_one_prompt': round(rows['mixed bank'] / rows['one prompt'], 3),
          'mixed_vs_one_by_one': round(rows['mixed bank'] / rows['one by one'], 3)}
      print(f'[bench] B={b} {program}: ' + ', '.join(f'{n} {v:.1f} ex/s' for n, v in rows.items()),
            file=sys.stderr, flush=True)
    result['batches'][str(b)] = out
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
