"""Running `t5x` commands inside the test process."""
import contextlib
import io
import subprocess


def t5x_here(*args: str) -> subprocess.CompletedProcess:
  """`t5x ARGS` in this test process: the imports and compiled programs of
  earlier tests are reused (a `t5x` subprocess spends 15-30 s on them). For
  tests that need no fresh process (no device count, kill or process-level
  output). Returns what the command printed, as subprocess.run would; fails
  on a non-zero exit."""
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  out, err = io.StringIO(), io.StringIO()
  gin.clear_config()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = cli.run(list(args))
  finally:
    gin.clear_config()
  assert code == 0, f't5x {" ".join(args)}: exit {code}\n{err.getvalue()[-3000:]}'
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def refused_here(capsys, *args: str) -> tuple:
  """(exit code, stderr) of a `t5x` command run in this test process that
  is expected to stop with an error (capsys: pytest's fixture)."""
  import gin  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  capsys.readouterr()
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(list(args))
  finally:
    gin.clear_config()
  return e.value.code, capsys.readouterr().err
