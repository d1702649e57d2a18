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
