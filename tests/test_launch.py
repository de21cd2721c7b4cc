"""launch/*.sh: --help, --dry-run output (exact commands, shell quoting that
survives), error paths, and the logic behind the dry run exercised with fake
gcloud / srun / scontrol / sbatch / t5x programs on PATH (nothing real is
contacted: the fakes shadow any installed gcloud)."""
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
TFL = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}"   # spaces and quotes
T5X_ARGS = ['train', '--gin_file=runs/prompt_tune.gin', TFL,
            '--gin.MIXTURE_OR_TASK_NAME="glue_sst2"', '--gin.TRAIN_STEPS=100']
TPU = ['--name', 'pt-test', '--zone', 'us-central2-b', '--accelerator-type', 'v4-8']
GCLOUD = ['gcloud', 'compute', 'tpus', 'tpu-vm']


def _write_exe(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


# Records its argv and selected environment variables as one JSON line in $FAKE_T5X_LOG.
FAKE_T5X = f"""#!{sys.executable} -S
import json, os, sys
env = {{k: os.environ.get(k) for k in ('SLURM_LOCALID', 'JAX_LOCAL_DEVICE_IDS', 'TPU_WORKER_ID',
                                     'PROMPT_TRANSFER_PLATFORM', 'CUDA_VISIBLE_DEVICES')}}
with open(os.environ['FAKE_T5X_LOG'], 'a') as f:
  f.write(json.dumps({{'argv': sys.argv[1:], 'env': env, 'cwd': os.getcwd()}}) + '\\n')
"""


@pytest.fixture
def fakes(tmp_path):
  """A PATH folder whose gcloud/sbatch/srun/scontrol fail the test if called."""
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  calls = tmp_path / 'unexpected_calls'
  for name in ('gcloud', 'sbatch', 'srun', 'scontrol'):
    _write_exe(bindir / name, f'#!/bin/sh\necho "{name} $*" >> {shlex.quote(str(calls))}\nexit 99\n')
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}', TMPDIR=str(tmp_path))
  env.pop('VIRTUAL_ENV', None)
  env.pop('T5X', None)
  return bindir, env, calls


def run(script, *args, env, timeout=30):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def commands(stdout):
  """The printed commands (comments dropped), each split the way a shell would."""
  return [shlex.split(l) for l in stdout.splitlines() if l.strip() and not l.startswith('#')]


def remote_t5x_args(remote_command):
  """The argv that `exec t5x ...` gets in a remote --command string."""
  words = shlex.split(remote_command)
  i = words.index('exec')
  assert words[i + 1] == 't5x'
  return words[i + 2:]


def option(argv, name):
  return next(a[len(name) + 1:] for a in argv if a.startswith(name + '='))


# ---------------------------------------------------------------------------
# --help and errors.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('script,words', [
    ('tpu_vm.sh', ['--name', '--zone', '--accelerator-type', '--version', '--project', '--spot',
                   '--preemptible', '--reuse', '--repo', '--model-dir', '--max-restarts',
                   '--dry-run', 'gs://', '--worker=all']),
    ('slurm_gpu.sh', ['--nodes', '--gpus-per-node', '--partition', '--time', '--job-name',
                      '--account', '--process-per-gpu', '--dry-run', 'requeue']),
    ('local.sh', ['--dry-run', '--port', '--process_index']),
])
def test_help(fakes, script, words):
  _, env, calls = fakes
  for flag in ('--help', '-h'):
    proc = run(script, flag, env=env)
    assert proc.returncode == 0, proc.stderr
    for w in words:
      assert w in proc.stdout, (script, w)
  assert not calls.exists()


@pytest.mark.parametrize('script,args,message', [
    ('tpu_vm.sh', ['--zone', 'z', '--accelerator-type', 'v4-8', '--', 'train'], '--name'),
    ('tpu_vm.sh', ['--name', 'n', '--', 'train'], '--zone --accelerator-type'),
    ('tpu_vm.sh', TPU, 'give the t5x arguments after --'),
    ('tpu_vm.sh', TPU + ['--spot', '--preemptible', '--', 'train'], 'not both'),
    ('tpu_vm.sh', TPU + ['--bogus', '--', 'train'], "unknown option '--bogus'"),
    ('tpu_vm.sh', TPU + ['--zone'], '--zone needs a value'),
    ('tpu_vm.sh', TPU + ['--max-restarts', 'x', '--', 'train'], '--max-restarts'),
    ('tpu_vm.sh', ['--name', 'n', '--zone', 'z', '--accelerator-type', 'v9-8', '--', 'train'],
     'give --version'),
    ('tpu_vm.sh', TPU + ['--model-dir', 'gs://b/r', '--', 'train', '--gin.MODEL_DIR=/x'],
     'not both'),
    ('slurm_gpu.sh', ['--gpus-per-node', '8', '--', 'train'], 'missing required option(s): --nodes'),
    ('slurm_gpu.sh', ['--', 'train'], '--nodes --gpus-per-node'),
    ('slurm_gpu.sh', ['--nodes', '2', '--gpus-per-node', '8'], 'give the t5x arguments after --'),
    ('slurm_gpu.sh', ['--nodes', 'two', '--gpus-per-node', '8', '--', 'train'], '--nodes must be'),
    ('slurm_gpu.sh', ['--nodes', '2', '--gpus-per-node', '8', '--frobnicate', '--', 'train'],
     "unknown option '--frobnicate'"),
    ('local.sh', ['two', '--dry-run', '--', 'train'], 'N must be a positive integer'),
])
def test_usage_errors_exit_2(fakes, script, args, message):
  _, env, calls = fakes
  proc = run(script, *args, env=env)
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert message in proc.stderr
  assert not calls.exists()


# ---------------------------------------------------------------------------
# tpu_vm.sh --dry-run.
# ---------------------------------------------------------------------------
def test_tpu_dry_run_prints_every_command(fakes):
  _, env, calls = fakes
  proc = run('tpu_vm.sh', '--dry-run', *TPU, '--spot', '--model-dir', 'gs://bkt/runs/sst2',
             '--', *T5X_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  assert not calls.exists(), 'dry run called a program'
  cmds = commands(proc.stdout)
  gcloud = [c for c in cmds if c[:4] == GCLOUD]
  assert [c[4] for c in gcloud] == ['scp', 'ssh', 'ssh']
  scp, install, train = gcloud
  # Spot capacity through a queued resource (waits for capacity), polled until ACTIVE.
  queued = [c for c in cmds if c[:4] == ['gcloud', 'compute', 'tpus', 'queued-resources']]
  assert queued[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pt-test',
                       '--zone=us-central2-b', '--node-id=pt-test', '--accelerator-type=v4-8',
                       '--runtime-version=tpu-ubuntu2204-base', '--spot']
  assert queued[1][4] == 'describe' and 'until ACTIVE' in proc.stdout
  plain = run('tpu_vm.sh', '--dry-run', *TPU, '--spot', '--no-queued', '--', *T5X_ARGS, env=env)
  assert [c for c in commands(plain.stdout) if c[:4] == GCLOUD][0] == GCLOUD + [
      'create', 'pt-test', '--zone=us-central2-b', '--accelerator-type=v4-8',
      '--version=tpu-ubuntu2204-base', '--spot']
  # The checkout is staged (tracked + untracked files, no .venv) and copied to all workers.
  stage = scp[7]
  assert scp == GCLOUD + ['scp', '--recurse', '--worker=all', stage, 'pt-test:',
                          '--zone=us-central2-b']
  assert stage.startswith(str(env['TMPDIR'])) and stage.endswith('/prompt-transfer')
  assert any(l.startswith(f'mkdir -p {stage} ') and 'tar -xf - -C' in l
             for l in proc.stdout.splitlines())
  assert install[4:8] == ['ssh', 'pt-test', '--zone=us-central2-b', '--worker=all']
  remote_install = option(install, '--command')
  assert 'jax[tpu]' in shlex.split(remote_install)
  # Python 3.11 from uv on the workers (the images have 3.10), versions pinned.
  assert 'uv venv --allow-existing --python 3.11 prompt-transfer-venv' in remote_install
  assert '-c ./prompt-transfer/constraints.txt' in remote_install
  assert '-e ./prompt-transfer' in remote_install
  assert 'gcsfuse' not in remote_install
  assert train[4:8] == ['ssh', 'pt-test', '--zone=us-central2-b', '--worker=all']
  # A preempted VM fails ssh in 30 s.
  assert all('--ssh-flag=-oConnectTimeout=30' in c for c in (install, train))
  remote_run = option(train, '--command')
  # The t5x arguments arrive intact on the workers; MODEL_DIR is the bucket, written natively.
  assert remote_t5x_args(remote_run) == T5X_ARGS + ['--gin.MODEL_DIR="gs://bkt/runs/sst2"']
  assert 'gcsfuse' not in remote_run
  # The resumption loop is described.
  assert 'PREEMPTED' in proc.stdout and 'at most 5 restarts' in proc.stdout


def test_tpu_dry_run_gcsfuse_internal_ip_and_v5e_names(fakes):
  _, env, _ = fakes
  proc = run('tpu_vm.sh', '--dry-run', *TPU, '--model-dir', 'gs://bkt/runs/sst2', '--gcsfuse',
             '--internal-ip', '--', *T5X_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  gcloud = [c for c in commands(proc.stdout) if c[:4] == GCLOUD]
  _, scp, install, train = gcloud
  assert 'gcsfuse' in option(install, '--command')
  remote_run = option(train, '--command')
  assert remote_t5x_args(remote_run) == T5X_ARGS + ['--gin.MODEL_DIR="/mnt/gcs/bkt/runs/sst2"']
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 bkt /mnt/gcs/bkt' in remote_run
  assert all('--internal-ip' in c for c in (scp, install, train))
  tpu = [a if a != 'v4-8' else 'v5e-8' for a in TPU]
  bad = run('tpu_vm.sh', '--dry-run', *tpu, '--', *T5X_ARGS, env=env)
  assert bad.returncode == 2 and 'v5litepod-N' in bad.stderr
  bad = run('tpu_vm.sh', '--dry-run', *TPU, '--gcsfuse', '--', *T5X_ARGS, env=env)
  assert bad.returncode == 2 and '--gcsfuse needs a gs://' in bad.stderr


def test_tpu_dry_run_reuse_project_git_repo_and_versions(fakes):
  _, env, calls = fakes
  proc = run('tpu_vm.sh', '--dry-run', '--name', 'v5', '--zone', 'us-west4-a',
             '--accelerator-type=v5litepod-16', '--reuse', '--project=my-proj', '--preemptible',
             '--repo', 'https://github.com/example/prompt-transfer.git', '--git-ref', 'v1',
             '--', *T5X_ARGS, '--gin.MODEL_DIR="/tmp/run dir"', env=env)
  assert proc.returncode == 0, proc.stderr
  assert not calls.exists()
  cmds = commands(proc.stdout)
  assert [c[4] for c in cmds] == ['describe', 'create', 'ssh', 'ssh']
  assert cmds[0] == GCLOUD + ['describe', 'v5', '--zone=us-west4-a', '--project=my-proj',
                              '--format=value(state)']
  assert cmds[1] == GCLOUD + ['create', 'v5', '--zone=us-west4-a', '--project=my-proj',
                              '--accelerator-type=v5litepod-16',
                              '--version=v2-alpha-tpuv5-lite', '--preemptible']
  remote_install = option(cmds[2], '--command')
  assert ('git clone --depth 1 --branch v1 https://github.com/example/prompt-transfer.git '
          'prompt-transfer') in remote_install
  assert remote_t5x_args(option(cmds[3], '--command')) == T5X_ARGS + [
      '--gin.MODEL_DIR="/tmp/run dir"']
  for accel, version in (('v4-32', 'tpu-ubuntu2204-base'), ('v5p-8', 'v2-alpha-tpuv5'),
                         ('v6e-8', 'v2-alpha-tpuv6e')):
    out = run('tpu_vm.sh', '--dry-run', '--name', 'n', '--zone', 'z', '--accelerator-type',
              accel, '--', 'train', env=env).stdout
    assert f'--version={version}' in out
  out = run('tpu_vm.sh', '--dry-run', *TPU, '--version', 'my-runtime', '--', 'train', env=env)
  assert '--version=my-runtime' in out.stdout


# ---------------------------------------------------------------------------
# tpu_vm.sh for real, against a fake gcloud: preemption -> recreate -> rerun.
# ---------------------------------------------------------------------------
FAKE_GCLOUD = f"""#!{sys.executable} -S
# gcloud compute tpus tpu-vm VERB ...: a TPU VM whose state lives in $FAKE_GCLOUD_DIR/state and
# whose workers' home folder is $FAKE_GCLOUD_DIR/home; the training ssh command really runs
# there (with a fake t5x on its PATH), and $FAKE_GCLOUD_DIR/scenario says how each run ends.
import json, os, shutil, subprocess, sys
d = os.environ['FAKE_GCLOUD_DIR']
args = sys.argv[1:]
with open(os.path.join(d, 'calls'), 'a') as f:
  f.write(json.dumps(args) + '\\n')
assert args[:3] in (['compute', 'tpus', 'tpu-vm'], ['compute', 'tpus', 'queued-resources']), args
verb = args[3]
queued = args[2] == 'queued-resources'
state = os.path.join(d, 'state')
home = os.path.join(d, 'home')
def read(name, default=''):
  p = os.path.join(d, name)
  return open(p).read().strip() if os.path.exists(p) else default
if verb == 'describe' and queued:   # the node of a queued resource comes up at once here
  if not os.path.exists(state):
    sys.stderr.write('ERROR: NOT_FOUND\\n'); sys.exit(1)
  print('ACTIVE'); sys.exit(0)
if verb == 'describe':
  if not os.path.exists(state):
    sys.stderr.write('ERROR: NOT_FOUND\\n'); sys.exit(1)
  print(read('state')); sys.exit(0)
if verb == 'create':
  if os.path.exists(state):
    sys.stderr.write('ERROR: ALREADY_EXISTS\\n'); sys.exit(1)
  fails = read('create_fails')   # 'quota' (always) or 'capacity:N' (the first N creates)
  if fails == 'quota':
    sys.stderr.write('ERROR: Quota exceeded for TPUS_PER_TPU_FAMILY\\n'); sys.exit(1)
  if fails.startswith('capacity:') and int(fails.split(':')[1]) > 0:
    open(os.path.join(d, 'create_fails'), 'w').write(f'capacity:{{int(fails.split(":")[1]) - 1}}')
    sys.stderr.write('ERROR: There is no more capacity in the zone\\n'); sys.exit(1)
  open(state, 'w').write('READY'); sys.exit(0)
if verb == 'delete':
  os.remove(state)
  shutil.rmtree(os.path.join(home, 'prompt-transfer'), ignore_errors=True)  # a new disk
  sys.exit(0)
if read('state') != 'READY':
  sys.stderr.write('ssh: connect: no route to host\\n'); sys.exit(255)
if verb == 'scp':
  src, dest = [a for a in args[4:] if not a.startswith('--')]
  assert dest.endswith(':') and '--recurse' in args and '--worker=all' in args, args
  shutil.copytree(src, os.path.join(home, os.path.basename(src)), dirs_exist_ok=True)
  sys.exit(0)
if verb == 'ssh':
  assert '--worker=all' in args, args
  command = next(a[len('--command='):] for a in args if a.startswith('--command='))
  if 'exec t5x' not in command:
    sys.exit(0)   # install / stop-leftovers: logged, not run
  runs = int(read('runs', '0')) + 1
  open(os.path.join(d, 'runs'), 'w').write(str(runs))
  rc = subprocess.call(['bash', '-c', command], cwd=home, env=dict(os.environ, HOME=home, TPU_WORKER_ID='0'))
  scenario = read('scenario').split(',')
  outcome = scenario[runs - 1] if runs <= len(scenario) else 'ok'
  if rc != 0 or outcome == 'fail':
    sys.exit(rc or 1)
  if outcome == 'preempt':
    open(state, 'w').write('PREEMPTED'); sys.exit(255)
  sys.exit(0)
sys.exit(f'unexpected gcloud call {{args}}')
"""


@pytest.fixture
def fake_tpu(tmp_path, fakes):
  """fake gcloud + a tiny git checkout to install + a fake t5x on the workers."""
  bindir, env, _ = fakes
  if shutil.which('git') is None:
    pytest.skip('git is needed to stage a checkout')
  d = tmp_path / 'gcloud'
  (d / 'home' / '.local' / 'bin').mkdir(parents=True)
  _write_exe(bindir / 'gcloud', FAKE_GCLOUD)
  _write_exe(d / 'home' / '.local' / 'bin' / 't5x', FAKE_T5X)
  repo = tmp_path / 'checkout'
  repo.mkdir()
  (repo / 'setup.py').write_text('# the package\n')
  (repo / '.gitignore').write_text('.venv/\n')
  (repo / '.venv').mkdir()
  (repo / '.venv' / 'big').write_text('not copied')
  subprocess.run(['git', 'init', '-q', str(repo)], check=True)
  subprocess.run(['git', '-C', str(repo), 'add', 'setup.py', '.gitignore'], check=True)
  (repo / 'untracked.gin').write_text('# copied too\n')
  env = dict(env, FAKE_GCLOUD_DIR=str(d), FAKE_T5X_LOG=str(tmp_path / 't5x.log'))

  def launch(scenario, *extra):
    (d / 'scenario').write_text(scenario)
    return run('tpu_vm.sh', *TPU, '--spot', '--repo', str(repo), '--retry-wait', '0', *extra,
               '--', *T5X_ARGS, '--gin.MODEL_DIR="/mnt/shared/run"', env=env)

  def calls():
    return [json.loads(l) for l in open(d / 'calls')]

  def t5x_runs():
    p = tmp_path / 't5x.log'
    return [json.loads(l) for l in open(p)] if p.exists() else []

  return launch, calls, t5x_runs, d


def _verbs(calls):
  return [c[3] for c in calls]


def test_tpu_preemption_recreates_and_reruns_the_same_command(fake_tpu):
  launch, calls, t5x_runs, d = fake_tpu
  proc = launch('preempt,ok')
  assert proc.returncode == 0, proc.stderr
  # Queued resources: create + describe (ACTIVE); the node's describe after the failure.
  assert _verbs(calls()) == ['create', 'describe', 'scp', 'ssh', 'ssh', 'describe',  # run 1
                             'delete', 'create', 'describe', 'scp', 'ssh', 'ssh']  # run 2
  assert [c[2] for c in calls() if c[3] in ('create', 'delete')] == ['queued-resources'] * 3
  assert '--force' in next(c for c in calls() if c[3] == 'delete')
  runs = t5x_runs()
  assert len(runs) == 2
  expected = T5X_ARGS + ['--gin.MODEL_DIR="/mnt/shared/run"']
  assert runs[0]['argv'] == runs[1]['argv'] == expected
  assert runs[0]['cwd'].endswith('home/prompt-transfer') and runs[0]['env']['TPU_WORKER_ID'] == '0'
  # The staged copy: tracked and untracked files, not the ignored .venv.
  staged = d / 'home' / 'prompt-transfer'
  assert (staged / 'setup.py').exists() and (staged / 'untracked.gin').exists()
  assert not (staged / '.venv').exists()
  assert 'PREEMPTED' in proc.stderr and 'restart 1/5' in proc.stderr
  # The same ssh --command both times.
  ssh_runs = [c for c in calls() if c[3] == 'ssh' and any('exec t5x' in a for a in c)]
  assert len(ssh_runs) == 2 and ssh_runs[0] == ssh_runs[1]


def test_tpu_failure_on_ready_vm_reruns_without_recreating(fake_tpu):
  launch, calls, t5x_runs, _ = fake_tpu
  proc = launch('fail,ok')
  assert proc.returncode == 0, proc.stderr
  # describe says READY: stop leftovers (ssh), run again (ssh); no delete/create/install.
  assert _verbs(calls()) == ['create', 'describe', 'scp', 'ssh', 'ssh', 'describe', 'ssh', 'ssh']
  assert 'kill' in calls()[6][-1] and '.t5x.pid' in calls()[6][-1]
  assert len(t5x_runs()) == 2


def test_tpu_gives_up_after_max_restarts(fake_tpu):
  launch, calls, t5x_runs, _ = fake_tpu
  proc = launch('preempt,preempt,preempt', '--max-restarts', '1')
  assert proc.returncode == 255
  assert 'giving up after 1 restart' in proc.stderr
  assert len(t5x_runs()) == 2


def test_tpu_failure_before_the_first_run_is_not_retried(fake_tpu):
  launch, calls, t5x_runs, d = fake_tpu
  (d / 'create_fails').write_text('quota')
  proc = launch('ok')
  assert proc.returncode == 1
  assert _verbs(calls()) == ['create'] and t5x_runs() == []
  assert 'failed before t5x started' in proc.stderr


def test_tpu_create_without_capacity_is_retried_without_using_restarts(fake_tpu):
  launch, calls, t5x_runs, d = fake_tpu
  (d / 'create_fails').write_text('capacity:2')
  proc = launch('ok', '--max-restarts', '0', '--no-queued')
  assert proc.returncode == 0, proc.stderr
  assert _verbs(calls())[:6] == ['create', 'describe', 'create', 'describe', 'create', 'scp']
  assert 'create retry 2/10' in proc.stderr and len(t5x_runs()) == 1
  (d / 'create_fails').write_text('capacity:5')
  (d / 'state').unlink()
  proc = launch('ok', '--capacity-retries', '1', '--no-queued')
  assert proc.returncode == 1 and 'failed before t5x started' in proc.stderr


def test_tpu_delete_when_done_also_after_giving_up(fake_tpu):
  launch, calls, _, d = fake_tpu
  proc = launch('fail,fail,fail', '--max-restarts', '1', '--delete-when-done')
  assert proc.returncode != 0
  assert 'giving up after 1 restart' in proc.stderr
  assert _verbs(calls())[-1] == 'delete'   # no billed VM left behind
  proc = launch('fail,fail,fail', '--max-restarts', '0')
  assert 'still there (and billed)' in proc.stderr and _verbs(calls())[-1] != 'delete'


def test_tpu_reuse_skips_create_when_ready(fake_tpu):
  launch, calls, t5x_runs, d = fake_tpu
  (d / 'state').write_text('READY')
  proc = launch('ok', '--reuse', '--delete-when-done')
  assert proc.returncode == 0, proc.stderr
  assert _verbs(calls()) == ['describe', 'scp', 'ssh', 'ssh', 'delete']
  assert len(t5x_runs()) == 1


# ---------------------------------------------------------------------------
# slurm_gpu.sh.
# ---------------------------------------------------------------------------
SLURM = ['--nodes', '2', '--gpus-per-node', '4', '--partition', 'gpu', '--time', '02:00:00',
         '--job-name', 'pt', '--account', 'proj']


def _batch_script(stdout):
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith('# ---- batch script'))
  end = lines.index('# ---- end of batch script ----')
  return '\n'.join(lines[start + 1:end]) + '\n', lines[end + 1:]


def test_slurm_dry_run_script(fakes):
  _, env, calls = fakes
  proc = run('slurm_gpu.sh', '--dry-run', *SLURM, '--model-dir', '/shared/runs/x', '--',
             *T5X_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  assert not calls.exists()
  script, rest = _batch_script(proc.stdout)
  assert rest == [f'sbatch {env["TMPDIR"]}/slurm_gpu.XXXXXX']
  header = [l for l in script.splitlines() if l.startswith('#SBATCH')]
  assert header == ['#SBATCH --job-name=pt', '#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1',
                    '#SBATCH --gpus-per-node=4', '#SBATCH --exclusive', '#SBATCH --mem=0',
                    '#SBATCH --partition=gpu',
                    '#SBATCH --account=proj', '#SBATCH --time=02:00:00',
                    '#SBATCH --output=slurm-%x-%j.out', '#SBATCH --open-mode=append',
                    f'#SBATCH --chdir={ROOT}', '#SBATCH --requeue', '#SBATCH --signal=B:USR1@300']
  assert script.startswith('#!/bin/bash\n')
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
  assert 'srun --kill-on-bad-exit=1' in script
  for flag in ('--coordinator_address="$COORDINATOR_ADDRESS"', '--process_count="$SLURM_NTASKS"',
               '--process_index="$SLURM_PROCID"', '--multiprocess_gpu'):
    assert flag in script
  assert 'scontrol requeue "$SLURM_JOB_ID"' in script
  cmd_line = next(l for l in script.splitlines() if l.startswith('CMD=('))
  assert shlex.split(cmd_line[len('CMD=('):-1]) == ['t5x'] + T5X_ARGS + [
      '--gin.MODEL_DIR="/shared/runs/x"']
  subprocess.run(['bash', '-n'], input=script, text=True, check=True)   # valid bash


FAKE_SRUN = f"""#!{sys.executable} -S
# Runs the step's command once per task, as srun would, with SLURM_PROCID etc. set.
import json, os, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ['FAKE_SLURM_LOG'], 'a') as f:
  f.write(json.dumps(['srun'] + args) + '\\n')
while args[0].startswith('--'):
  args = args[1:]
nodes, per_node = int(os.environ['SLURM_JOB_NUM_NODES']), int(os.environ['SLURM_NTASKS_PER_NODE'])
import signal
got_usr1 = []
def on_usr1(*_):  # srun forwards USR1 to the tasks; they checkpoint and exit 75
  got_usr1.append(1)
  with open(os.environ['FAKE_SLURM_LOG'], 'a') as f:
    f.write('srun forwarded USR1\\n')
signal.signal(signal.SIGUSR1, on_usr1)
open(os.environ['FAKE_SLURM_LOG'] + '.started', 'w').close()
time.sleep(float(os.environ.get('FAKE_SRUN_SLEEP', '0')))
rc = 0
for i in range(nodes * per_node):
  env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
             SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_NODELIST=os.environ['SLURM_JOB_NODELIST'])
  rc = max(rc, subprocess.call(args, env=env))
sys.exit(rc)
"""


@pytest.fixture
def fake_slurm(tmp_path, fakes):
  bindir, env, _ = fakes
  log = tmp_path / 'slurm.log'
  _write_exe(bindir / 'srun', FAKE_SRUN)
  _write_exe(bindir / 'scontrol', f"""#!/bin/sh
echo "scontrol $*" >> {shlex.quote(str(log))}
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node07\\ngpu-node08\\n'; fi
""")
  _write_exe(bindir / 'sbatch', f"""#!/bin/sh
cp "$1" {shlex.quote(str(tmp_path / 'submitted.sbatch'))}
echo "Submitted batch job 4242"
""")
  fake_t5x = _write_exe(tmp_path / 'fake_t5x', FAKE_T5X)
  env = dict(env, FAKE_SLURM_LOG=str(log), FAKE_T5X_LOG=str(tmp_path / 't5x.log'),
             T5X=str(fake_t5x), SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='gpu-node[07-08]',
             SLURM_JOB_NUM_NODES='2')
  return env, tmp_path


def _job_env(env, per_node):
  return dict(env, SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(2 * per_node))


@pytest.mark.parametrize('per_gpu', [False, True])
def test_slurm_batch_script_runs_one_process_per_node_or_gpu(fake_slurm, per_gpu):
  env, tmp = fake_slurm
  extra = ['--process-per-gpu'] if per_gpu else []
  proc = run('slurm_gpu.sh', *SLURM, *extra, '--script', str(tmp / 'job.sbatch'), '--',
             *T5X_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  assert 'Submitted batch job 4242' in proc.stdout
  submitted = (tmp / 'submitted.sbatch').read_text()
  dry = run('slurm_gpu.sh', '--dry-run', *SLURM, *extra, '--script', str(tmp / 'job.sbatch'),
            '--', *T5X_ARGS, env=env)
  script, rest = _batch_script(dry.stdout)
  assert submitted == script and rest == [f'sbatch {tmp}/job.sbatch']
  # Run the batch script as SLURM would, with the fake srun and scontrol.
  per_node = 4 if per_gpu else 1
  job = subprocess.run(['bash', str(tmp / 'job.sbatch')], env=_job_env(env, per_node), cwd=tmp,
                       capture_output=True, text=True, timeout=30)
  assert job.returncode == 0, job.stdout + job.stderr
  runs = [json.loads(l) for l in open(tmp / 't5x.log')]
  assert len(runs) == 2 * per_node
  for i, r in enumerate(runs):
    assert r['argv'] == T5X_ARGS + ['--coordinator_address=gpu-node07:24242',  # 20000 + job id
                                    f'--process_count={2 * per_node}', f'--process_index={i}',
                                    '--multiprocess_gpu']
    if per_gpu:
      assert r['env']['JAX_LOCAL_DEVICE_IDS'] == str(i % 4)
    else:   # JAX's Slurm detection would pin the process to GPU $SLURM_LOCALID
      assert r['env']['SLURM_LOCALID'] is None and r['env']['JAX_LOCAL_DEVICE_IDS'] is None


def test_slurm_whole_nodes_gpu_platform_and_one_bound_gpu_per_task(fake_slurm):
  env, tmp = fake_slurm
  dry = run('slurm_gpu.sh', '--dry-run', *SLURM, '--', *T5X_ARGS, env=env)
  script, _ = _batch_script(dry.stdout)
  assert '#SBATCH --exclusive' in script and '#SBATCH --mem=0' in script
  shared, _ = _batch_script(run('slurm_gpu.sh', '--dry-run', *SLURM, '--shared', '--',
                                *T5X_ARGS, env=env).stdout)
  assert '--exclusive' not in shared and '--mem=0' not in shared
  # A site that binds one GPU per task: each process sees one GPU, its device 0.
  proc = run('slurm_gpu.sh', *SLURM, '--process-per-gpu', '--script', str(tmp / 'job.sbatch'),
             '--', *T5X_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  job = subprocess.run(['bash', str(tmp / 'job.sbatch')],
                       env=dict(_job_env(env, 4), CUDA_VISIBLE_DEVICES='5'), cwd=tmp,
                       capture_output=True, text=True, timeout=30)
  assert job.returncode == 0, job.stdout + job.stderr
  runs = [json.loads(l) for l in open(tmp / 't5x.log')]
  assert len(runs) == 8 and {r['env']['JAX_LOCAL_DEVICE_IDS'] for r in runs} == {'0'}
  assert {r['env']['PROMPT_TRANSFER_PLATFORM'] for r in runs} == {'gpu'}


def test_a_platform_the_installed_jax_lacks_is_refused(monkeypatch, capsys):
  from in_process import refused_here
  monkeypatch.setenv('PROMPT_TRANSFER_PLATFORM', 'tpu')
  code, err = refused_here(capsys, 'train', '--gin_file=runs/quickstart.gin',
                           '--gin.MODEL_DIR=/nonexistent/never_written')
  assert code == 2 and 'jax[tpu]' in err and 'JAX runs on cpu' in err, err


def test_slurm_batch_script_requeues_near_the_time_limit(fake_slurm):
  env, tmp = fake_slurm
  script = tmp / 'job.sbatch'
  proc = run('slurm_gpu.sh', *SLURM, '--port', '31337', '--script', str(script), '--', 'train',
             env=env)
  assert proc.returncode == 0, proc.stderr
  job = subprocess.Popen(['bash', str(script)], env=dict(_job_env(env, 1), FAKE_SRUN_SLEEP='0.8'),
                         cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  started = tmp / 'slurm.log.started'
  deadline = time.time() + 10
  while not started.exists() and time.time() < deadline:
    time.sleep(0.02)
  job.send_signal(signal.SIGUSR1)          # what --signal=B:USR1@300 sends
  out, _ = job.communicate(timeout=20)
  assert job.returncode == 0, out          # waited for srun to finish
  log = (tmp / 'slurm.log').read_text()
  # The tasks heard it (to checkpoint) before the job was requeued.
  assert log.index('srun forwarded USR1') < log.index('scontrol requeue 4242'), log
  runs = [json.loads(l) for l in open(tmp / 't5x.log')]
  assert [r['argv'][1] for r in runs] == ['--coordinator_address=gpu-node07:31337'] * 2


# ---------------------------------------------------------------------------
# local.sh --dry-run.
# ---------------------------------------------------------------------------
def test_local_dry_run_quotes_commands(fakes, tmp_path):
  _, env, _ = fakes
  proc = run('local.sh', '2', '--dry-run', '--port', '4321', '--', *T5X_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert shlex.split(line) == ['t5x'] + T5X_ARGS + [
        '--coordinator_address=localhost:4321', '--process_count=2', f'--process_index={i}']
  # Without --port both processes still get the same (free) port.
  lines = run('local.sh', '2', '--dry-run', '--', 'train', env=env).stdout.splitlines()
  ports = {option(shlex.split(l), '--coordinator_address') for l in lines}
  assert len(lines) == 2 and len(ports) == 1
  # The printed line, run by a shell, gives t5x exactly these arguments.
  fake = _write_exe(tmp_path / 'fake_t5x', FAKE_T5X)
  env = dict(env, T5X=str(fake), FAKE_T5X_LOG=str(tmp_path / 'log'))
  line = run('local.sh', '1', '--dry-run', '--port', '4321', '--', *T5X_ARGS,
             env=env).stdout.splitlines()[0]
  subprocess.run(['bash', '-c', line], env=env, check=True)
  assert json.loads(open(tmp_path / 'log').read())['argv'] == T5X_ARGS + [
      '--coordinator_address=localhost:4321', '--process_count=1', '--process_index=0']


def test_local_sh_splits_the_gpus_of_a_gpu_host(fakes, tmp_path):
  bindir, env, _ = fakes
  _write_exe(bindir / 'nvidia-smi', '#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: H100 (UUID: x)"; done\n')
  fake_t5x = _write_exe(tmp_path / 'fake_t5x', FAKE_T5X)
  env = dict(env, T5X=str(fake_t5x), FAKE_T5X_LOG=str(tmp_path / 't5x.log'))
  env.pop('CUDA_VISIBLE_DEVICES', None)
  proc = run('local.sh', '2', '--', 'train', env=env)
  assert proc.returncode == 0, proc.stderr
  runs = sorted((json.loads(l) for l in open(tmp_path / 't5x.log')), key=lambda r: r['argv'][-1])
  assert [r['env']['CUDA_VISIBLE_DEVICES'] for r in runs] == ['0,1', '2,3']
