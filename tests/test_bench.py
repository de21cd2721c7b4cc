"""bench/mfu.py, the one-command accelerator check of issue #7, runs end to end
(on the CPU here: MFU is unknown there, everything else is measured)."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mfu(tmp_path, *extra):
  out = tmp_path / f'mfu{len(extra)}.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'mfu.py'), '--size', 'tiny',
       '--vocab-size', '384', '--batch', '4', '--input-len', '24', '--target-len', '4',
       '--prompt-length', '8', '--steps', '3', '--warmup-steps', '1', '--out', str(out), *extra],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stderr


def test_mfu_script_measures_a_tiny_prompt_tuning_step(tmp_path):
  r, stderr = _mfu(tmp_path, '--remat')
  assert r['platform'] == 'cpu' and r['mfu'] is None and r['peak_bf16_tflop_per_s'] is None
  assert r['config']['name'] == 't5_1_1_tiny' and r['dtype'] == 'bfloat16' and r['remat']
  assert r['timed_steps'] == 3 and r['recompilations_during_timed_steps'] == 0
  assert r['step_s_median'] > 0 and r['examples_per_s'] == 4 / r['step_s_median']
  # XLA's FLOP count of the step: at least the encoder's weight matmuls
  # forward and backward (2 x 2 flops per weight per token).
  cfg = r['config']
  per_layer = 4 * cfg['emb_dim'] * cfg['num_heads'] * cfg['head_dim'] + 3 * cfg['emb_dim'] * cfg['mlp_dim']
  assert r['model_flops_per_step'] > 4 * per_layer * cfg['num_encoder_layers'] * 4 * (8 + 24)
  assert r['loss_first'] > 0 and math.isfinite(r['loss_last'])
  assert 'SUMMARY' in stderr and 'MFU n/a' in stderr
  # Model FLOPs do not count remat's recomputation: the same as without remat.
  plain, _ = _mfu(tmp_path)
  assert not plain['remat'] and plain['model_flops_per_step'] == r['model_flops_per_step']


def test_mfu_script_refuses_empty_shapes():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'mfu.py'), '--batch', '0'],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 2 and '--batch must be at least 1, got 0' in proc.stderr
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'mfu.py'), '--size', 'huge'],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr and "'base'" in proc.stderr
