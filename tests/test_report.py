"""The suite report's validation numbers: class-balanced accuracy and the per-method choice."""
import os

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


def test_paired_statistics_match_hand_computed_values():
  from scipy import stats as st

  from experiments.stats import mcnemar, paired_difference
  d = paired_difference({0: 0.80, 1: 0.83, 2: 0.81, 9: 0.5}, {0: 0.78, 1: 0.80, 2: 0.80})
  diffs = np.array([0.02, 0.03, 0.01])
  half = st.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
  assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
  assert d["lo"] == pytest.approx(0.02 - half) and d["hi"] == pytest.approx(0.02 + half)
  assert np.isnan(paired_difference({0: 0.8}, {0: 0.7})["lo"])  # one pair: no interval
  label = np.zeros(30, int)
  a = np.r_[np.zeros(12, int), np.ones(18, int)]       # right on 12
  b = np.r_[np.ones(10, int), np.zeros(20, int)]       # right on 20
  m = mcnemar(a, b, label)
  assert (m["b"], m["c"]) == (10, 18)                  # a-only right: 0..9; b-only: 12..29
  assert m["p"] == pytest.approx(st.binomtest(10, 28).pvalue)
  assert mcnemar(a, a, label)["p"] == 1.0


def _runs_with_predictions(tmp_path, accs, val=None):
  """Runs whose test predictions get the first ``acc·10`` of 10 images right (label 0)."""
  runs, label = [], np.zeros(10, int)
  for name, per_seed in accs.items():
    for seed, acc in enumerate(per_seed):
      wd = tmp_path / name / str(seed)
      wd.mkdir(parents=True)
      pred = np.r_[np.zeros(int(acc * 10), int), np.ones(10 - int(acc * 10), int)]
      np.savez(wd / "predictions.npz", test_pred=pred, test_label=label)
      results = {"test_accuracy": acc}
      if val is not None:
        results["val_balanced_accuracy"] = val[name]
      runs.append({"name": name, "seed": seed, "workdir": str(wd), "results": results})
  return runs


def test_paired_table_pairs_seeds_and_chooses_the_best_baseline_on_validation(tmp_path):
  from experiments.report import paired_table
  accs = {"CE": (0.5, 0.6), "LA": (0.7, 0.8), "LDAM": (0.6, 0.7), "LPA": (0.6, 0.6)}
  val = {"CE": 0.5, "LA": 0.6, "LDAM": 0.9, "LPA": 0.7}  # LA best on test, LDAM on validation
  table = paired_table(_runs_with_predictions(tmp_path, accs, val))
  # Per-seed differences +10, 0: every sign pattern is as extreme (p = 1); per seed, McNemar
  # sees one discordant image at most (p = 1): 0 of 2 seeds.
  assert "| LPA | CE | 2 | +5.00 | [" in table and "| 1 | 1 | 0/2 |" in table
  assert "| LPA | LDAM (best baseline on val bal acc) | 2 | -5.00 |" in table
  assert "| LPA | LA (best" not in table and "| LA | CE | 2 | +20.00 |" in table
  assert "pooled" not in table
  # Without a validation split no baseline is chosen: CE, fixed before the runs, only.
  table = paired_table(_runs_with_predictions(tmp_path / "noval", accs))
  assert "best baseline" not in table and len(table.splitlines()) == 2 + 3


def test_paired_table_holm_adjusts_over_its_rows_and_falls_back_to_seeds(tmp_path):
  from experiments.report import paired_table
  from experiments.stats import holm
  accs = {"CE": (0.5, 0.5, 0.5), "A": (0.6, 0.7, 0.6), "B": (0.6, 0.4, 0.5)}
  runs = _runs_with_predictions(tmp_path, accs)
  lines = paired_table(runs).splitlines()[2:]
  p = [float(line.split(" | ")[5]) for line in lines]
  assert p == [0.25, 1.0]                                  # 3 seeds: 0.25 at best
  assert [float(line.split(" | ")[6]) for line in lines] == list(holm(p))
  for r in runs:                                           # no predictions: seeds only
    r["workdir"] = str(tmp_path / "missing")
  assert "| A | CE | 3 | +13.33 | — | 0.25 | 0.5 | — |" in paired_table(runs)


def test_class_change_table_shows_each_class_the_split_means_and_the_worst_class(tmp_path):
  from experiments.report_tables import class_change_table
  label = np.repeat([0, 1, 2], 4)
  right = np.ones(12, bool)
  wrong = {"CE": [], "LA": [0, 1], "LPA": [4]}             # the images each gets wrong
  runs = []
  for name, misses in wrong.items():
    for seed in (0, 1):
      wd = tmp_path / name / str(seed)
      wd.mkdir(parents=True)
      ok = right.copy()
      ok[misses] = False
      np.savez(wd / "predictions.npz", test_pred=np.where(ok, label, (label + 1) % 3),
               test_label=label)
      history = [{"sign_C": [-1.0, -1.0, 1.0]}] if name == "LPA" else [{"loss": 1.0}]
      runs.append({"name": name, "seed": seed, "workdir": str(wd), "history": history,
                   "results": {"train_class_counts": [100, 10, 1], "num_classes": 3,
                               "class_names": ["a", "b", "c"], "config": {}}})
  table = class_change_table(runs).splitlines()
  assert table[0] == "| class | train n | CE acc % | LA: Δ | LPA: Δ |"
  assert table[2].startswith("| a | 100 | 100.0 | -50.0 [") and "| +0.0 [+0.0, +0.0] |" in table[2]
  assert table[3].startswith("| b | 10 | 100.0 | +0.0 [+0.0, +0.0] | -25.0 [")
  # LA has no split of its own: the frequency split, round(0.4·3) = 1 head class (a).
  assert table[5] == "| **split (N = contractive / head)** | | | frequency: 1 N of 3 | " \
                     "own split: 2 N of 3 |"
  assert table[6].startswith("| **mean Δ, expansive / tail** | | | +0.0 [+0.0, +0.0] | +0.0")
  assert table[7].startswith("| **mean Δ, contractive / head** | | | -50.0 [")
  assert "| -12.5 [" in table[7]                           # LPA: (0 − 25) / 2 over a and b
  # Neither head loss is shown (4 test images a class: its interval reaches 0): no exchange.
  assert table[8] == "| **tail points gained per head point lost** | | | — | — |"
  assert table[9].startswith("| **worst class: Δ** | | | a -50.0 [") and "| b -25.0 [" in table[9]
  for r in runs:                                           # balanced, no own split: no sides
    r["results"]["train_class_counts"] = [10, 10, 10]
    r["history"] = [{}]
  assert "| **mean Δ, expansive / tail** | | | — | — |" in class_change_table(runs)


def test_rarest_table_lists_each_seed_on_the_rarest_classes():
  from experiments.report import rarest_table
  res = lambda acc: {"train_class_counts": [50, 5, 20, 1], "class_names": ["a", "b", "c", "d"],
                     "per_class_accuracy": acc}
  runs = [{"name": "CE", "seed": 1, "results": res([1.0, 0.0, 0.5, 0.25])},
          {"name": "CE", "seed": 0, "results": res([1.0, 0.5, 0.75, 1.0])}]
  table = rarest_table(runs)
  assert "| d (n=1) | b (n=5) | c (n=20) |" in table
  assert "| CE | 2 | 100.0 / 25.0 | 50.0 / 0.0 | 75.0 / 50.0 | 0.0 |" in table
  balanced = [{"name": "CE", "seed": 0, "results": {**res([1.0] * 4),
                                                     "train_class_counts": [5] * 4}}]
  assert rarest_table(balanced) == ""
  noisy = [{**balanced[0], "results": {**balanced[0]["results"],  # label noise's spread
                                       "train_class_counts": [96, 100, 104, 99]}}]
  assert rarest_table(noisy) == ""
  grid = runs + [{"name": "CE IR 2", "seed": 0, "results": {**res([1.0] * 4),  # an IR grid
                                                            "train_class_counts": [50, 25, 30, 2]}}]
  assert "| d (n=1 / 2) | b (n=5 / 25) | c (n=20 / 30) |" in rarest_table(grid)


def test_noisy_runs_report_the_best_epoch_beside_the_last(tmp_path):
  import json
  wd = tmp_path / "runs" / "ce" / "seed0"
  wd.mkdir(parents=True)
  (wd / "results.json").write_text(json.dumps({"test_accuracy": 0.6, "seed": 0,
                                               "train_clean_label_accuracy": 0.7}))
  (wd / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_accuracy": a}) + "\n"
                                            for e, a in ((1, 0.5), (2, 0.72), (3, 0.6))))
  runs = report.load_runs(str(tmp_path))
  assert runs[0]["results"]["best_epoch_test_accuracy"] == 0.72
  assert "best-epoch test (oracle)" in [c for c, _ in report.metric_columns(runs)]


def test_domain_table_has_a_column_per_held_out_domain_and_the_per_seed_average():
  def run(base, domain, seed, acc, val=None):
    return {"name": f"{base} @ {domain}", "base": base, "domain": domain, "seed": seed,
            "results": {"selected_by_val": {"test_accuracy": acc, "val_accuracy": val}}}
  runs = [run("ERM", "0°", 0, 0.8), run("ERM", "15°", 0, 0.9), run("ERM", "0°", 1, 0.7),
          run("ERM", "15°", 1, 0.9), run("LPA", "0°", 0, 0.6)]  # LPA lacks 15°: no average
  table = report.domain_table(runs).splitlines()
  assert table[0] == "| method | 0° | 15° | average |"
  assert table[2] == "| ERM | 75.00 ± 7.07 | 90.00 ± 0.00 | 82.50 ± 3.54 |"
  assert table[3] == "| LPA | 60.00 | — | — |"
  assert report.domain_table([{"name": "CE", "domain": None}]) == ""


def _committed_suites():
  import glob
  from experiments import fill
  roots = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(fill.RESULTS, "*", "runs")))
  assert roots, f"no committed suites under {fill.RESULTS}"
  return roots


@pytest.mark.parametrize("root", _committed_suites(), ids=os.path.basename)
def test_every_committed_report_is_what_its_records_regenerate(root, tmp_path):
  # A report left behind by a change of the report writer shows numbers (or sections) the
  # records no longer give: regenerate it from a copy of the committed records (runs/, with
  # any stopped.json, and suite.json) and compare.
  import shutil
  from experiments import fill
  copy = tmp_path / os.path.basename(root)
  shutil.copytree(os.path.join(root, "runs"), copy / "runs")
  if os.path.exists(os.path.join(root, "suite.json")):
    shutil.copy(os.path.join(root, "suite.json"), copy / "suite.json")
  report.write_report(str(copy))
  rel = os.path.relpath(root, fill.ROOT)  # the committed reports name their root this way
  fresh = (copy / "report.md").read_text().replace(str(copy), rel)
  assert fresh == open(os.path.join(root, "report.md")).read(), (
      f"{rel}/report.md is stale: run `python -m experiments.report --root={rel}`")


def test_domain_paired_table_pairs_each_held_out_domain_with_the_same_domain_only():
  from experiments.report_tables import domain_paired_table

  def run(base, domain, seed, acc, val=None):
    return {"name": f"{base} @ {domain}", "base": base, "domain": domain, "seed": seed,
            "results": {"selected_by_val": {"test_accuracy": acc, "val_accuracy": val}}}
  runs = [run("ERM", d, s, a) for d, base_acc in (("0°", 0.80), ("15°", 0.95))
          for s, a in ((0, base_acc), (1, base_acc + 0.01))]
  runs += [run("LPA", "0°", 0, 0.82), run("LPA", "0°", 1, 0.83), run("LPA", "15°", 0, 0.94)]
  table = domain_paired_table(runs)
  assert table.splitlines()[0].endswith("| sign-flip p | Holm p |")
  assert "| LPA | ERM | 0° | 2 | +2.00 | [+2.00, +2.00] | 0.5 | 1 |" in table   # 3 rows
  assert "| LPA | ERM | 15° | 1 | -1.00 | — | 1 | 1 |" in table   # seed 1 missing: not paired
  assert "| LPA | ERM | average | 1 | +0.50 | — |" in table     # seed 0 has every domain
  assert "best baseline" not in table                          # no baseline besides ERM
  weaker = runs + [run("Mixup", d, s, a - 0.01) for d, a in (("0°", 0.80), ("15°", 0.95))
                   for s in (0, 1)]
  table = domain_paired_table(weaker)
  assert "| Mixup | ERM | average | 2 | -1.50 | [-7.85, +4.85] |" in table
  assert "best baseline" not in table                          # ERM is the best baseline
  runs += [run("Mixup", d, s, a + 0.01) for d, a in (("0°", 0.80), ("15°", 0.95))
           for s in (0, 1)]
  table = domain_paired_table(runs)
  assert "best baseline" not in table            # better on test, but no validation: not chosen
  for r in runs:                                 # training-domain validation favours Mixup
    r["results"]["selected_by_val"]["val_accuracy"] = 0.9 if r["base"] == "Mixup" else 0.8
  table = domain_paired_table(runs)
  assert "| LPA | Mixup (best baseline on val) | average | 1 | -0.50 | — |" in table
  assert "| Mixup | ERM | average | 2 | +0.50 | [-5.85, +6.85] |" in table
  assert domain_paired_table([{**runs[0], "domain": None}]) == ""


def test_domain_selection_picks_a_setting_by_training_domain_validation_not_by_test():
  from experiments.report_tables import domain_selection_table

  def run(base, domain, seed, val, test):
    return {"name": f"{base} @ {domain}", "base": base, "domain": domain, "seed": seed,
            "results": {"selected_by_val": {"val_accuracy": val, "test_accuracy": test}}}
  runs = [run(b, d, s, val, test) for b, val, test in (("ERM", 0.9, 0.8),
                                                         ("LPA", 0.9, 0.95),
                                                         ("LPA eps=0.1", 0.95, 0.7))
          for d in ("0°", "15°") for s in (0, 1)]
  table = domain_selection_table(runs).splitlines()
  assert table[2] == "| LPA | LPA | 90.00 ± 0.00 | 95.00 ± 0.00 |  |"
  assert table[3] == "| LPA | LPA eps=0.1 | 95.00 ± 0.00 | 70.00 ± 0.00 | yes |"
  assert len(table) == 4                       # ERM has one setting: nothing to select
  assert domain_selection_table(runs[:4]) == ""


def test_across_table_pairs_each_method_with_its_own_suites_first_method(tmp_path):
  def run(name, seed, acc):
    return {"name": name, "seed": seed, "results": {"test_accuracy": acc}}
  low = [run("CE", 0, 0.80), run("CE", 1, 0.82), run("LPA", 0, 0.81), run("LPA", 1, 0.84)]
  high = [run("CE", 0, 0.60), run("CE", 1, 0.62), run("GAF", 0, 0.61)]
  table = report.across_table({"20 %": low, "60 %": high}).splitlines()
  assert table[0] == "| method | 20 % | 60 % |"
  assert table[2] == "| CE | 81.00 | 61.00 |"
  # No predictions: the seed-level difference and its sign-flip p (2 seeds: at least 0.5).
  assert table[3] == "| LPA | 82.50 (+1.50; Holm p 0.5) | — |"
  assert table[4] == "| GAF | — | 61.00 (+1.00; Holm p 1) |"
  # With each run's test predictions, the crossed bootstrap over seeds and images, as in the
  # paired table; Holm within the column over its two comparisons.
  label = np.arange(200) % 10
  rng = np.random.default_rng(0)

  def with_preds(name, seed, wrong):
    d = tmp_path / f"{name}{seed}"
    d.mkdir()
    pred = np.where(rng.random(200) < wrong, (label + 1) % 10, label)
    np.savez(d / "predictions.npz", test_pred=pred, test_label=label)
    return {"name": name, "seed": seed, "workdir": str(d),
            "results": {"test_accuracy": float(np.mean(pred == label))}}
  suite = [with_preds(n, s, w) for n, w in (("CE", 0.3), ("LPA", 0.1), ("LA", 0.3))
           for s in range(3)]
  rows = report.across_table({"x": suite}).splitlines()
  from experiments.report_tables import _comparison, interval
  by = {n: {r["seed"]: r for r in suite if r["name"] == n} for n in ("CE", "LPA", "LA")}
  d = _comparison(by["LPA"], by["CE"], [0, 1, 2])
  assert d["lo"] == d["lo"] and d["lo"] > 0                   # an interval, above zero
  assert f"({100 * d['mean']:+.2f} {interval(d)}; Holm p " in rows[3]
  assert d["p"] == 0.25                                       # 3 seeds: 2 / 2^3 at best
  assert rows[3].endswith("Holm p 0.5) |")                    # 2 comparisons: 2 × 0.25


def _suite_copy(tmp_path, name="cifar_balanced_probe"):
  """A copy of a small committed suite's records (two finished runs), to write reports in."""
  import shutil
  from experiments import fill
  root = tmp_path / name
  shutil.copytree(os.path.join(fill.RESULTS, name, "runs"), root / "runs")
  shutil.copy(os.path.join(fill.RESULTS, name, "suite.json"), root / "suite.json")
  return root


@pytest.mark.parametrize("name", ["report.md", "results.csv", "accuracy.png"])
def test_a_report_file_killed_mid_write_keeps_the_old_one(tmp_path, monkeypatch, name):
  # A kill while a report file is written used to leave it cut short (a 0-byte PNG).
  import builtins

  import matplotlib.figure
  root = _suite_copy(tmp_path)
  report.write_report(str(root))
  old = (root / name).read_bytes()

  def killed(path):  # the file is created and truncated, then the writer dies
    with builtins.open(path, "wb"):
      pass
    raise KeyboardInterrupt(f"killed while writing {path}")

  def dying_open(path, mode="r", *args, **kwargs):
    if "w" in mode and os.path.basename(str(path)).startswith(name):
      killed(path)
    return builtins.open(path, mode, *args, **kwargs)
  real_savefig = matplotlib.figure.Figure.savefig

  def dying_savefig(fig, path, *args, **kwargs):
    if os.path.basename(str(path)).startswith(name):
      killed(path)
    return real_savefig(fig, path, *args, **kwargs)
  from PIL import Image  # the figures are written as palette PNGs by PIL
  real_save = Image.Image.save

  def dying_save(image, fp, *args, **kwargs):
    if os.path.basename(str(fp)).startswith(name):
      killed(fp)
    return real_save(image, fp, *args, **kwargs)
  monkeypatch.setattr(report, "open", dying_open, raising=False)
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dying_savefig)
  monkeypatch.setattr(Image.Image, "save", dying_save)
  with pytest.raises(KeyboardInterrupt, match="killed while writing"):
    report.write_report(str(root))
  assert (root / name).read_bytes() == old
  assert not [n for n in os.listdir(root) if ".tmp" in n]  # nor a temporary file left


def test_a_finished_run_without_its_metrics_is_named_in_the_report(tmp_path, capsys):
  # Its accuracy stays in the tables, but its learning curve and perturbation strength come
  # from metrics.jsonl: without a note the run would be missing from them unexplained.
  root = _suite_copy(tmp_path)
  lost = root / "runs" / "ce-30-epochs" / "seed0" / "metrics.jsonl"
  lost.unlink()
  report.write_report(str(root))
  text = (root / "report.md").read_text()
  assert "## Finished runs without their metrics.jsonl" in text
  assert "* `runs/ce-30-epochs/seed0/metrics.jsonl`" in text
  assert f"report: {lost} is missing" in capsys.readouterr().out


def test_guarded_selection_rules_out_a_setting_that_unlearns_a_large_class(tmp_path):
  from experiments.report_tables import guard_table, guarded_selection
  # Validation: classes 0 and 1 have 60 images each (guarded), class 2 has 10 (too rare).
  label = np.repeat([0, 1, 2], [60, 60, 10])
  wrong = {"CE": [], "old": list(range(4)),                # class 0 −6.7 points: ruled out
           "rare-loss": list(range(120, 125)),             # class 2 −50 points: not guarded
           "mild": list(range(62, 64)),                    # class 1 −3.3 points: passes
           "mild-head": [62]}                              # −1.7, but changes num_head
  head = {"mild-head": 2}
  runs = []
  for name, misses in wrong.items():
    wd = tmp_path / name
    wd.mkdir()
    pred = label.copy()
    pred[misses] = (label[misses] + 1) % 3
    np.savez(wd / "predictions.npz", test_pred=label, test_label=label, val_pred=pred,
             val_label=label)
    history = [{"loss_change_C": [0.1, 0.1, 0.1], "sign_C": [1.0, 1.0, 1.0]}] * 2
    lpa = {"eps": 0.01 if name == "old" else 0.005, "num_head": head.get(name)}
    runs.append({"name": name, "seed": 0, "workdir": str(wd),
                 "history": history if name != "CE" else [{}],
                 "results": {"num_classes": 3, "class_names": ["a", "b", "c"], "config": {
                     "perturb": {"activation": "lpa" if name != "CE" else "none",
                                 "lpa": lpa}}}})
  rows = {r["name"]: r for r in guarded_selection(runs, default="old")}
  assert rows["old"]["worst_change"] == pytest.approx(-400 / 60)
  assert rows["old"]["worst_class"] == 0 and not rows["old"]["passes"]
  assert rows["rare-loss"]["worst_change"] == 0.0 and rows["rare-loss"]["passes"]
  assert rows["mild"]["val_bal_acc"] == pytest.approx(100 - 200 / 180)
  assert rows["mild"]["loss_change"] == pytest.approx(0.1)
  assert rows["mild-head"]["changes"] == ["num_head"] and rows["mild"]["changes"] == []
  # Tie width: one image of the 10-image class = 100 / (3·10) = 3.33 points.  mild-head is
  # best (−0.56) and mild (−1.1) ties with it; mild changes nothing besides ε, so mild.
  # rare-loss (−16.7) is out of the tie.
  assert rows["CE"]["tie_width"] == pytest.approx(100 / 30)
  assert [n for n, r in rows.items() if r["pick"]] == ["mild"]
  # Without a default to compare with, the best passing one.
  assert [r["name"] for r in guarded_selection(runs) if r["pick"]] == ["mild-head"]
  table = guard_table(runs, "old")
  assert "| old | 1 | " in table and "a -6.7 | 0.100 | none | **fails** |  |" in table
  assert "| mild-head | 1 | 99.44 | b -1.7 | 0.100 | num_head | passes |  |" in table
  assert table.rstrip().endswith("validation accuracy: mild.")
  with pytest.raises(ValueError, match="'new' names none of the runs"):
    guarded_selection(runs, default="new")
  np.savez(tmp_path / "mild" / "predictions.npz", test_pred=label, test_label=label,
           val_pred=label[:-1], val_label=label[:-1])         # one image fewer: another split
  with pytest.raises(ValueError, match="mild's validation split is not CE's"):
    guarded_selection(runs)
  os.remove(tmp_path / "CE" / "predictions.npz")              # no baseline: nothing to guard
  with pytest.raises(ValueError, match="CE .*no validation predictions"):
    guarded_selection(runs)


def test_class_changes_gives_tail_points_per_head_point_only_where_the_head_loss_is_shown():
  from experiments.stats import class_changes
  label = np.repeat([0, 1, 2], 100)
  b = np.ones((2, 300), bool)
  b[:, 100:110] = False                       # B misses 10 of class 1 in both seeds
  a = np.ones((2, 300), bool)
  a[:, :20] = False                           # A misses 20 of class 0 (the head), none of 1
  sign = np.array([[-1, 1, 1]] * 2)
  d = class_changes(a, b, label, 3, sign, reps=400)
  assert d["groups"][-1][0] == pytest.approx(-0.2) and d["groups"][1][0] == pytest.approx(0.05)
  ratio, lo, hi = d["exchange"]
  assert ratio == pytest.approx(0.25) and lo < 0.25 < hi and lo > 0
  # A head change indistinguishable from 0 (the same errors as B): no ratio.
  assert class_changes(b, b, label, 3, sign, reps=400)["exchange"] is None
  assert class_changes(a, b, label, 3, None, reps=400)["exchange"] is None


def test_sensitivity_plot_draws_each_logging_method_and_nothing_without_the_log(tmp_path):
  from experiments import report_figures as figs
  rows = [{"epoch": e, "grad_norm_C": [0.1 * e, 2.0 ** e], "sign_C": [-1.0, 1.0]}
          for e in (1, 2, 3)]
  runs = [{"name": "LPA", "seed": k, "history": rows} for k in (0, 1)]
  runs.append({"name": "CE", "seed": 0, "history": [{"epoch": 1, "loss": 1.0}]})
  assert figs.sensitivity_methods(runs) == ["LPA"]
  path = figs.sensitivity_plot(str(tmp_path), runs)
  assert path == str(tmp_path / "sensitivity.png") and os.path.getsize(path) > 1000
  assert figs.sensitivity_plot(str(tmp_path), runs[2:]) is None
