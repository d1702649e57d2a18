"""One suite root, one plan (issue 35 item 1): a ``--shard=any`` sweep never deletes a run
another plan's process finished, and a root whose ``suite.json`` records another plan is
refused before anything runs."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import sweep
from experiments.configs import suites

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lpa_suite(eps=None, mlp=False):
  """The smoke suite's LPA alone (1 epoch, a few hundred images); ``eps``: another plan;
  ``mlp``: on a small MLP (a third of the CNN's time to compile and train)."""
  suite = suites.get_config("smoke")
  suite.methods = suite.methods[1:]
  if mlp:
    suite.overrides = tuple({**dict(suite.overrides), "model.name": "mlp",
                             "model.kwargs.widths": (32, 16)}.items())
  if eps is not None:
    suite.overrides = tuple((k, eps if k == "perturb.lpa.eps" else v)
                            for k, v in suite.overrides)
  return suite


def _eps(path):
  return json.load(open(path))["config"]["perturb"]["lpa"]["eps"]


def test_any_shard_refuses_a_run_another_plan_finished_meanwhile(tmp_path, monkeypatch):
  # Sweep A (eps 0.015) plans lpa/seed0 as to do; the moment it takes the run, sweep B of
  # another plan (eps 0.02; --stale=rerun, so it replaces the root's plan) has just finished it.
  # A must not delete B's result and train its own: it stops, naming the run and the field.
  root = str(tmp_path / "root")
  mine, other = _lpa_suite(mlp=True), _lpa_suite(eps=0.02, mlp=True)
  take = sweep._take_run
  res = os.path.join(root, "runs", "lpa", "seed0", "results.json")

  def other_plan_first(item, *args, **kw):
    monkeypatch.setattr(sweep, "_take_run", take)
    assert sweep.run_suite(other, root, progress=False, report=False, shard=sweep.ANY,
                           stale="rerun") == {"ran": 1, "skipped": 0, "stopped": 0}
    assert _eps(res) == 0.02
    return take(item, *args, **kw)

  monkeypatch.setattr(sweep, "_take_run", other_plan_first)
  with pytest.raises(sweep.StaleRuns, match=r"runs/lpa/seed0 was made with a config other "
                     r"(.|\n)*  perturb\.lpa\.eps: 0\.02 \(recorded\) -> 0\.015 \(now\)"):
    sweep.run_suite(mine, root, progress=False, report=False, shard=sweep.ANY)
  before = os.path.getmtime(res)
  assert _eps(res) == 0.02  # the other plan's result, untouched
  # --stale=rerun redoes it, as it would have up front.
  assert sweep.run_suite(mine, root, progress=False, report=False, shard=sweep.ANY,
                         stale="rerun") == {"ran": 1, "skipped": 0, "stopped": 0}
  assert _eps(res) == 0.015 and os.path.getmtime(res) > before


def test_a_root_whose_suite_json_records_another_plan_is_refused(tmp_path):
  root = tmp_path / "root"
  suite = suites.get_config("smoke")
  other = _lpa_suite(eps=0.02)  # no CE, another radius
  root.mkdir()
  sweep.write_meta(other, sweep.plan(other), str(root))
  recorded = (root / "suite.json").read_text()
  with pytest.raises(sweep.StaleRuns) as err:  # exit status 2 on the command line, as those
    sweep.run_suite(suite, str(root), progress=False, report=False)
  msg = str(err.value)
  assert type(err.value).__name__ == "OtherPlan"
  assert "root/suite.json records a plan other than this sweep's" in msg and "--stale=rerun" in msg
  assert "overrides.perturb.lpa.eps: 0.02 (recorded) -> 0.015 (now)" in msg
  assert "methods['CE']: '<absent>' (recorded) -> {'name': 'CE'} (now)" in msg
  assert (root / "suite.json").read_text() == recorded and not (root / "runs").exists()
  # A sweep of another --seeds slice of the recorded plan adds its seeds; the machine (not the
  # plan) may differ.
  sweep.write_meta(other, sweep.plan(other, seeds=[2, 3]), str(root))
  meta = json.loads((root / "suite.json").read_text())
  assert meta["seeds"] == [0, 2, 3] and meta["overrides"] == json.loads(recorded)["overrides"]
  assert sweep.plan_diff(meta, sweep.suite_plan(other)) == []
  # --stale=rerun records the sweep's plan instead (nothing here is stale: no runs yet).
  sweep.record_plan(suite, sweep.plan(suite), [("todo", "")] * 2, str(root), "rerun")
  meta = json.loads((root / "suite.json").read_text())
  assert sweep.plan_diff(meta, sweep.suite_plan(suite)) == [] and meta["seeds"] == [0]


def test_the_command_line_refuses_another_plan_in_one_message(tmp_path):
  root = tmp_path / "root"
  other = _lpa_suite(eps=0.02)
  root.mkdir()
  sweep.write_meta(other, sweep.plan(other), str(root))
  res = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=experiments/configs/suites.py:smoke",
       f"--root={root}", "--noprogress", "--noreport"], cwd=REPO, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.startswith("Error: ") and "Traceback" not in res.stderr
  assert "perturb.lpa.eps: 0.02 (recorded)" in res.stderr
  assert not (root / "runs").exists()


def _spelled_otherwise(suite):
  """The same plan with one more override that states the task's own default (the learning
  rate): other override lists, the same runs."""
  other = suites.get_config("smoke")
  other.methods = suite.methods
  lr = sweep.task_config(suite.task).optim.lr
  other.overrides = tuple(suite.overrides) + (("optim.lr", lr),)
  return other


def _start_run(root, r):
  """A run's work dir as the trainer leaves it when stopped right after starting: its
  ``config.json`` (the config its checkpoints belong to)."""
  from experiments.train.workdir import CONFIG_FILE, config_dict
  workdir = sweep._workdir(str(root), r)
  os.makedirs(workdir)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump(config_dict(r["config"]), f)


def _record(suite, root, stale="refuse"):
  runs = sweep.plan(suite)
  statuses = [sweep.run_status(sweep._workdir(str(root), r), r["config"]) for r in runs]
  sweep.record_plan(suite, runs, statuses, str(root), stale)
  return json.loads((root / "suite.json").read_text())


def test_a_plan_spelled_otherwise_that_plans_the_same_runs_is_the_same_plan(tmp_path, capsys):
  # A default stated in the overrides (a suite pinning the value its runs used when the task's
  # default moves on) changes the override list, not the runs: no --stale=rerun needed.
  suite, root = suites.get_config("smoke"), tmp_path / "root"
  root.mkdir()
  sweep.write_meta(suite, sweep.plan(suite, seeds=[3]), str(root))
  respelled = _spelled_otherwise(suite)
  assert sweep.plan_diff(json.loads((root / "suite.json").read_text()),
                         sweep.suite_plan(respelled)) == [("overrides.optim.lr", "<absent>", 0.05)]
  meta = _record(respelled, root)
  assert "spells the plan otherwise (overrides.optim.lr) but plans the same runs (by the " \
         "planned configs it records)" in capsys.readouterr().out
  assert sweep.plan_diff(meta, sweep.suite_plan(respelled)) == [] and meta["seeds"] == [0, 3]
  assert set(meta["configs"]) == {"ce", "lpa"} and "seed" not in meta["configs"]["lpa"]
  # Spelled otherwise *and* planning other runs (another radius): refused, naming the fields.
  other = _lpa_suite(eps=0.02)
  other.methods = suite.methods
  with pytest.raises(sweep.StaleRuns, match=r"records a plan other than this sweep's(.|\n)*"
                     r"overrides\.optim\.lr: 0\.05 \(recorded\) -> '<absent>' \(now\)"):
    _record(other, root)
  assert sweep.plan_diff(json.loads((root / "suite.json").read_text()),
                         sweep.suite_plan(respelled)) == []


def test_an_older_record_without_configs_is_judged_by_the_runs_it_holds(tmp_path, capsys):
  # suite.json written before it recorded the planned configs: the same plan in effect when
  # every method has runs and every run's config is the planned one; else refused as before.
  suite, root = suites.get_config("smoke"), tmp_path / "root"
  root.mkdir()
  sweep.write_meta(suite, sweep.plan(suite), str(root))
  meta = json.loads((root / "suite.json").read_text())
  del meta["configs"]
  (root / "suite.json").write_text(json.dumps(meta))
  respelled = _spelled_otherwise(suite)
  with pytest.raises(sweep.StaleRuns, match="records a plan other than"):  # no runs to judge by
    _record(respelled, root)
  runs = sweep.plan(suite)
  for r in runs:
    _start_run(root, r)
  assert sweep.same_runs(meta, sweep.planned_configs(respelled), str(root)) == (
      True, "the configs of every run it holds")
  # One run made with another radius: not the same runs, whatever the rest hold.
  other = sweep.plan(_lpa_suite(eps=0.02))[0]
  _start_run(tmp_path / "other", other)
  os.replace(os.path.join(sweep._workdir(str(tmp_path / "other"), other), "config.json"),
             os.path.join(sweep._workdir(str(root), runs[1]), "config.json"))
  assert sweep.same_runs(meta, sweep.planned_configs(respelled), str(root)) == (False, "its runs")
  with pytest.raises(sweep.StaleRuns, match="records a plan other than"):
    _record(respelled, root)
  assert "configs" not in json.loads((root / "suite.json").read_text())  # left as it was
  _start_run(tmp_path / "again", runs[1])
  os.replace(os.path.join(sweep._workdir(str(tmp_path / "again"), runs[1]), "config.json"),
             os.path.join(sweep._workdir(str(root), runs[1]), "config.json"))
  meta = _record(respelled, root)
  assert "plans the same runs (by the configs of every run it holds)" in capsys.readouterr().out
  assert "configs" in meta and sweep.plan_diff(meta, sweep.suite_plan(respelled)) == []
