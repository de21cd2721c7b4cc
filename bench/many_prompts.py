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

and, unless --no-peft, what a PEFT user runs (transformers + peft in a fresh
process, torch at --threads threads, the same model exported with
export_hf_checkpoint, the same K prompts as K PEFT prompt-tuning adapters):

  peft one prompt    B examples under one adapter;
  peft one by one    set_adapter(task) and B/K examples, K times (PEFT's
                     prompt tuning cannot mix adapters in a batch).

Ours vs our one by one is the batching alone; ours vs PEFT one by one is
what a user switching tools sees (batching and framework together).

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
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, 'bench')):
  if _path not in sys.path:
    sys.path.insert(0, _path)
from prompt_transfer import build_model, load_pretrained  # pylint: disable=wrong-import-position
from prompt_transfer import many_prompts  # pylint: disable=wrong-import-position
from prompt_transfer.model.models import merge_prompt  # pylint: disable=wrong-import-position
from prompt_transfer.prompts.free import free_prompt  # pylint: disable=wrong-import-position
import peft_compare  # pylint: disable=wrong-import-position


def timed(fn, repeats: int) -> float:
  """Median seconds of fn() after one compiling call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_peft(spec: dict) -> dict:
  """The PEFT sides, in a fresh process: K adapters on one HF model."""
  import torch  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  from transformers import T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(spec['threads'])
  prompts = np.load(spec['prompts'])  # [K, L, d]
  k = prompts.shape[0]
  base = T5ForConditionalGeneration.from_pretrained(spec['hf_dir'])
  # num_transformer_submodules=1: the prompt on the encoder only, as ours
  # (PEFT's seq2seq default would also prepend it to the decoder).
  config = peft.PromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompts.shape[1],
      num_transformer_submodules=1, prompt_tuning_init=peft.PromptTuningInit.RANDOM)
  model = peft.get_peft_model(base, config, adapter_name='t0')
  for t in range(1, k):
    model.add_adapter(f't{t}', config)
  with torch.no_grad():
    for t in range(k):
      model.prompt_encoder[f't{t}'].embedding.weight.copy_(torch.from_numpy(prompts[t]))
  model.eval()
  out = {'torch_threads': torch.get_num_threads(), 'batches': {}}
  with np.load(spec['data']) as f:
    data = {name: f[name] for name in f.files}
  for b in spec['batches']:
    enc = torch.from_numpy(data[f'enc_{b}'].astype(np.int64))
    tgt = torch.from_numpy(data[f'tgt_{b}'].astype(np.int64))
    ids = data[f'ids_{b}']
    decode_tokens = tgt.shape[1]

    def predict(rows):
      model.set_adapter(f't{int(ids[rows][0])}')
      x = enc[rows]
      return model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                            max_new_tokens=decode_tokens, do_sample=False, num_beams=1,
                            use_cache=True)

    def score(rows):
      model.set_adapter(f't{int(ids[rows][0])}')
      x, y = enc[rows], tgt[rows]
      logits = model(input_ids=x, attention_mask=torch.ones_like(x), labels=y).logits
      logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None])[..., 0]
      return (logp * (y > 0)).sum(-1)

    per_task = [np.flatnonzero(ids == t) for t in range(k)]
    everything = np.arange(b)
    row = {}
    with torch.inference_mode():
      for program, fn in (('predict', predict), ('score', score)):
        # One prompt over the whole batch (the adapter of row 0), then the K
        # tasks in turn under their own adapters.
        one_s = timed(lambda fn=fn: fn(everything), spec['repeats'])
        by_task_s = timed(lambda fn=fn: [fn(rows) for rows in per_task], spec['repeats'])
        row[program] = {'peft one prompt': b / one_s, 'peft one by one': b / by_task_s}
      # What PEFT decodes, each task under its own adapter, for the agreement check.
      tokens = np.zeros((b, decode_tokens), np.int64)
      for rows in per_task:
        gen = predict(rows)[:, 1:].numpy()  # drop the decoder start token
        tokens[rows, :gen.shape[1]] = gen
      scores = np.zeros(b, np.float64)
      for rows in per_task:
        scores[rows] = score(rows).numpy()
    after = np.cumsum(np.cumsum(tokens == 1, axis=1), axis=1) > 1  # zeros after EOS, as ours
    row['tokens'] = np.where(after, 0, tokens).tolist()
    row['scores'] = scores.tolist()
    out['batches'][str(b)] = row
  return out


def add_peft(result: dict, args: argparse.Namespace, config, frozen, prompts, inputs) -> None:
  """Runs the PEFT sides in a fresh process and adds them to `result`."""
  try:
    import peft  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f'[bench] PEFT sides skipped: {e} (pip install -e .[test])', file=sys.stderr)
    return
  from prompt_transfer.model.export import export_hf_checkpoint  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = export_hf_checkpoint(frozen, config, os.path.join(tmp, 'hf'))
    np.save(os.path.join(tmp, 'prompts.npy'), np.stack(prompts).astype(np.float32))
    np.savez(os.path.join(tmp, 'data.npz'),
             **{f'{name}_{b}': v[name] for b, v in inputs.items()
                for name in ('enc', 'tgt', 'ids')})
    spec = {'hf_dir': hf_dir, 'prompts': os.path.join(tmp, 'prompts.npy'),
            'data': os.path.join(tmp, 'data.npz'), 'batches': list(inputs),
            'threads': args.threads, 'repeats': args.repeats}
    print('[bench] PEFT sides (fresh process) ...', file=sys.stderr, flush=True)
    theirs = peft_compare.run_worker('peft', spec, args.timeout, script=os.path.abspath(__file__))
  result['peft'] = {'torch_threads': theirs['torch_threads'],
                    'versions': peft_compare.versions()}
  for b, mine in inputs.items():
    row, out = theirs['batches'][str(b)], result['batches'][str(b)]
    tokens, scores = np.asarray(row['tokens']), np.asarray(row['scores'])
    # Same model, same prompts: PEFT should decode what the mixed bank decodes.
    out['peft_agreement'] = {
        'decoded_rows_equal': float(np.mean(np.all(tokens == mine['tokens'], axis=1))),
        'score_max_abs_diff': float(np.max(np.abs(scores - mine['scores'])))}
    for program in ('predict', 'score'):
      rates = out[program]['examples_per_s']
      rates.update({n: round(v, 1) for n, v in row[program].items()})
      out[program]['mixed_vs_peft_one_by_one'] = round(
          rates['mixed bank'] / rates['peft one by one'], 2)
      out[program]['peft_one_prompt_vs_one_by_one'] = round(
          rates['peft one prompt'] / rates['peft one by one'], 2)
      print(f'[bench] B={b} {program}: peft one prompt {rates["peft one prompt"]:.1f}, '
            f'peft one by one {rates["peft one by one"]:.1f} ex/s', file=sys.stderr, flush=True)


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
  parser.add_argument('--no-peft', dest='peft', action='store_false',
                      help='skip the transformers + peft sides')
  parser.add_argument('--threads', type=int, default=2, help='torch threads (PEFT sides)')
  parser.add_argument('--timeout', type=float, default=1800, help='PEFT worker, seconds')
  parser.add_argument('--json', default=None)
  peft_compare.add_worker_args(parser, ['peft'])
  args = parser.parse_args()
  if args.worker:
    return peft_compare.serve_worker(args, lambda _, spec: run_peft(spec))
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
            'settings': {kk: v for kk, v in vars(args).items()
                         if kk not in ('json', 'worker', 'spec', 'result')},
            'batches': {}}
  inputs = {}  # per B: what the PEFT sides get, and what ours computed
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
    inputs[b] = {'enc': enc, 'tgt': tgt, 'ids': ids, 'tokens': mixed_tokens,
                 'scores': np.asarray(bank_model.score_batch(bank_params, mixed_batch))}
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
  if args.peft:
    add_peft(result, args, config, frozen, prompts, inputs)
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
