"""Generated Markdown blocks equal what the report writer and the bench JSON say."""
import re

import pytest

from experiments import fill


def test_suite_block_equals_the_suite_report(tmp_path):
  doc = tmp_path / "doc.md"
  key = "suite:noisy_fmnist"
  doc.write_text(f"intro\n<!-- BEGIN {key} -->\nstale\n<!-- END {key} -->\n")
  assert fill.fill(str(doc)) == 1
  body = doc.read_text()
  assert "stale" not in body
  table = fill.suite_table("noisy_fmnist")
  assert table in body
  report = (fill.RESULTS + "/noisy_fmnist/report.md")
  assert table in open(report).read()  # the committed report shows the same numbers


def test_bench_block_lists_every_row_and_check(tmp_path):
  doc = tmp_path / "doc.md"
  key = "bench:experiments/results/bench_cpu.json"
  doc.write_text(f"<!-- BEGIN {key} -->\n<!-- END {key} -->\n")
  fill.fill(str(doc))
  body = doc.read_text()
  assert "| plain | none |" in body and "LPA T=3 at stage3" in body


def test_bench_diff_block_is_computed_from_both_runs(tmp_path):
  import json
  row = lambda m, p, t, r: dict(method=m, point=p, T=t, ratio=r)
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(dict(rows=[row("plain", None, None, 1.0), row("lpa", "stem", 1, 2.0),
                                     row("lpa", "stage3", 3, 1.0), row("sam", None, None, 1.8)])))
  b.write_text(json.dumps(dict(rows=[row("plain", None, None, 1.0), row("lpa", "stem", 1, 2.2),
                                     row("lpa", "stage3", 3, 1.0)])))
  text = fill.bench_diff(f"{a},{b}")  # absolute paths pass through os.path.join
  assert "2 rows" in text and "10.0% at most (lpa stem 1)" in text and "5.0% at the median" in text


def test_bench_block_of_a_fractions_run_names_the_block_nearest_the_paper(tmp_path):
  import json
  run = dict(settings=dict(model="resnet32", num_classes=10, batch=128, flop_count="XLA:CPU",
                           flop_mode="train", flops_forward=1.0, flop_fractions={
                               "stage2": 0.2973, "stage3.block2": 0.1231,
                               "stage3.block3": 0.0616, "stage3": 0.0}))
  path = tmp_path / "frac.json"
  path.write_text(json.dumps(run))
  text = fill.bench_table(str(path))  # absolute paths pass through os.path.join
  assert text.startswith("resnet32, 10 classes, batch 128")
  assert "| stage3.block3 | 0.0616 | 1.123 |" in text
  assert text.endswith("stage3.block3.")


def test_compare_reports_identical_and_different_runs(tmp_path):
  import json as _json
  from experiments import compare
  for root, acc in (("a", 0.5), ("b", 0.5), ("c", 0.6)):
    d = tmp_path / root / "runs" / "ce" / "seed0"
    d.mkdir(parents=True)
    (d / "results.json").write_text(_json.dumps({"test_accuracy": acc,
                                                 "per_class_accuracy": [acc, acc]}))
  assert compare.compare(str(tmp_path / "a"), str(tmp_path / "b")) == [("ce/seed0", 0.5, 0.5,
                                                                         True)]
  assert compare.main(["x", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
  # Same accuracies, other per-sample predictions: not identical.
  import numpy as _np
  for root, preds in (("a", [0, 1, 1]), ("b", [1, 0, 1])):
    _np.savez(tmp_path / root / "runs" / "ce" / "seed0" / "predictions.npz",
              test_pred=_np.array(preds))
  assert compare.compare(str(tmp_path / "a"), str(tmp_path / "b"))[0][3] is False


@pytest.mark.parametrize("suite,kinds,expect", [
    ("fmnist_lt_main", ("paired", "strength"), ("| LPA | CE |",)),
    ("rmnist_dg", ("domain", "domain-paired"), ("| ERM |", "| average |"))])
def test_comparison_blocks_equal_the_suite_report(tmp_path, suite, kinds, expect):
  doc = tmp_path / "doc.md"
  doc.write_text("".join(f"<!-- BEGIN {k}:{suite} -->\nSTALE-BODY\n<!-- END {k}:{suite} -->\n"
                         for k in kinds))
  assert fill.fill(str(doc)) == len(kinds)
  body, report = doc.read_text(), open(f"{fill.RESULTS}/{suite}/report.md").read()
  assert "STALE-BODY" not in body and all(e in body for e in expect)
  for _, _, table, _ in fill.BLOCK.findall(body):
    assert table.strip() and table.strip() in report


def test_documents_finds_every_markdown_file_with_blocks(tmp_path, monkeypatch):
  block = "<!-- BEGIN suite:a -->\nx\n<!-- END suite:a -->\n"
  results = tmp_path / "experiments" / "results"
  for name, body in [("a", block), ("b", "prose only, no block\n"), ("c", None)]:
    (results / name).mkdir(parents=True)
    if body is not None:
      (results / name / "README.md").write_text(body)
  (results / "README.md").write_text(block)
  for rel in ("docs/benchmarks.md", "docs/guides/k_runs.md", "runs/x/notes.md",
              ".hidden/a.md", "docs/_build/page.md"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(block)
  (tmp_path / "docs" / "index.md").write_text("no block\n")
  monkeypatch.setattr(fill, "ROOT", str(tmp_path))
  monkeypatch.setattr(fill, "RESULTS", str(results))
  # The README first even without a block; work dirs, builds and hidden folders are skipped.
  assert fill.documents() == ["README.md", "docs/benchmarks.md", "docs/guides/k_runs.md",
                              "experiments/results/README.md", "experiments/results/a/README.md"]


def test_committed_documents_show_what_their_blocks_regenerate(tmp_path):
  # Every number in a generated block comes from the records: refilling changes nothing.
  import os
  import shutil
  assert {"README.md", "docs/benchmarks.md", "experiments/results/README.md"} <= set(
      fill.documents())
  for i, rel in enumerate(fill.documents()):
    copy = tmp_path / f"{i}_{os.path.basename(rel)}"
    shutil.copy(os.path.join(fill.ROOT, rel), copy)
    before = copy.read_text()
    fill.fill(str(copy))
    assert copy.read_text() == before, f"{rel} is stale: python -m experiments.fill --write {rel}"


def test_joined_suites_pair_by_seed_and_name_bad_slugs():
  import pytest
  spec = "fmnist_lt_main[ce|lpa]+fmnist_lt_mechanism@0,1,2"
  runs = fill._runs(spec)
  names = list(dict.fromkeys(r["name"] for r in runs))
  assert names[:2] == ["CE", "LPA"] and "LPA fixed radius" in names
  assert {r["seed"] for r in runs} == {0, 1, 2}
  paired = fill.render("paired:" + spec)
  # The mechanism rows are paired with the main table's CE over the 3 shared seeds.
  assert "| LPA fixed radius | CE | 3 |" in paired
  assert "| LPA tail-expansive only | LPA | 3 |" in fill.render(
      "paired:fmnist_lt_main[lpa]+fmnist_lt_mechanism@0,1,2")
  with pytest.raises(ValueError, match=r"has no runs \['cee'\].*'ce'"):
    fill._runs("fmnist_lt_main[cee]")


def test_stopped_block_shows_the_stopped_runs_epochs():
  text = fill.render("stopped:fmnist_lt_mechanism")
  assert text.startswith("`runs/lpa-beta-0-9/seed1` (epochs logged before the stop: 1–8)")
  assert "| test acc % |" in text and "| loss change (nats) |" in text


def test_time_block_sums_the_runs_wall_time():
  from experiments import report
  runs = report.load_runs(fill.RESULTS + "/fmnist_lt_schedule")
  hours = sum(r["results"]["wall_time_s"] for r in runs) / 3600
  assert fill.render("time:fmnist_lt_schedule") == (
      f"`fmnist_lt_schedule`: {len(runs)} runs, {hours:.1f} core-hours")
  both = fill.render("time:fmnist_lt_schedule+fmnist_lt_schedule")
  assert both.endswith(f"{2 * len(runs)} runs, {2 * hours:.1f} core-hours")


def test_across_best_block_pairs_the_best_epochs_test_accuracy():
  from experiments import report
  runs = report.load_runs(fill.RESULTS + "/noisy_fmnist_asym40")
  ce = [r["results"]["best_epoch_test_accuracy"] for r in runs if r["name"] == "CE"]
  last = fill.render("across:noisy_fmnist_asym40").splitlines()[2]
  best = fill.render("across-best:noisy_fmnist_asym40").splitlines()[2]
  assert best == f"| CE | {100 * sum(ce) / len(ce):.2f} |" and best != last


def test_times_block_lists_each_suite_and_the_total():
  rows = fill.render("times:fmnist_lt_schedule+noisy_schedule").splitlines()
  one = fill.render("time:fmnist_lt_schedule").split(": ")[1]      # "N runs, X core-hours"
  n, hours = int(one.split()[0]), float(one.split()[2])
  assert rows[2].startswith(f"| `fmnist_lt_schedule` | {n} | ") and len(rows) == 5
  assert abs(float(rows[2].split("|")[3]) - hours) < 0.051
  both = fill.render("time:fmnist_lt_schedule+noisy_schedule").split(": ")[1]
  assert rows[4].startswith(f"| all | {int(both.split()[0])} | ")


def test_an_unknown_block_names_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown block 'nope:x'; known: suite:<name>, paired:"):
    fill.render("nope:x")


def test_the_command_checks_by_default_and_rewrites_only_with_write(tmp_path, capsys):
  doc = tmp_path / "doc.md"
  key = "suite:noisy_fmnist"
  stale = f"intro\n<!-- BEGIN {key} -->\nstale\n<!-- END {key} -->\n"
  doc.write_text(stale)
  assert fill.main([str(doc)]) == 1                  # a check: names the block, writes nothing
  assert key in capsys.readouterr().out and doc.read_text() == stale
  assert fill.main(["--write", str(doc)]) == 0
  assert "stale" not in doc.read_text()
  assert fill.main([str(doc)]) == 0                  # now current
  with pytest.raises(SystemExit) as e:
    fill.main(["--help"])
  assert e.value.code == 0


def test_the_benchmark_tables_live_in_docs_and_the_readme_holds_one_summary():
  import os
  read = lambda rel: open(os.path.join(fill.ROOT, rel), encoding="utf-8").read()
  blocks = {rel: [m.group(2) for m in fill.BLOCK.finditer(read(rel))]
            for rel in ("README.md", "docs/benchmarks.md")}
  assert [k.split(":")[0] for k in blocks["README.md"]] == ["summary"]
  assert {k.split(":")[0] for k in blocks["docs/benchmarks.md"]} == {
      "bench", "bench-diff", "bench-throughput"}


def test_summary_block_adds_the_whole_test_set_to_the_class_table():
  spec = "fmnist_lt_main[ce|lpa|ldam-drw]"
  text = fill.render("summary:" + spec)
  caption, _, table = text.partition("\n\n")
  assert caption.startswith("Fashion-MNIST-LT (IR=100), 14886 training images, 30 epochs, "
                            "5 seeds per method.") and "below 0.0625" in caption
  classes = fill.render("classes:" + spec).splitlines()
  rows = table.splitlines()
  overall = [r for r in rows if r.startswith("| **all classes")]
  assert len(overall) == 1 and [r for r in rows if r not in overall] == classes
  # The whole-test-set row shows the paired table's numbers, to one decimal.
  paired = {r.split(" | ")[0][2:]: r.split(" | ") for r in
            fill.render("paired:" + spec).splitlines()[2:]}
  cells = overall[0].strip("| ").split(" | ")
  for name, cell in zip(["LPA", "LDAM-DRW"], cells[3:]):
    mean, lo, hi = (float(v) for v in re.findall(r"[+-]\d+\.\d+", cell))
    want_lo, want_hi = (float(v) for v in re.findall(r"[+-]\d+\.\d+", paired[name][4]))
    assert abs(mean - float(paired[name][3])) <= 0.051
    assert abs(lo - want_lo) <= 0.051 and abs(hi - want_hi) <= 0.051
