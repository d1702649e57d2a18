"""Hostile surroundings (issue 18): a second process on one work dir or sweep root, damaged
metrics and cache files, leftovers of a killed write, a Ctrl-C in the first seconds, bad values,
a radius that perturbs nothing, and user errors that must print one line."""
import errno
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import small_config
from experiments.train import checkpoint, loop
from experiments.train.history import HistoryDamaged
from experiments.train.lock import Busy, hold
from experiments.train.workdir import claim

REPO = pathlib.Path(__file__).resolve().parents[1]
CLI = ["--config.data.n_max=100", "--config.data.test_subset=500", "--config.model.name=mlp",
       "--config.model.kwargs.widths=(64, 32)", "--config.optim.batch_size=32",
       "--config.optim.warmup_epochs=0", "--config.perturb.activation=lpa", "--noprogress"]
# Holds a lock from another process without importing JAX (the module loaded by its path).
HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
    lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)
    start = float(sys.argv[4])
    while time.time() < start:
      time.sleep(0.001)
    try:
      with lock.hold(sys.argv[2], sys.argv[3]):
        print("got", flush=True)
        time.sleep(float(sys.argv[5]))
    except lock.Busy:
      print("busy", flush=True)
""")
LOCK_PY = str(REPO / "experiments" / "train" / "lock.py")


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def _default_sigint():
  # A child inherits an ignored SIGINT (and keeps it, as Python does): an earlier test may have
  # left this process ignoring it.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _holder(directory, name=".lock", start=0.0, hold_s=60.0):
  return subprocess.Popen([sys.executable, "-c", HOLDER, LOCK_PY, str(directory), name,
                           str(start), str(hold_s)], stdout=subprocess.PIPE, text=True)


def _wait_got(proc):
  assert proc.stdout.readline().strip() == "got"


def _rows(workdir):
  return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _main(args, **kw):
  return subprocess.run([sys.executable, "-m", "experiments.main"] + args, cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300, **kw)


def _lines(text):
  return [x for x in text.splitlines() if x.strip()]


# ------------------------------------------------------------------ one process per work dir

def test_lock_refuses_a_second_process_and_takes_over_a_dead_ones(tmp_path):
  holder = _holder(tmp_path)
  _wait_got(holder)
  with pytest.raises(Busy, match=rf"in use by pid {holder.pid} on host .*, started 20"):
    with hold(str(tmp_path)):
      pass
  holder.kill()  # SIGKILL: no clean-up, the lock file and its record stay behind
  holder.wait()
  assert json.load(open(tmp_path / ".lock"))["pid"] == holder.pid
  with hold(str(tmp_path)):
    assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    with hold(str(tmp_path)):  # re-entrant within one process (a sweep, then its loop)
      pass
    assert (tmp_path / ".lock").exists()
  assert not (tmp_path / ".lock").exists()


def test_lock_lets_exactly_one_of_many_racing_processes_in(tmp_path):
  start = time.time() + 1.0
  procs = [_holder(tmp_path, start=start, hold_s=1.5) for _ in range(6)]
  outs = [p.communicate(timeout=60)[0].split() for p in procs]
  assert sorted(o[0] for o in outs) == ["busy"] * 5 + ["got"]


def test_two_runs_on_one_work_dir_leave_one_working(tmp_path):
  wd = tmp_path / "run"
  args = [f"--workdir={wd}", "--config.optim.num_epochs=300"] + CLI
  first = subprocess.Popen([sys.executable, "-m", "experiments.main"] + args, cwd=REPO,
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=_default_sigint)
  try:
    # Once epoch 1's row is written the first run holds the work dir and has a row to check
    # (its checkpoint dir appears earlier: on a slow machine the refusal could then come back
    # before any epoch ended).
    t_end, metrics = time.time() + 300, wd / "metrics.jsonl"
    while (not metrics.exists() or not metrics.read_text().strip()) and first.poll() is None \
        and time.time() < t_end:
      time.sleep(0.05)
    second = _main(args)
    assert first.poll() is None  # still training
  finally:
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
  assert second.returncode == 1 and "Traceback" not in second.stderr
  assert len(_lines(second.stderr)) == 1 and "in use by" in second.stderr
  assert f"in use by pid {first.pid} on host" in second.stderr
  assert first.returncode == 130, (out + err)[-2000:]
  epochs = [r["epoch"] for r in _rows(wd)]
  assert epochs == list(range(1, len(epochs) + 1)) and epochs


SUITE = """
from experiments.configs import suites

def get_config(arg=None):
  c = suites.get_config("smoke")
  c.overrides = c.overrides + (("optim.num_epochs", 2),)
  return c
"""


def _suite(tmp_path):
  spec = tmp_path / "suite.py"
  spec.write_text(SUITE)
  module_spec = importlib.util.spec_from_file_location("suite", spec)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return spec, module.get_config()


def test_a_second_sweep_of_one_root_and_shard_is_refused(tmp_path):
  from experiments import sweep
  _, suite = _suite(tmp_path)
  root = tmp_path / "root"
  holder = _holder(root, sweep.lock_name())
  _wait_got(holder)
  try:
    with pytest.raises(Busy, match=rf"Suite root .* in use by pid {holder.pid}"):
      sweep.run_suite(suite, str(root), progress=False, report=False)
    assert not (root / "runs").exists() and not (root / "suite.json").exists()
  finally:
    holder.kill()
    holder.wait()
  assert sweep.lock_name((0, 2)) != sweep.lock_name((1, 2)) != sweep.lock_name()


@pytest.mark.slow
def test_two_concurrent_sweeps_leave_one_working_and_one_row_per_epoch(tmp_path):
  spec, _ = _suite(tmp_path)
  root = tmp_path / "root"
  args = [sys.executable, "-m", "experiments.sweep", f"--config={spec}", f"--root={root}",
          "--noprogress", "--noreport"]
  procs = [subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 1], outs
  refused = outs[[p.returncode for p in procs].index(1)][1]
  assert "in use by pid" in refused and "Traceback" not in refused
  for slug in ("ce", "lpa"):
    assert [r["epoch"] for r in _rows(root / "runs" / slug / "seed0")] == [1, 2]


# ------------------------------------------------------------------ a damaged metrics.jsonl

@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
  """A validation-selected task (its config, data, unbroken results and work dir)."""
  from experiments.data import load_task_data
  cfg = small_config(**{"optim.batch_size": 32, "optim.num_epochs": 4,
                        "data.val_fraction": 0.3})
  data = load_task_data(cfg.data)
  wd = str(tmp_path_factory.mktemp("full"))
  return cfg, data, loop.train_and_evaluate(cfg, wd, progress=False, data=data), wd


def _damage(path, how):
  lines = open(path).read().splitlines(keepends=True)
  if how == "deleted":
    os.remove(path)
  elif how == "torn":  # one row cut in the middle, the good rows after it kept
    lines[1] = lines[1][:40] + "\n"
    open(path, "w").writelines(lines)
  else:  # "twice": a second process wrote the first rows again
    open(path, "w").writelines(lines[:2] + lines[:2] + lines[2:])


@pytest.mark.parametrize("how", ["deleted", "torn", "twice"])
def test_damaged_history_is_restored_from_the_checkpoint(tmp_path, val_run, how):
  cfg, data, full, full_wd = val_run
  part = str(tmp_path / "part")
  spe = full["steps"] // 4
  assert loop.train_and_evaluate(cfg, part, progress=False, data=data,
                                 max_steps=2 * spe + 2) is None
  _damage(os.path.join(part, "metrics.jsonl"), how)
  with pytest.warns(UserWarning, match="restored the saved rows"):
    resumed = loop.train_and_evaluate(cfg, part, progress=False, data=data)
  assert _rows(part) == _rows(full_wd)
  assert resumed["selected_by_val"] == full["selected_by_val"]
  assert resumed["test_accuracy"] == full["test_accuracy"]


def test_damaged_history_without_a_copy_is_refused(tmp_path, fmnist_lt, monkeypatch):
  # A checkpoint made before checkpoints kept the history: nothing to restore from.
  def old_save(group, mgrs, state, logs, histories, elapsed, force=False):
    for k, mgr in enumerate(mgrs):
      checkpoint.save(mgr, group.state_of(state, k), extra={"epoch_rows": []}, force=force)
  monkeypatch.setattr(loop, "_save_all", old_save)
  cfg = small_config(**{"optim.batch_size": 32, "optim.num_epochs": 4})
  wd = str(tmp_path / "run")
  loop.train_and_evaluate(cfg, wd, progress=False, data=fmnist_lt, max_steps=20)
  _damage(os.path.join(wd, "metrics.jsonl"), "torn")
  with pytest.raises(HistoryDamaged, match=r"holds epochs \[1\], expected 1\.\.2.*--fresh"):
    loop.train_and_evaluate(cfg, wd, progress=False, data=fmnist_lt)


# ------------------------------------------------------------------ files a kill leaves

def test_leftovers_of_killed_writes_are_removed_on_the_next_start(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  names = [f"results.json.tmp{dead.pid}", f"predictions.npz.tmp{dead.pid}.npz",
           f"metrics.jsonl.tmp{dead.pid}"]
  for name in names + [f"config.json.tmp{os.getppid()}"]:  # the last: a live writer's
    (tmp_path / name).write_text("{")
  (tmp_path / "notes.tmp.txt").write_text("mine")
  claim(str(tmp_path), small_config())
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["config.json", f"config.json.tmp{os.getppid()}", "notes.tmp.txt"])


# ------------------------------------------------------------------ an unreadable cache file

def test_unreadable_cache_file_is_named_and_kept(tmp_path, monkeypatch):
  from experiments.data import sources
  path = tmp_path / "arrays" / "mnist__official__tfds.npz"
  raw = sources.RawData(x_train=np.zeros((2, 2), np.uint8), y_train=np.zeros(2, np.int32),
                        x_test=np.zeros((1, 2), np.uint8), y_test=np.zeros(1, np.int32),
                        class_names=["a"], source="official")
  sources._save_npz(path, raw)

  def denied(p, source):
    raise PermissionError(errno.EACCES, "Permission denied", str(p))
  with monkeypatch.context() as m:
    m.setattr(sources, "_load_npz", denied)
    with pytest.raises(sources.CacheUnreadable, match=r"Cannot read the cache file .*"
                       r"mnist__official__tfds.npz \(PermissionError: Permission denied\)"):
      sources._read_cache(path, "official")
  assert path.exists() and sources._read_cache(path, "official").class_names == ["a"]
  path.write_bytes(path.read_bytes()[:30])  # genuinely corrupt: named, removed, rebuilt
  with pytest.warns(UserWarning, match="is corrupt"):
    assert sources._read_cache(path, "official") is None
  assert not path.exists()


# ------------------------------------------------------------------ Ctrl-C in the first seconds

def test_ctrl_c_in_the_first_seconds_exits_130_in_one_line(tmp_path):
  moments = [0.8, 2.0, 3.5, 5.0, "workdir"]  # imports, data, model build, first compile
  procs = []
  for k, _ in enumerate(moments):
    wd = tmp_path / f"run{k}"
    procs.append((wd, subprocess.Popen(
        [sys.executable, "-m", "experiments.main", f"--workdir={wd}",
         "--config.optim.num_epochs=300"] + CLI, cwd=REPO, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint)))
  t0 = time.time()
  for moment, (wd, proc) in sorted(zip(moments, procs), key=lambda m: str(m[0])):
    if moment == "workdir":
      while not (wd / "config.json").exists() and proc.poll() is None and time.time() < t0 + 300:
        time.sleep(0.01)
    else:
      time.sleep(max(0.0, t0 + moment - time.time()))
    proc.send_signal(signal.SIGINT)
  for moment, (_, proc) in zip(moments, procs):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (moment, (out + err)[-2000:])
    assert "Traceback" not in err and len(_lines(err)) == 1, (moment, err[-2000:])
    assert _lines(err)[0].startswith("Interrupted"), (moment, err)


def test_ctrl_c_early_in_a_sweep_exits_130_in_one_line(tmp_path):
  spec, _ = _suite(tmp_path)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", f"--config={spec}",
                           f"--root={tmp_path / 'root'}", "--noprogress", "--noreport"],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=_default_sigint)
  time.sleep(2.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in err, (out + err)[-2000:]
  assert len(_lines(err)) == 1 and _lines(err)[0].startswith("Interrupted"), err


def test_saved_note_says_what_a_work_dir_keeps(tmp_path):
  from experiments import cli
  assert "nothing was saved" in cli.saved_note(str(tmp_path))
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()
  assert "checkpoint at step 7; rerun" in cli.saved_note(str(tmp_path))


# ------------------------------------------------------------------ sweep --stale=rerun

def _older_plan_unreadable_result(tmp_path):
  """A CE-only smoke suite whose run dir holds an older plan's config.json (another lr) and a
  results.json cut short."""
  from experiments import sweep
  from experiments.configs import suites
  from experiments.train.workdir import config_dict, write_json_atomic
  suite = suites.get_config("smoke")
  suite.methods = suite.methods[:1]  # CE only, 1 epoch
  run = sweep.plan(suite)[0]
  wd = tmp_path / "root" / "runs" / "ce" / "seed0"
  wd.mkdir(parents=True)
  older = config_dict(run["config"])
  older["optim"]["lr"] = 0.5
  write_json_atomic(str(wd / "config.json"), older)
  (wd / "results.json").write_text('{"test_accuracy": 0.')
  return suite, run, wd


def test_unreadable_result_of_an_older_plan_is_stale(tmp_path):
  from experiments import sweep
  suite, run, wd = _older_plan_unreadable_result(tmp_path)
  status, detail = sweep.run_status(str(wd), run["config"])
  assert status == "stale" and "optim.lr: 0.5 (recorded)" in detail
  with pytest.raises(sweep.StaleRuns, match="--stale=rerun") as err:
    sweep.run_suite(suite, str(tmp_path / "root"), progress=False, report=False)
  assert "--fresh" not in str(err.value) and "results.json" in str(err.value)


@pytest.mark.slow  # ~20 s: trains the run
def test_stale_rerun_redoes_an_unreadable_result_of_an_older_plan(tmp_path):
  from experiments import sweep
  suite, _, wd = _older_plan_unreadable_result(tmp_path)
  root = tmp_path / "root"
  counts = sweep.run_suite(suite, str(root), progress=False, report=False, stale="rerun")
  assert counts == {"ran": 1, "skipped": 0, "stopped": 0}
  assert json.load(open(wd / "results.json"))["config"]["optim"]["lr"] != 0.5
  assert [r["epoch"] for r in _rows(wd)] == [1]


# ------------------------------------------------------------------ bad values

@pytest.mark.parametrize("field,value", [
    ("optim.lr", float("inf")), ("optim.weight_decay", float("inf")),
    ("optim.momentum", float("nan")), ("data.imbalance_ratio", float("inf")),
    ("data.imbalance_ratio", float("nan")), ("model.kwargs.widths", ("64", 32)),
    ("model.kwargs", {"widths": "64,32"}), ("model.kwargs.widths", (64, 0)),
    ("model.kwargs", {"hidden": (64,)}), ("optim.decay_factors", (0.1, float("inf"))),
])
def test_non_finite_or_wrongly_typed_values_are_refused_naming_the_field(field, value):
  from experiments.configs.common import InvalidConfig, validate
  named = field + (f".{next(iter(value))}" if isinstance(value, dict) else "")
  with pytest.raises(InvalidConfig, match="config." + named.replace(".", r"\.")):
    validate(small_config(**{field: value}))


def test_bad_value_prints_one_line_and_traceback_only_on_request(tmp_path):
  res = _main([f"--workdir={tmp_path / 'run'}", "--config.optim.lr=inf"] + CLI)
  assert res.returncode == 1 and _lines(res.stderr) == [
      "Error: Invalid config value config.optim.lr=inf: must be a finite number"]
  res = _main([f"--workdir={tmp_path / 'run'}", "--config.model.kwargs.widths=abc",
               "--traceback"] + CLI)
  assert res.returncode != 0 and "Traceback" in res.stderr
  assert "config.model.kwargs.widths=('abc'" in res.stderr
  assert not (tmp_path / "run").exists()


def test_user_errors_exit_in_one_line_without_later_noise():
  # A full disk deep inside a writer; a thread that would complain at exit must not be heard.
  code = textwrap.dedent("""
      import atexit, errno
      from experiments import cli
      atexit.register(lambda: print("Traceback (most recent call last): late noise"))
      def body():
        try:
          raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/3")
        except OSError as e:
          raise RuntimeError("tensorstore: write failed") from e
      cli.run_guarded(body, False, lambda: "unused")
  """)
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 1 and res.stdout == ""
  assert len(_lines(res.stderr)) == 1 and res.stderr.startswith("Error: no space left")


def test_corrupt_checkpoint_fallback_is_one_warning(tmp_path, fmnist_lt, capfd):
  from experiments.train.build import build_run
  from lpa_jax.train.step import make_mesh
  run = build_run(small_config(), fmnist_lt, make_mesh())
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, run.init_state.replace(step=run.init_state.step + 1))
  checkpoint.save(mgr, run.init_state.replace(step=run.init_state.step + 2))
  for f in (pathlib.Path(mgr.directory) / "2" / "state").rglob("ocdbt.process_0/d/*"):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  capfd.readouterr()
  with pytest.warns(UserWarning) as warned:
    state, _ = checkpoint.restore_latest(mgr, run.init_state)
  assert int(state.step) == 1 and len(warned) == 1
  assert "TensorStore" not in str(warned[0].message)
  captured = capfd.readouterr()
  assert "Exception ignored" not in captured.err and "Traceback" not in captured.err


# ------------------------------------------------------------------ a method perturbing nothing

def test_check_perturbing_allows_a_balanced_split_before_its_first_signs():
  from experiments.train.guards import NothingPerturbed, check_perturbing
  zeros = {"delta_norm_C": [0.0, 0.0], "sign_C": [0.0, 0.0]}
  check_perturbing(zeros, epoch=1)  # the balanced split signs classes at the end of epoch 1
  check_perturbing({"delta_norm_C": [0.3, 0.1], "sign_C": [0.0, 0.0]}, epoch=3)  # dropout
  check_perturbing({"loss": 1.0}, epoch=3)  # no activation method
  with pytest.raises(NothingPerturbed, match="lpa at point 'hidden1' perturbed nothing in "
                     r"epoch 2.*signed classes: none"):
    check_perturbing(zeros, epoch=2, perturbation=("lpa", "hidden1"))
  with pytest.raises(NothingPerturbed, match=r"epoch 1.*signed classes: \[1\]"):
    check_perturbing({"delta_norm_C": [0.0, 0.0], "sign_C": [0.0, -1.0]}, epoch=1)


def test_nothing_perturbed_names_dead_features_apart_from_a_radius_fault():
  # fmnist_lt_mechanism's "LPA beta=0.9" seed 1: training collapsed, the clean activations at
  # the point died, and the relative radius with them; the message must say so, not blame
  # the radius setting.
  from experiments.train.guards import NothingPerturbed, check_perturbing
  dead = {"delta_norm_C": [0.0, 0.0, 0.0], "sign_C": [-1.0, 1.0, 1.0], "act_norm_C": [0.0] * 3,
          "present_C": [1.0, 1.0, 0.0], "accuracy": 0.41, "test_accuracy": 0.1}
  with pytest.raises(NothingPerturbed, match=r"(?s)the clean activations at the point are "
                     r"zero.*features there died.*training accuracy 41\.0 %.*test accuracy "
                     r"10\.0 %") as err:
    check_perturbing(dead, epoch=9, perturbation=("lpa", "stage2"))
  assert "Check the radius" not in str(err.value)
  alive = {**dead, "act_norm_C": [0.0, 2.5, 0.0]}  # one present class still has features
  with pytest.raises(NothingPerturbed, match="Check the radius") as err:
    check_perturbing(alive, epoch=9, perturbation=("lpa", "stage2"))
  assert "died" not in str(err.value)


def test_diagnostics_report_the_clean_activation_norm():
  import jax.numpy as jnp
  from lpa_jax.perturb.diagnostics import perturbation_diagnostics
  act = jnp.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
  aux = perturbation_diagnostics(act + 1.0, act, jnp.array([0, 1, 0]), 3, None, None, None)
  assert jnp.allclose(aux["act_norm_C"], jnp.array([7.5, 0.0, 0.0]))


def test_absurd_absolute_radius_stops_the_run(tmp_path, fmnist_lt):
  from experiments.train.guards import NothingPerturbed
  cfg = small_config(**{"perturb.activation": "lpa", "perturb.lpa.radius_mode": "absolute",
                        "perturb.lpa.eps": 1e38, "optim.num_epochs": 3})
  with pytest.raises(NothingPerturbed, match="perturbed nothing in epoch"):
    loop.train_and_evaluate(cfg, str(tmp_path), progress=False, data=fmnist_lt)
  assert len(_rows(tmp_path)) < 3
