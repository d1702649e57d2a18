"""Sweep runner and report writer: the smoke suite end to end, skip/resume, and the tables'
numbers against the run files."""
import csv
import json
import math
import os

import numpy as np
import pytest

from experiments import report, sweep
from experiments.configs import suites


def test_every_suite_plans_valid_configs():
  # Building every run's config validates every method name and override, without data.
  total = 0
  for name in ("smoke",) + suites.SUITES:
    suite = suites.get_config(name)
    runs = sweep.plan(suite)
    assert len(runs) == len(suite.methods) * len(suite.seeds)
    assert {r["config"].seed for r in runs} == set(suite.seeds)
    # The data seed is fixed: every method and seed trains on the same subset / noise.
    assert {r["config"].data.seed for r in runs} == {0}
    total += len(runs) if name != "smoke" else 0
  assert total == 135
  assert suites.get_config("all").suites == suites.SUITES


def test_every_evidence_suite_plans_valid_configs():
  for name in suites.CONVERGED:
    suite = suites.get_config(name)
    runs = sweep.plan(suite)
    assert len(runs) == len(suite.methods) * len(suite.seeds), name
  probe = {r["name"]: r["config"] for r in sweep.plan(suites.get_config("cifar_lt_probe"))}
  assert sorted(c.data.imbalance_ratio for c in probe.values()) == [10.0, 50.0, 100.0]
  assert {c.data.n_max for c in probe.values()} == {5000}


def test_methods_override_the_right_fields():
  runs = {r["name"]: r["config"] for r in sweep.plan(suites.get_config("ablation_fmnist"), [0])}
  assert runs["LPA contractive only"].perturb.lpa.split == "all_negative"
  assert runs["LPA @ stage1"].perturb.lpa.point == "stage1"
  lt = {r["name"]: r["config"] for r in sweep.plan(suites.get_config("longtail_fmnist"), [0])}
  assert lt["LPA+LPL"].perturb.activation == "lpa" and lt["LPA+LPL"].perturb.logit == "lpl"
  assert lt["LPA fixed"].perturb.lpa.varied is False
  assert lt["CE"].model.kwargs.widths == (8, 16, 32)


def test_errors_name_the_valid_choices():
  with pytest.raises(ValueError, match="longtail_fmnist"):
    suites.get_config("longtail")
  config = sweep.task_config("longtail.py:quick")
  with pytest.raises(KeyError, match="activation"):
    sweep.apply_overrides(config, {"perturb.activaton": "lpa"})
  assert sweep.slug("LPA @ stage1") == "lpa-stage1" and sweep.slug("LPA+LPL") == "lpa-lpl"


def test_mean_std():
  assert report.mean_std([0.5, 0.7]) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
  m, s = report.mean_std([0.4])
  assert m == 0.4 and math.isnan(s)


def _run_files(root):
  out = {}
  for slug in os.listdir(os.path.join(root, "runs")):
    with open(os.path.join(root, "runs", slug, "seed0", "results.json")) as f:
      out[slug] = json.load(f)
  return out


def test_smoke_suite_end_to_end(tmp_path):
  root = str(tmp_path / "smoke")
  suite = suites.get_config("smoke")
  assert sweep.run_suite(suite, root, progress=False) == {"ran": 2, "skipped": 0, "stopped": 0}
  for name in ("report.md", "results.csv", "accuracy.png", "curves.png", "per_class.png",
               "suite.json"):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  files = _run_files(root)
  assert set(files) == {"ce", "lpa"}
  for slug in files:
    run = os.path.join(root, "runs", slug, "seed0")
    assert not os.path.exists(os.path.join(run, "checkpoints"))  # cleaned after finishing
    assert os.path.exists(os.path.join(run, "metrics.jsonl"))
    # Per-sample predictions with their labels, for paired tests between runs.
    pred = np.load(os.path.join(run, "predictions.npz"))
    assert pred["test_pred"].shape == pred["test_label"].shape == (200,)
    assert np.mean(pred["test_pred"] == pred["test_label"]) == pytest.approx(
        files[slug]["test_accuracy"])
    assert len(files[slug]["code"]["commit"]) == 40  # the code that ran is recorded

  # The tables' numbers are those of the run files.
  with open(os.path.join(root, "results.csv")) as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  md = open(os.path.join(root, "report.md")).read()
  for name, slug in (("CE", "ce"), ("LPA", "lpa")):
    r = files[slug]
    assert float(rows[name]["test acc mean"]) == pytest.approx(100 * r["test_accuracy"], abs=1e-3)
    assert float(rows[name]["few-shot mean"]) == pytest.approx(
        100 * r["shot_accuracy"]["few"], abs=1e-3)
    assert f"| {name} | 1 | {100 * r['test_accuracy']:.2f} |" in md
  total = sum(r["wall_time_s"] for r in files.values())
  assert f"{total:.0f} s" in md

  # Rerunning skips the finished runs and leaves their files alone.
  mtime = os.path.getmtime(os.path.join(root, "runs", "ce", "seed0", "results.json"))
  assert (sweep.run_suite(suite, root, progress=False, report=False)
          == {"ran": 0, "skipped": 2, "stopped": 0})
  assert os.path.getmtime(os.path.join(root, "runs", "ce", "seed0", "results.json")) == mtime

  # A run without results.json (interrupted) is run again; the other is still skipped.
  os.remove(os.path.join(root, "runs", "lpa", "seed0", "results.json"))
  assert (sweep.run_suite(suite, root, progress=False, report=False)
          == {"ran": 1, "skipped": 1, "stopped": 0})

  # A finished run recorded with another config is stale: the sweep stops and names it and
  # the field, before running anything; --stale=rerun redoes it.
  ce = os.path.join(root, "runs", "ce", "seed0")
  res = json.load(open(os.path.join(ce, "results.json")))
  res["config"]["optim"]["lr"] = 0.5
  json.dump(res, open(os.path.join(ce, "results.json"), "w"))
  with pytest.raises(sweep.StaleRuns, match=r"runs/ce/seed0:\n  optim.lr: 0.5 \(recorded\)"):
    sweep.run_suite(suite, root, progress=False, report=False)
  assert sweep.run_suite(suite, root, progress=False, report=False, stale="rerun") == {
      "ran": 1, "skipped": 1, "stopped": 0}
  assert json.load(open(os.path.join(ce, "results.json")))["config"]["optim"]["lr"] != 0.5

  # A results.json cut short: the report names it and leaves it out; the sweep redoes the run.
  lpa = os.path.join(root, "runs", "lpa", "seed0", "results.json")
  with open(lpa, "r+") as f:
    f.truncate(50)
  report.write_report(root)
  md = open(os.path.join(root, "report.md")).read()
  assert "runs/lpa/seed0/results.json" in md and "| LPA |" not in md
  assert (sweep.run_suite(suite, root, progress=False, report=False)
          == {"ran": 1, "skipped": 1, "stopped": 0})
  assert json.load(open(lpa))["steps"] > 0

  # Two shards split the plan: shard 1/2 of (CE, LPA) runs LPA only and leaves CE alone.
  ce_res = os.path.join(ce, "results.json")
  os.remove(ce_res)
  os.remove(lpa)
  assert sweep.run_suite(suite, root, progress=False, report=False, shard=(1, 2)) == {
      "ran": 1, "skipped": 0, "stopped": 0}
  assert os.path.exists(lpa) and not os.path.exists(ce_res)
  assert sweep.parse_shard("0/2") == (0, 2)
  with pytest.raises(ValueError, match="--shard=2/2"):
    sweep.parse_shard("2/2")

  # --shard=any: a run whose work dir another live process holds is left to it; the sweep
  # takes the others (here CE), and skips a run another process finished meanwhile.
  import subprocess
  import sys
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from experiments.train.lock import hold\n"
       f"with hold({ce!r}):\n  print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == "held"
    os.remove(lpa)
    assert sweep.run_suite(suite, root, progress=False, report=False, shard=sweep.ANY) == {
        "ran": 1, "skipped": 1, "stopped": 0}
    assert os.path.exists(lpa) and not os.path.exists(ce_res)
  finally:
    holder.kill()
    holder.wait()
  assert sweep.run_suite(suite, root, progress=False, report=False, shard=sweep.ANY) == {
      "ran": 1, "skipped": 1, "stopped": 0}
  assert os.path.exists(ce_res)
  with pytest.raises(ValueError, match="--shard=any takes one run at a time"):
    sweep.run_suite(suite, root, progress=False, report=False, shard=sweep.ANY, parallel=2)


def test_stale_check_compares_what_the_run_trains_with():
  from experiments.train.workdir import config_diff
  rec = {"seed": 0, "train": {"checkpoint_every": 1},
         "perturb": {"activation": "lpa", "logit": "none", "gradient": "none",
                     "lpa": {"eps": 0.1}, "gaf": {"alpha": 0.1}}}
  now = json.loads(json.dumps(rec))
  now["train"]["checkpoint_every"] = 5  # how often checkpoints are kept: not the run
  now["perturb"]["gaf"] = {"alpha": 0.2, "unit_slope": False}  # a block of a method that is off
  assert config_diff(rec, now) == []
  now["perturb"]["lpa"]["eps"] = 0.2
  now["perturb"]["logit"] = "ldam,lpl"
  now["perturb"]["lpl"] = {"alpha": 0.1}
  assert config_diff(rec, now) == [("perturb.logit", "none", "ldam,lpl"),
                                   ("perturb.lpa.eps", 0.1, 0.2),
                                   ("perturb.lpl.alpha", "<absent>", 0.1)]


def test_runs_made_under_other_defaults_count_as_stale():
  """A run recorded before a default changed what ``point=auto`` trains is not reused."""
  from experiments.configs import longtail
  from experiments.train.workdir import config_diff, config_dict
  c = longtail.get_config("quick")
  c.perturb.activation = "lpa"
  now = config_dict(c)
  before = json.loads(json.dumps(now))
  del before["resolved"]  # what runs recorded before the defaults were versioned look like
  assert any(k.startswith("resolved.") for k, _, _ in config_diff(before, now))
  older = json.loads(json.dumps(now))
  older["resolved"]["activation_point"] = "stage3"
  assert [k for k, _, _ in config_diff(older, now)] == ["resolved.activation_point"]


def test_mechanism_fixed_radius_spends_the_varied_radius_mean():
  # The fixed-radius control at the varied radius's class mean: the same total radius as the
  # main table's LPA, spread evenly.
  from lpa_jax.perturb import classes
  runs = {r["name"]: r["config"] for r in sweep.plan(suites.get_config("fmnist_lt_mechanism"),
                                                      [0])}
  lpa_cfg = sweep.plan(suites.get_config("fmnist_lt_main"), [0])[5]["config"].perturb.lpa
  fixed = runs["LPA fixed radius (varied mean)"].perturb.lpa
  assert fixed.varied is False and lpa_cfg.varied is True
  split = classes.frequency_split([6000 // (i + 1) for i in range(10)])
  varied = classes.class_radii(split, lpa_cfg.eps, lpa_cfg.delta_eps, lpa_cfg.beta, 1, True)
  flat = classes.class_radii(split, fixed.eps, fixed.delta_eps, fixed.beta, 1, False)
  np.testing.assert_allclose(float(flat.mean()), float(varied.mean()), rtol=1e-4)
  assert float(varied.min()) < float(flat[0]) < float(varied.max())


@pytest.mark.slow  # two subprocesses (sweep, report): ~15 s
def test_sweep_shards_starts_a_fresh_root_from_the_committed_records(tmp_path):
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(["bash", "experiments/sweep_shards.sh", str(tmp_path), "1",
                        "repro_balanced"], cwd=repo, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "starting from the committed records" in res.stdout
  log = (tmp_path / "repro_balanced.proc0.log").read_text()
  assert "ran 0, skipped 3 finished" in log               # nothing retrained
  assert (tmp_path / "repro_balanced" / "report.md").exists()


def test_methods_picks_runs_by_slug_and_names_the_suites_methods_on_a_typo():
  suite = suites.get_config("rmnist_dg")
  runs = sweep.plan(suite, [0], ["erm-45", "lpa-all-positive-45"])
  assert [(r["slug"], r["seed"]) for r in runs] == [("erm-45", 0), ("lpa-all-positive-45", 0)]
  with pytest.raises(ValueError, match=r"no method\(s\) \['erm-46'\].*erm-45, erm-60"):
    sweep.plan(suite, [0], ["erm-46"])
