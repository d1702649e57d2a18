"""The trainer's perturbation-strength guards: a ceiling on the per-epoch mean |loss change| of
the perturbed classes is warned about or, if asked, stops a run (and a sweep records it and
goes on); a floor is reported in ``results.json`` and warned about."""
import json

import pytest

from conftest import small_config
from experiments.train import loop
from experiments.train.guards import (PerturbationTooStrong, check_strength, signed_loss_change,
                                  strength_summary)

STRONG = {"perturb.activation": "lpa", "perturb.lpa.eps": 1.0, "perturb.lpa.delta_eps": 1.0,
          "optim.num_epochs": 3, "train.max_loss_change_action": "stop"}  # ~1.6 nats in
# epoch 1 on the small MLP (measured)


def test_signed_loss_change_counts_only_the_classes_the_method_perturbs():
  row = {"loss_change_C": [-0.2, 0.4, 9.0], "sign_C": [-1.0, 1.0, 0.0]}
  assert signed_loss_change(row) == pytest.approx(0.3)
  assert signed_loss_change({"loss_change_C": [-0.2, 0.4]}) == pytest.approx(0.3)  # no signs
  assert signed_loss_change({"loss": 1.0}) is None
  assert signed_loss_change({"loss_change_C": [1.0], "sign_C": [0.0]}) == 0.0


def test_check_strength_names_the_method_the_value_and_the_way_out():
  row = {"loss_change_C": [-3.0, 2.0], "sign_C": [-1.0, 1.0], "loss_change_signed": 2.5}
  check_strength(row, 4, ("lpa", "stage2"), ceiling=None)  # no ceiling
  check_strength(row, 4, ("lpa", "stage2"), ceiling=3.0)
  check_strength({"loss": 1.0}, 4, ("lpa", "stage2"), ceiling=0.1)  # no loss change logged
  with pytest.raises(PerturbationTooStrong, match=r"lpa at point 'stage2' moved the loss .* "
                     r"by 2\.50 nats on average in epoch 4, above train\.max_loss_change = 1 "
                     r"\(loss change per class: 0: -3\.00, 1: \+2\.00\).*perturb\.\*\.eps.*"
                     r"max_loss_change=inf"):
    check_strength(row, 4, ("lpa", "stage2"), ceiling=1.0)


def test_strength_summary_takes_the_median_of_the_second_half():
  rows = [{"loss_change_signed": v} for v in (0.01, 0.02, 0.04, 0.06, 0.08)] + [{"loss": 1}]
  s = strength_summary(rows, floor=0.05, ceiling=1.0)
  assert s["median_second_half"] == pytest.approx(0.06) and s["max"] == pytest.approx(0.08)
  assert not s["below_floor"] and s["per_epoch"] == [0.01, 0.02, 0.04, 0.06, 0.08]
  assert strength_summary(rows[:2], floor=0.05)["below_floor"]
  assert not strength_summary(rows[:2], floor=None)["below_floor"]
  assert strength_summary([{"loss": 1.0}]) is None


def test_a_faded_perturbation_is_not_called_plain_training():
  from experiments.train.guards import floor_message
  # cifar_lt_tune's eps 0.01: the loss change rose to 0.88 nats, then the network collapsed
  faded = strength_summary([{"loss_change_signed": v} for v in (0.1, 0.88, 0.08, 0.01, 0.007)],
                           floor=0.05, ceiling=1.0)
  assert faded["below_floor"]
  msg = floor_message(faded, ("lpa", "stage2"))
  assert "after reaching 0.880 nats in epoch 2" in msg and "collapses" in msg
  assert "this run is close to plain training" not in msg
  weak = strength_summary([{"loss_change_signed": v} for v in (0.01, 0.02, 0.02)], floor=0.05)
  assert floor_message(weak, ("lpa", "stage2")).endswith(
      "results.json records the per-epoch values.")
  assert "this run is close to plain training" in floor_message(weak, ("lpa", "stage2"))


def test_bad_floor_and_ceiling_are_named():
  from experiments.configs.common import InvalidConfig, validate
  for over, msg in [({"train.max_loss_change": -1.0}, "max_loss_change=-1.0: must be > 0"),
                    ({"train.min_loss_change": -0.1}, "min_loss_change=-0.1: must be >= 0"),
                    ({"train.min_loss_change": 2.0}, "must be above train.min_loss_change")]:
    with pytest.raises(InvalidConfig, match=msg):
      validate(small_config(**over))
  with pytest.raises(InvalidConfig, match="max_loss_change_action='halt': must be 'warn' or"):
    validate(small_config(**{"train.max_loss_change_action": "halt"}))
  validate(small_config(**{"train.max_loss_change": None, "train.min_loss_change": None}))


def test_too_strong_a_perturbation_warns_or_stops_the_run(tmp_path, fmnist_lt):
  with pytest.raises(PerturbationTooStrong, match=r"lpa at point .* in epoch 1, above "
                     r"train\.max_loss_change = 1"):
    loop.train_and_evaluate(small_config(**STRONG), str(tmp_path / "a"), progress=False,
                            data=fmnist_lt)
  assert not (tmp_path / "a" / "metrics.jsonl").read_text().strip()  # no row for epoch 1
  res = loop.train_and_evaluate(small_config(**STRONG, **{"train.max_loss_change": None}),
                                str(tmp_path / "b"), progress=False, data=fmnist_lt)
  s = res["perturbation_strength"]
  assert len(s["per_epoch"]) == 3 and s["max"] > 1.0 and s["ceiling"] is None
  assert s["epochs_above_ceiling"] == []
  warn = {**STRONG, "train.max_loss_change_action": "warn"}  # the default: warn once, train on
  with pytest.warns(UserWarning, match=r"above train\.max_loss_change = 1") as caught:
    res = loop.train_and_evaluate(small_config(**warn), str(tmp_path / "c"), progress=False,
                                  data=fmnist_lt)
  assert sum("max_loss_change" in str(w.message) for w in caught) == 1
  assert res["perturbation_strength"]["epochs_above_ceiling"] == [1, 2, 3]
  rows = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["loss_change_signed"] for r in rows] == s["per_epoch"]


def test_a_perturbation_below_the_floor_is_warned_about_and_recorded(tmp_path, fmnist_lt):
  weak = {**STRONG, "perturb.lpa.eps": 5e-4, "perturb.lpa.delta_eps": 5e-4,
          "optim.num_epochs": 2}
  with pytest.warns(UserWarning, match=r"lpa at .* by only 0\.00\d nats .* below the "
                    r"0\.05-nat floor"):
    res = loop.train_and_evaluate(small_config(**weak), str(tmp_path), progress=False,
                                  data=fmnist_lt)
  assert res["perturbation_strength"]["below_floor"]
  ce = loop.train_and_evaluate(small_config(), str(tmp_path / "ce"), progress=False,
                               data=fmnist_lt)
  assert "perturbation_strength" not in ce  # no activation method, nothing to measure


SUITE = """
from experiments.configs import suites

def get_config(arg=None):
  c = suites.get_config("smoke")
  c.methods = [{"name": "CE"}, {"name": "LPA strong", "perturb.activation": "lpa",
                                "train.min_loss_change": None,
                                "train.max_loss_change_action": "stop",
                                "train.max_loss_change": 1e-3}]  # any LPA run stops
  return c
"""


def test_a_sweep_records_a_stopped_run_goes_on_and_skips_it_later(tmp_path, capsys):
  import importlib.util
  from experiments import report, sweep
  spec_path = tmp_path / "suite.py"
  spec_path.write_text(SUITE)
  spec = importlib.util.spec_from_file_location("suite_strong", spec_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  suite, root = module.get_config(), tmp_path / "root"
  counts = sweep.run_suite(suite, str(root), progress=False)
  assert counts == {"ran": 1, "skipped": 0, "stopped": 1}
  stopped = root / "runs" / "lpa-strong" / "seed0" / "stopped.json"
  record = json.loads(stopped.read_text())
  assert record["error"] == "PerturbationTooStrong" and "max_loss_change" in record["reason"]
  assert (root / "runs" / "ce" / "seed0" / "results.json").exists()
  text = (root / "report.md").read_text()
  assert "Runs stopped by the trainer's guards" in text and "lpa-strong/seed0" in text
  assert [p for p, _ in report.stopped_runs(str(root))] == [str(stopped.parent)]
  capsys.readouterr()
  again = sweep.run_suite(suite, str(root), progress=False, report=False)
  assert again == {"ran": 0, "skipped": 1, "stopped": 1}
  assert "was stopped earlier, not rerun" in capsys.readouterr().out
