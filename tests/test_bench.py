"""The step-time benchmark: JSON schema, paired ratios, FLOP fractions and the cost model."""
import json

import pytest

from lpa_jax import bench
from lpa_jax.models import get_model
from lpa_jax.perturb import registry

ROW_KEYS = {"method", "level", "point", "T", "ms", "ratio", "model_ratio", "step_gflops",
            "flop_fraction_above", "timed_model", "times_ms", "compile_s", "note"}


def _broken(cfg, ctx):
  raise RuntimeError("deliberately broken factory")


def test_quick_bench_writes_rows_and_survives_a_broken_method(tmp_path, monkeypatch):
  # A method added to the registry at bench time appears; one that fails to build is a row
  # with an error note, not a crash.
  monkeypatch.setitem(registry.ACTIVATION, "broken_for_test", _broken)
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--points", "stem,logits", "--T", "1", "--repeats", "1",
              "--steps", "1", "--only", "plain,lpa,broken_for_test", "--check",
              "--out", str(out)])
  res = json.loads(out.read_text())
  assert set(res) == {"settings", "machine", "rows", "checks"}
  assert {"platform", "devices", "cpu_count", "jax", "backend"} <= set(res["machine"])
  rows = res["rows"]
  assert all(set(r) == ROW_KEYS for r in rows)
  assert [(r["method"], r["point"], r["T"]) for r in rows] == [
      ("plain", None, None), ("lpa", "stem", 1), ("lpa", "logits", 1),
      ("broken_for_test", None, None)]
  plain, stem, logits, broken = rows
  assert plain["ratio"] == 1.0 and plain["ms"] > 0 and plain["model_ratio"] is None
  assert "deliberately broken" in broken["note"] and broken["ms"] is None
  for r in (stem, logits):
    assert r["note"] is None and r["ms"] > 0 and r["ratio"] > 0
  # More FLOPs above the point -> a dearer step, in the model.
  assert stem["model_ratio"] > logits["model_ratio"] >= 1.0
  assert stem["flop_fraction_above"] > 0.95
  assert logits["flop_fraction_above"] < 1e-3
  assert [c["ok"] for c in res["checks"]][0] is None  # stage3 T=3 was not run
  # The compiled LPA step does exactly the cost model's extra work: T=1 adds one forward and
  # one activation-backward of the upper part (2 F_up), so `lower` is not recomputed.
  f_dev = res["settings"]["flops_forward"] / res["machine"]["mesh_devices"] / 1e9
  extra = stem["step_gflops"] - plain["step_gflops"]
  assert extra == pytest.approx(2 * stem["flop_fraction_above"] * f_dev, rel=0.1)
  assert abs(logits["step_gflops"] - plain["step_gflops"]) < 0.02 * plain["step_gflops"]


def test_flop_fractions_fall_towards_the_logits():
  model = get_model("resnet20", 10)
  full, frac = bench.flop_fractions(model, model.points, batch_size=4)
  values = [frac[p] for p in model.points]
  assert full > 0
  assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
  assert values[0] > 0.95 and values[-1] == pytest.approx(0.0, abs=1e-6)
  models = [bench.cost_model(3, f) for f in values]
  assert models == sorted(models, reverse=True) and min(models) >= 1.0
  assert bench.cost_model(5, frac["stem"]) > bench.cost_model(1, frac["stem"])


def _row(point, T, ratio, model_ratio):
  return dict(method="lpa", point=point, T=T, ratio=ratio, model_ratio=model_ratio)


def test_check_reports_both_targets():
  ok = bench.check([_row("stage3", 3, 1.05, 1.0), _row("stem", 3, 2.8, 2.9)], "stage3")
  assert [c["ok"] for c in ok] == [True, True]
  bad = bench.check([_row("stage3", 3, 1.2, 1.0), _row("stem", 1, 1.2, 1.66)], "stage3")
  assert [c["ok"] for c in bad] == [False, False]
  assert "stage3 T=3" in bad[1]["detail"] and "stem T=1" in bad[1]["detail"]


def _counted(point, T, gflops, frac):
  return dict(method="lpa", point=point, T=T, ratio=1.0, model_ratio=1.0, step_gflops=gflops,
              flop_fraction_above=frac)


def test_flop_check_catches_recomputed_lower_layers():
  # F = 10 GFLOP per device; plain step 30.  stem (F_up/F = 0.9), T = 2: exact is +36.
  plain = dict(method="plain", point=None, T=None, ratio=1.0, model_ratio=None,
               step_gflops=30.0, flop_fraction_above=None)
  exact = bench.check([plain, _counted("stem", 2, 66.5, 0.9), _counted("logits", 3, 30.1, 0.0)],
                      "stage3", gflops_forward=10.0)
  assert len(exact) == 3 and exact[2]["ok"] is True
  # Re-running the whole network per PGD step adds 2(F - F_up) = 2 GFLOP per step on top.
  recompute = bench.check([plain, _counted("stem", 2, 70.0, 0.9)], "stage3", gflops_forward=10.0)
  assert recompute[2]["ok"] is False and "stem T=2" in recompute[2]["detail"]
  # At the logits, F_up = 0: a full extra forward+backward per step (+2F) must fail too.
  logits = bench.check([plain, _counted("logits", 1, 50.0, 0.0)], "stage3", gflops_forward=10.0)
  assert logits[2]["ok"] is False
  # Without counted step FLOPs (GPU runs) the check is absent, not passed.
  assert len(bench.check([plain | dict(step_gflops=None), _counted("stem", 2, None, 0.9)],
                         "stage3", gflops_forward=10.0)) == 2


def test_rescore_recounts_fractions_on_the_cpu_and_keeps_timings(tmp_path):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--points", "stem,stage3", "--T", "1", "--repeats", "1", "--steps", "1",
              "--only", "plain,lpa", "--out", str(out)])
  res = json.loads(out.read_text())
  true_frac = {r["point"]: r["flop_fraction_above"] for r in res["rows"] if r["method"] == "lpa"}
  times = [r["times_ms"] for r in res["rows"]]
  # What a GPU run used to write: fractions from XLA:GPU's count (convolutions missing).
  res["machine"]["backend"] = "gpu"
  for r in res["rows"]:
    if r["method"] == "lpa":
      r["flop_fraction_above"], r["model_ratio"] = 0.5, 9.9
  out.write_text(json.dumps(res))
  fixed = bench.main(["--rescore", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(fixed))  # written in place
  lpa = [r for r in fixed["rows"] if r["method"] == "lpa"]
  for r in lpa:
    assert r["flop_fraction_above"] == pytest.approx(true_frac[r["point"]], rel=1e-6)
    assert r["model_ratio"] == pytest.approx(bench.cost_model(r["T"], true_frac[r["point"]]))
  assert all(r["step_gflops"] is None for r in fixed["rows"])  # a GPU count is not kept
  assert [r["times_ms"] for r in fixed["rows"]] == times
  assert "XLA:CPU" in fixed["settings"]["flop_count"] and "--rescore" in fixed["settings"]["flop_count"]


def test_decompose_times_each_piece_of_the_cost_model():
  model = get_model("resnet20", 10)
  points = ("stem", "stage3", "logits")
  flops, frac = bench.flop_fractions(model, points, batch_size=4)
  rows = bench.decompose(model, points, 4, flops, frac, steps=1, repeats=1, plain_ms=10.0)
  names = [r["piece"] for r in rows]
  # logits has nothing above it: no PGD piece; stage3 has the pooling and head only.
  assert names == ["forward", "forward+backward", "PGD step at stem", "PGD step at stage3",
                   "plain train step"]
  by = {r["piece"]: r for r in rows}
  assert by["forward+backward"]["gflops"] == pytest.approx(3 * flops / 1e9)
  assert by["PGD step at stem"]["gflops"] == pytest.approx(2 * frac["stem"] * flops / 1e9)
  assert all(r["ms"] > 0 and r["ms_per_gflop"] == pytest.approx(r["ms"] / r["gflops"])
             for r in rows)
  assert "| PGD step at stem |" in bench.decomposition_markdown(rows)


def test_timed_model_uses_the_measured_pieces():
  rows = [dict(method="plain", point=None, T=None, ratio=1.0, model_ratio=None),
          _row("stem", 3, 2.2, 3.0), _row("stage3", 3, 1.0, 1.0), _row("stage2", 1, 1.6, 1.2)]
  result = dict(rows=rows, checks=bench.check(rows, "stage3"), decomposition=[
      dict(piece="PGD step at stem", ms=40.0), dict(piece="PGD step at stage2", ms=10.0),
      dict(piece="plain train step", ms=100.0)])
  bench.add_timed_model(result)
  stem, stage3, stage2 = rows[1:]
  assert stem["timed_model"] == pytest.approx(2.2)   # 1 + 3 * 40/100
  assert stage3["timed_model"] == 1.0                # no PGD piece: nothing above worth timing
  assert stage2["timed_model"] == pytest.approx(1.1)
  timed = result["checks"][-1]
  assert "timed pieces" in timed["target"] and timed["ok"] is False
  assert "stage2 T=1" in timed["detail"] and "stem" not in timed["detail"]
  bench.add_timed_model(result)  # idempotent: one such check, not two
  assert sum("timed pieces" in c["target"] for c in result["checks"]) == 1
  full = [dict(dict.fromkeys(ROW_KEYS), **r, level="activation") for r in rows]
  assert "timed model" in bench.markdown(full) and "| 2.200 |" in bench.markdown(full)
