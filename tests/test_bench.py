"""The step-time benchmark: JSON schema, paired ratios, FLOP fractions and the cost model."""
import json

import pytest

from lpa_jax import bench
from lpa_jax.models import get_model
from lpa_jax.perturb import registry

ROW_KEYS = {"method", "level", "point", "T", "ms", "ratio", "model_ratio", "step_gflops",
            "flop_fraction_above", "times_ms", "compile_s", "note"}


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
