"""The suite report's validation numbers: class-balanced accuracy and the per-method choice."""
import numpy as np
import pytest

from experiments import report


def test_balanced_accuracy_weights_every_class_equally():
  # 8 head samples all right, 2 tail samples all wrong: plain 80 %, balanced 50 %.
  label = np.array([0] * 8 + [1] * 2)
  pred = np.zeros(10, int)
  assert np.mean(pred == label) == 0.8
  assert report.balanced_accuracy(pred, label) == 0.5
  assert report.balanced_accuracy(np.array([1, 1, 0]), np.array([1, 1, 1])) == 2 / 3


def test_prediction_metrics_reads_the_validation_predictions(tmp_path):
  assert report.prediction_metrics(str(tmp_path)) == {}
  np.savez(tmp_path / "predictions.npz", test_pred=np.zeros(3), test_label=np.zeros(3),
           val_pred=np.array([0, 0, 0, 1]), val_label=np.array([0, 0, 1, 1]))
  assert report.prediction_metrics(str(tmp_path)) == {"val_balanced_accuracy": 0.75}
  np.savez(tmp_path / "predictions.npz", test_pred=np.zeros(3), test_label=np.zeros(3),
           val_pred=np.zeros(0), val_label=np.zeros(0))
  assert report.prediction_metrics(str(tmp_path)) == {}


def test_family_and_selection_pick_the_best_setting_per_method():
  assert report.family("LPA eps=0.005 @ stage1") == "LPA"
  assert report.family("LDAM-DRW max_margin=0.3") == "LDAM-DRW"
  assert report.family("CE") == "CE"
  row = lambda name, val, test: {"name": name, "val bal acc": (val, float("nan")),  # noqa: E731
                                 "test acc": (test, float("nan"))}
  rows = [row("CE", 0.80, 0.79), row("LA tau=1", 0.86, 0.85), row("LA tau=2", 0.81, 0.88),
          row("LPA eps=0.01", float("nan"), 0.9), row("LPA eps=0.02", 0.82, 0.80)]
  table = report.selection_table(rows)
  lines = table.splitlines()[2:]
  assert len(lines) == 3
  assert lines[1] == "| LA | 2 | LA tau=1 | 86.00 | 85.00 |"  # chosen on validation, not test
  assert lines[2].startswith("| LPA | 1 | LPA eps=0.02 |")      # a NaN run is not a choice


def test_strength_table_summarises_the_loss_change_over_training():
  from experiments.report import run_strength, strength_table
  def run(name, values):
    return {"name": name, "history": [{"loss_change_C": [-v, v], "sign_C": [-1.0, 1.0]}
                                      for v in values]}
  runs = [run("LPA", [0.01, 0.02, 0.3, 0.4]), run("LPA", [0.01, 0.02, 0.1, 1.5]),
          {"name": "CE", "history": [{"loss": 1.0}]}]
  assert run_strength(runs[0])["median_second_half"] == pytest.approx(0.35)
  assert run_strength(runs[2]) is None
  table = strength_table(runs)
  assert "| LPA | 2 | 0.575 | 1.500 | 0 | 1 |" in table and "CE" not in table
  assert strength_table(runs[2:]) == ""
