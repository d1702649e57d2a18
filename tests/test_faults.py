"""Fault injection: reused work dirs, corrupt checkpoints and files, a full disk, Ctrl-C, and
runs / sweeps killed (SIGKILL) at random moments that must resume to the unbroken result."""
import errno
import importlib.util
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import pytest

from conftest import signal_at_batch, small_config
from experiments.train import checkpoint, loop
from experiments.train.build import build_run
from lpa_jax.train.step import make_mesh
from experiments.train.workdir import ConfigMismatch, disk_full, write_json_atomic

REPO = pathlib.Path(__file__).resolve().parents[1]
# The LPA run of the kill tests, as command-line overrides of longtail.py:quick (= small_config).
CLI = ["--config.data.n_max=100", "--config.data.test_subset=500", "--config.model.name=mlp",
       "--config.model.kwargs.widths=(64, 32)", "--config.optim.batch_size=32",
       "--config.optim.warmup_epochs=0", "--config.perturb.activation=lpa", "--noprogress"]


def _cli_config(epochs):
  return small_config(**{"optim.batch_size": 32, "optim.num_epochs": epochs,
                         "perturb.activation": "lpa"})


def _rows(workdir):
  return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _same_run(a, b):
  for key in ("steps", "test_accuracy", "per_class_accuracy", "shot_accuracy"):
    assert a[key] == b[key], key


# ------------------------------------------------------------------ one config per work dir

def test_rerun_with_another_config_is_refused_naming_the_fields(tmp_path, fmnist_lt):
  wd = str(tmp_path / "run")
  cfg = small_config(**{"optim.num_epochs": 1})
  first = loop.train_and_evaluate(cfg, wd, progress=False, data=fmnist_lt)
  other = small_config(**{"optim.num_epochs": 1, "optim.lr": 0.01, "seed": 3})
  with pytest.raises(ConfigMismatch, match=r"optim\.lr: 0\.05 \(recorded\) -> 0\.01") as err:
    loop.train_and_evaluate(other, wd, progress=False, data=fmnist_lt)
  assert "seed: 0 (recorded) -> 3" in str(err.value) and "--fresh" in str(err.value)
  assert json.load(open(os.path.join(wd, "results.json"))) == json.loads(json.dumps(first))
  again = loop.train_and_evaluate(other, wd, progress=False, data=fmnist_lt, fresh=True)
  assert again["config"]["optim"]["lr"] == 0.01 and again["config"]["seed"] == 3
  # Where a field only sets how often checkpoints are kept, the run is the same run.
  same = small_config(**{"optim.num_epochs": 1, "optim.lr": 0.01, "seed": 3,
                         "train.checkpoint_every": 5})
  assert loop.train_and_evaluate(same, wd, progress=False, data=fmnist_lt)["steps"] == 3


def test_checkpoint_of_another_method_is_refused_clearly(tmp_path, fmnist_lt):
  plain = build_run(small_config(), fmnist_lt, make_mesh())
  lpa = build_run(small_config(**{"perturb.activation": "lpa"}), fmnist_lt, make_mesh())
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, plain.init_state.replace(step=plain.init_state.step + 1))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"act_state") as err:
    checkpoint.restore_latest(mgr, lpa.init_state)
  assert "partial_restore" not in str(err.value) and "--fresh" in str(err.value)
  # Checkpoints without a recorded config (older versions) cannot be checked: refused too.
  with pytest.raises(ConfigMismatch, match="no recorded config"):
    loop.train_and_evaluate(small_config(), str(tmp_path), progress=False, data=fmnist_lt)


# ------------------------------------------------------------------ checkpoints

def _flip_byte(step_dir: pathlib.Path):
  data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
  target = max(data, key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  target.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_bad_latest_checkpoint_falls_back_to_an_older_one(tmp_path, fmnist_lt, damage):
  run = build_run(small_config(), fmnist_lt, make_mesh())
  mgr = checkpoint.manager(str(tmp_path))
  older = run.init_state.replace(step=run.init_state.step + 1)
  checkpoint.save(mgr, older)
  newer = older.replace(step=older.step + 1, params=jax.tree.map(lambda p: p + 1, older.params))
  checkpoint.save(mgr, newer)
  step_dir = pathlib.Path(mgr.directory) / "2"
  if damage == "flip":
    _flip_byte(step_dir)
  elif damage == "truncate":
    target = next((step_dir / "meta").rglob("*.json"), None) or next((step_dir / "meta").iterdir())
    target.write_bytes(target.read_bytes()[:5])
  else:
    (step_dir / "state" / "_METADATA").unlink()
  with pytest.warns(UserWarning, match=r"checkpoints/2 is unusable"):
    state, _ = checkpoint.restore_latest(mgr, run.init_state)
  assert int(state.step) == 1
  assert checkpoint.digest(state) == checkpoint.digest(older)
  _flip_byte(pathlib.Path(mgr.directory) / "1")
  with pytest.warns(UserWarning), pytest.raises(checkpoint.NoUsableCheckpoint, match="--fresh"):
    checkpoint.restore_latest(mgr, run.init_state)


def test_integrity_check_catches_what_orbax_reads_silently(tmp_path, fmnist_lt, monkeypatch):
  # A bit flipped on disk that still decodes: what comes back has another digest.
  real, calls = checkpoint.digest, []

  def digest(state):
    calls.append(1)
    return real(state) if len(calls) == 1 else "0" * 64  # the save's, then the restore's
  monkeypatch.setattr(checkpoint, "digest", digest)
  run = build_run(small_config(), fmnist_lt, make_mesh())
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, run.init_state.replace(step=run.init_state.step + 1))
  with pytest.warns(UserWarning, match="integrity check failed"), \
      pytest.raises(checkpoint.NoUsableCheckpoint):
    checkpoint.restore_latest(mgr, run.init_state)


def test_kill_between_metrics_row_and_checkpoint_leaves_one_row_per_epoch(tmp_path, fmnist_lt):
  cfg = small_config(**{"optim.batch_size": 32})
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), progress=False, data=fmnist_lt)
  part = tmp_path / "part"
  loop.train_and_evaluate(cfg, str(part), progress=False, data=fmnist_lt)
  # As if killed after epoch 2's row was written but before its checkpoint and results.
  (part / "results.json").unlink()
  mgr = checkpoint.manager(str(part))
  mgr.delete(mgr.latest_step())
  with open(part / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 3, "step"')  # and a torn line from a kill mid-write
  resumed = loop.train_and_evaluate(cfg, str(part), progress=False, data=fmnist_lt)
  _same_run(resumed, full)
  assert _rows(part) == _rows(tmp_path / "full") and [r["epoch"] for r in _rows(part)] == [1, 2]


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, fmnist_lt, monkeypatch):
  cfg = small_config(**{"optim.batch_size": 32})
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), progress=False, data=fmnist_lt)
  signal_at_batch(monkeypatch, signal.SIGINT)  # mid-epoch 2
  part = str(tmp_path / "part")
  # Other tests in this process may have left SIGINT ignored: start from Python's default
  # handler, and check the loop puts back the one it found.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved at step 10 in .*rerun"):
      loop.train_and_evaluate(cfg, part, progress=False, data=fmnist_lt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
  finally:
    signal.signal(signal.SIGINT, previous)
  _same_run(loop.train_and_evaluate(cfg, part, progress=False, data=fmnist_lt), full)
  assert _rows(part) == _rows(tmp_path / "full")


def test_fresh_removes_every_output_of_the_old_run(tmp_path):
  # --fresh used to leave the old run's predictions.npz (read by the report's paired tests
  # beside the new results.json) and a sweep's stopped.json (which would skip the new run).
  from experiments.train.workdir import claim
  wd = tmp_path / "run"
  for sub in ("checkpoints/3", "tensorboard"):
    (wd / sub).mkdir(parents=True)
  for name in ("metrics.jsonl", "results.json", "predictions.npz", "stopped.json",
               "config.json", "method.json"):
    (wd / name).write_text("{}")
  claim(str(wd), small_config(), fresh=True)
  assert sorted(os.listdir(wd)) == ["config.json", "method.json"]  # method.json: the sweep's
  assert json.load(open(wd / "config.json"))["optim"]["lr"] == small_config().optim.lr


# ------------------------------------------------------------------ files and errors

def test_atomic_json_keeps_the_old_file_and_writes_no_nan(tmp_path, monkeypatch):
  path = str(tmp_path / "results.json")
  write_json_atomic(path, {"acc": float("nan"), "few": [1.0, float("inf")]})
  assert open(path).read().replace(" ", "").replace("\n", "") == '{"acc":null,"few":[1.0,null]}'
  monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(
      errno.ENOSPC, "No space left on device")))
  with pytest.raises(OSError):
    write_json_atomic(path, {"acc": 1.0})
  assert json.load(open(path)) == {"acc": None, "few": [1.0, None]}
  assert os.listdir(tmp_path) == ["results.json"]


def test_full_disk_reports_the_original_error(tmp_path, fmnist_lt, monkeypatch):
  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/3")

  class Writer:  # a TensorBoard writer whose close fails on the same full disk
    def add_scalar(self, *a):
      pass

    def close(self):
      raise OSError(errno.ENOSPC, "No space left on device", "tensorboard/events")
  monkeypatch.setattr(checkpoint, "save", full)
  monkeypatch.setattr(loop, "_writer", lambda workdir: Writer())
  with pytest.raises(OSError) as err:
    loop.train_and_evaluate(small_config(), str(tmp_path), progress=False, data=fmnist_lt)
  assert err.value.filename == "checkpoints/3"
  # What the entry point prints first, even when a library wraps the error in its own.
  try:
    try:
      raise err.value
    except OSError as inner:
      raise ValueError("tensorstore: write failed") from inner
  except ValueError as wrapped:
    assert disk_full(wrapped).startswith("[Errno 28] No space left on device")
  assert disk_full(ValueError("shape mismatch")) is None


def test_config_that_fails_to_build_leaves_no_work_dir(tmp_path, fmnist_lt):
  cfg = small_config(**{"perturb.activation": "lpa", "perturb.lpa.point": "stage3"})
  with pytest.raises(ValueError, match="hidden1"):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"), progress=False, data=fmnist_lt)
  assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ processes killed for real

def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def _launch(args, log):
  return subprocess.Popen([sys.executable, "-m"] + args, cwd=REPO, env=_env(),
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc, ready, rng):
  """SIGKILLs ``proc`` within 0.2 s after ``ready()`` first holds; False if it ended first."""
  t_end = time.time() + 300
  while not ready() and proc.poll() is None and time.time() < t_end:
    time.sleep(0.01)
  time.sleep(rng.uniform(0, 0.2))  # in a step, a save, a metrics row or an evaluation
  killed = proc.poll() is None
  if killed:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  return killed


def _saved_step(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
  return max(steps, default=0)


def _steps_done(workdir, at_least=1):
  return lambda: _saved_step(workdir) >= at_least


@pytest.mark.slow  # 76 s; test_train/test_survival resume exactly in the default run
def test_killed_lpa_run_resumes_to_the_unbroken_result(tmp_path, fmnist_lt):
  epochs = 6
  full = loop.train_and_evaluate(_cli_config(epochs), str(tmp_path / "full"), progress=False,
                                 data=fmnist_lt)
  spe = full["steps"] // epochs
  wd = str(tmp_path / "killed")
  args = ["experiments.main", f"--workdir={wd}", f"--config.optim.num_epochs={epochs}"] + CLI
  rng = random.Random(0)
  with open(tmp_path / "log.txt", "w") as log:
    epoch = rng.randint(1, epochs - 3)  # a random epoch; within it, a random moment
    assert _kill_when(_launch(args, log), _steps_done(wd, epoch * spe), rng)
    assert not os.path.exists(os.path.join(wd, "results.json"))
    assert subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=_env(), stdout=log,
                          stderr=subprocess.STDOUT, timeout=300).returncode == 0
  _same_run(json.load(open(os.path.join(wd, "results.json"))), full)
  assert _rows(wd) == _rows(tmp_path / "full")
  assert [r["epoch"] for r in _rows(wd)] == list(range(1, epochs + 1))
  # The same work dir with another value: one message naming the field, no traceback.
  res = subprocess.run([sys.executable, "-m"] + args + ["--config.optim.lr=0.01"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert res.returncode == 1 and "Traceback" not in res.stderr
  assert "optim.lr: 0.05 (recorded) -> 0.01 (now)" in res.stderr


SUITE = """
from experiments.configs import suites

def get_config(arg=None):
  c = suites.get_config("smoke")
  c.overrides = c.overrides + (("optim.num_epochs", 4),)
  return c
"""


def _load_module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_unbroken_results(tmp_path):
  from experiments import sweep
  spec = tmp_path / "suite.py"
  spec.write_text(SUITE)
  suite = _load_module(spec).get_config()
  full = tmp_path / "full"
  assert sweep.run_suite(suite, str(full), progress=False, report=False)["ran"] == 2
  root = tmp_path / "killed"
  args = ["experiments.sweep", f"--config={spec}", f"--root={root}", "--noprogress",
          "--noreport"]
  rng = random.Random(1)
  spe = json.load(open(full / "runs" / "ce" / "seed0" / "results.json"))["steps"] // 4
  with open(tmp_path / "log.txt", "w") as log:
    for slug in ("ce", "lpa"):  # once in each run, at a random epoch
      done = _steps_done(root / "runs" / slug / "seed0", rng.randint(1, 2) * spe)
      assert _kill_when(_launch(args, log), done, rng)
      assert not (root / "runs" / slug / "seed0" / "results.json").exists()
    assert subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=_env(), stdout=log,
                          stderr=subprocess.STDOUT, timeout=300).returncode == 0
  for slug in ("ce", "lpa"):
    a, b = (r / "runs" / slug / "seed0" for r in (root, full))
    _same_run(json.load(open(a / "results.json")), json.load(open(b / "results.json")))
    assert _rows(a) == _rows(b) and [r["epoch"] for r in _rows(a)] == [1, 2, 3, 4]


@pytest.mark.slow  # 20 s; test_survival's early Ctrl-C covers the message and exit code
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
  wd = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.main", f"--workdir={wd}",
                           "--config.optim.num_epochs=300"] + CLI, cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t_end = time.time() + 300
  while not _steps_done(wd)() and proc.poll() is None and time.time() < t_end:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, (out + err)[-3000:]
  assert "Traceback" not in out + err
  assert [x for x in err.splitlines() if x.startswith("Interrupted")] == [
      x for x in err.splitlines() if "Interrupted" in x]
  assert len([x for x in err.splitlines() if "Interrupted" in x]) == 1
  assert "rerun the same command" in err


def test_invalid_config_fails_without_making_the_work_dir(tmp_path):
  wd = tmp_path / "run"
  res = subprocess.run([sys.executable, "-m", "experiments.main", f"--workdir={wd}",
                        "--config.optim.lr=-1"] + CLI, cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "config.optim.lr=-1" in res.stderr
  assert not wd.exists()
