"""The step-time benchmark: JSON schema, paired ratios, FLOP fractions and the cost model."""
import json
import math
import types

import pytest

from experiments.bench import cli, flops, points, report, timing
from lpa_jax.models import get_model
from experiments import registry

ROW_KEYS = {"method", "level", "point", "T", "ms", "ratio", "model_ratio", "step_gflops",
            "flop_fraction_above", "timed_model", "times_ms", "compile_s", "note"}


def _broken(cfg, ctx):
  raise RuntimeError("deliberately broken factory")


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_quick_bench_writes_rows_and_survives_a_broken_method(tmp_path, monkeypatch):
  # A method added to the registry at bench time appears; one that fails to build is a row
  # with an error note, not a crash.
  monkeypatch.setitem(registry.ACTIVATION, "broken_for_test", _broken)
  out = tmp_path / "bench.json"
  cli.main(["--quick", "--points", "stem,logits", "--T", "1", "--repeats", "1",
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


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_flop_fractions_fall_towards_the_logits():
  model = get_model("resnet20", 10)
  full, frac = flops.flop_fractions(model, model.points, batch_size=4)
  values = [frac[p] for p in model.points]
  assert full > 0
  assert values == sorted(values, reverse=True)
  stages = [frac[p] for p in points.stage_points(model)]
  assert len(set(stages)) == len(stages)  # strictly falling from stage to stage
  # Each block adds work; a stage's last block is the stage output itself.
  for s in ("stage1", "stage2", "stage3"):
    inner = [frac[p] for p in points.block_points(model, s)]
    assert len(set(inner)) == len(inner) and inner[-1] == pytest.approx(frac[s], abs=1e-9)
  assert values[0] > 0.95 and values[-1] == pytest.approx(0.0, abs=1e-6)
  models = [flops.cost_model(3, f) for f in values]
  assert models == sorted(models, reverse=True) and min(models) >= 1.0
  assert flops.cost_model(5, frac["stem"]) > flops.cost_model(1, frac["stem"])


def _row(point, T, ratio, model_ratio):
  return dict(method="lpa", point=point, T=T, ratio=ratio, model_ratio=model_ratio)


def test_check_reports_both_targets():
  ok = report.check([_row("stage3", 3, 1.05, 1.0), _row("stem", 3, 2.8, 2.9)], "stage3")
  assert [c["ok"] for c in ok] == [True, True]
  bad = report.check([_row("stage3", 3, 1.2, 1.0), _row("stem", 1, 1.2, 1.66)], "stage3")
  assert [c["ok"] for c in bad] == [False, False]
  assert "stage3 T=3" in bad[1]["detail"] and "stem T=1" in bad[1]["detail"]


def _counted(point, T, gflops, frac):
  return dict(method="lpa", point=point, T=T, ratio=1.0, model_ratio=1.0, step_gflops=gflops,
              flop_fraction_above=frac)


def test_flop_check_catches_recomputed_lower_layers():
  # F = 10 GFLOP per device; plain step 30.  stem (F_up/F = 0.9), T = 2: exact is +36.
  plain = dict(method="plain", point=None, T=None, ratio=1.0, model_ratio=None,
               step_gflops=30.0, flop_fraction_above=None)
  exact = report.check([plain, _counted("stem", 2, 66.5, 0.9), _counted("logits", 3, 30.1, 0.0)],
                      "stage3", gflops_forward=10.0)
  assert len(exact) == 3 and exact[2]["ok"] is True
  # Re-running the whole network per PGD step adds 2(F - F_up) = 2 GFLOP per step on top.
  recompute = report.check([plain, _counted("stem", 2, 70.0, 0.9)], "stage3", gflops_forward=10.0)
  assert recompute[2]["ok"] is False and "stem T=2" in recompute[2]["detail"]
  # At the logits, F_up = 0: a full extra forward+backward per step (+2F) must fail too.
  logits = report.check([plain, _counted("logits", 1, 50.0, 0.0)], "stage3", gflops_forward=10.0)
  assert logits[2]["ok"] is False
  # Without counted step FLOPs (GPU runs) the check is absent, not passed.
  assert len(report.check([plain | dict(step_gflops=None), _counted("stem", 2, None, 0.9)],
                         "stage3", gflops_forward=10.0)) == 2


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_rescore_recounts_fractions_on_the_cpu_and_keeps_timings(tmp_path):
  out = tmp_path / "bench.json"
  cli.main(["--quick", "--points", "stem,stage3", "--T", "1", "--repeats", "1", "--steps", "1",
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
  fixed = cli.main(["--rescore", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(fixed))  # written in place
  lpa = [r for r in fixed["rows"] if r["method"] == "lpa"]
  for r in lpa:
    assert r["flop_fraction_above"] == pytest.approx(true_frac[r["point"]], rel=1e-6)
    assert r["model_ratio"] == pytest.approx(flops.cost_model(r["T"], true_frac[r["point"]]))
  assert all(r["step_gflops"] is None for r in fixed["rows"])  # a GPU count is not kept
  assert [r["times_ms"] for r in fixed["rows"]] == times
  counted_by = fixed["settings"]["flop_count"]
  assert "XLA:CPU" in counted_by and "--rescore" in counted_by


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_decompose_times_each_piece_of_the_cost_model():
  model = get_model("resnet20", 10)
  pts = ("stem", "stage3", "logits")
  F, frac = flops.flop_fractions(model, pts, batch_size=4)
  rows = timing.decompose(model, pts, 4, F, frac, steps=1, repeats=1, plain_ms=10.0)
  names = [r["piece"] for r in rows]
  # logits has nothing above it: no PGD piece; stage3 has the pooling and head only.
  assert names == ["forward", "forward+backward", "PGD step at stem", "PGD step at stage3",
                   "plain train step"]
  by = {r["piece"]: r for r in rows}
  assert by["forward+backward"]["gflops"] == pytest.approx(3 * F / 1e9)
  assert by["PGD step at stem"]["gflops"] == pytest.approx(2 * frac["stem"] * F / 1e9)
  assert all(r["ms"] > 0 and r["ms_per_gflop"] == pytest.approx(r["ms"] / r["gflops"])
             for r in rows)
  assert "| PGD step at stem |" in report.decomposition_markdown(rows)


def test_timed_model_uses_the_measured_pieces():
  rows = [dict(method="plain", point=None, T=None, ratio=1.0, model_ratio=None),
          _row("stem", 3, 2.2, 3.0), _row("stage3", 3, 1.0, 1.0), _row("stage2", 1, 1.6, 1.2)]
  result = dict(rows=rows, checks=report.check(rows, "stage3"), decomposition=[
      dict(piece="PGD step at stem", ms=40.0), dict(piece="PGD step at stage2", ms=10.0),
      dict(piece="plain train step", ms=100.0)])
  report.add_timed_model(result)
  stem, stage3, stage2 = rows[1:]
  assert stem["timed_model"] == pytest.approx(2.2)   # 1 + 3 * 40/100
  assert stage3["timed_model"] == 1.0                # no PGD piece: nothing above worth timing
  assert stage2["timed_model"] == pytest.approx(1.1)
  timed = result["checks"][-1]
  assert "timed pieces" in timed["target"] and timed["ok"] is False
  assert "stage2 T=1" in timed["detail"] and "stem" not in timed["detail"]
  report.add_timed_model(result)  # idempotent: one such check, not two
  assert sum("timed pieces" in c["target"] for c in result["checks"]) == 1
  full = [dict(dict.fromkeys(ROW_KEYS), **r, level="activation") for r in rows]
  assert "timed model" in report.markdown(full) and "| 2.200 |" in report.markdown(full)


@pytest.mark.slow  # 19 s; the holds-at-1000-classes check runs by default
def test_flop_check_would_catch_a_onehot_class_gather_at_1000_classes():
  # ResNet-32 with 1000 classes.  `one_hot(y) @ δ` adds 4·B·C·D FLOPs per PGD step; the check
  # allows FLOP_TOL of max(T·2F_up, F).  F, F_up and the gather term all scale with B, so
  # batch 8 gives batch 128's ratios.  At stage3 (D = 8·8·64) the term is ~2.5x the tolerance
  # at T = 1 (16.4 vs 6.5 MFLOP per example), at the stem ~5x: the check must fail.
  model, B, C = get_model("resnet32", 1000), 8, 1000
  pts = ("stem", "stage1", "stage2", "stage3", "features", "logits")
  F, frac = flops.flop_fractions(model, pts, batch_size=B)
  dim = {p: math.prod(flops.activation_shape(model, p, B)[1:]) for p in pts}
  plain = dict(method="plain", point=None, T=None, ratio=1.0, model_ratio=None,
               step_gflops=3 * F / 1e9, flop_fraction_above=None)

  def rows(gather):
    out = [plain]
    for p in pts:
      for T in (1, 3, 5):
        extra = T * (2 * frac[p] * F + gather(p))
        out.append(_counted(p, T, (3 * F + extra) / 1e9, frac[p]))
    return out
  exact = flops.flop_check(rows(lambda p: 0.0), F / 1e9)
  onehot = flops.flop_check(rows(lambda p: flops.onehot_gather_flops(B, C, dim[p])), F / 1e9)
  assert exact["ok"] is True
  assert onehot["ok"] is False
  for p in ("stem", "stage1", "stage2", "stage3"):  # every convolutional point, every T
    for T in (1, 3, 5):
      assert f"{p} T={T}:" in onehot["detail"]
  tol = flops.FLOP_TOL * F  # at stage3 T = 1 the scale is F (F_up is only pooling and head)
  assert flops.onehot_gather_flops(B, C, dim["stage3"]) > 2 * tol


def test_flop_check_holds_at_1000_classes(tmp_path):
  # The MLP at 1000 classes, batch 256, one device: the table's own O(C·D) work per PGD step
  # (update, normalise, project; replicated, so not divided over devices) and the O(B·C) loss
  # stay ~3 % of the scale, under FLOP_TOL.  With one_hot(y) @ δ the gap was ~+100 %.
  out = tmp_path / "bench.json"
  res = cli.main(["--model", "mlp", "--batch", "256", "--num-classes", "1000", "--points",
                  "hidden1,hidden2", "--T", "1,3", "--only", "plain,lpa", "--repeats", "1",
                  "--devices", "1", "--out", str(out)])
  assert res["settings"]["num_classes"] == 1000
  assert [r["note"] for r in res["rows"]] == [None] * 5
  flop = [c for c in res["checks"] if "FLOPs to plain" in c["target"]]
  assert len(flop) == 1 and flop[0]["ok"] is True, flop[0]["detail"]


def test_bench_data_spreads_labels_over_the_classes():
  data, note = timing.bench_data(batch_size=64, num_classes=1000)
  assert data.num_classes == 1000 and len(data.class_counts()) == 1000
  assert len(set(data.y_train.tolist())) == 64 and data.y_train.max() < 1000
  assert "1000 classes" in note


def _fake_model(*names):
  return types.SimpleNamespace(points=names)


def test_points_order_blocks_before_their_stage_and_pick_two_inside_the_last():
  model = _fake_model("stem", "stage1", "stage3.block10", "stage3.block2", "stage3.block0",
                      "stage3", "features", "logits")
  assert points.stage_points(model) == ("stem", "stage1", "stage3", "features", "logits")
  assert points.last_stage(model) == "stage3"
  blocks = points.block_points(model, "stage3")
  assert blocks == ("stage3.block0", "stage3.block2", "stage3.block10")
  assert points.order(model, ["logits", "stage3", "stage3.block2", "stem"]) == (
      "stem", "stage3.block2", "stage3", "logits")
  frac = {"stage3.block0": 0.27, "stage3.block2": 0.13, "stage3.block10": 0.0, "stage3": 0.0}
  chosen = points.choose_default(points.stage_points(model), blocks, frac)
  # The block nearest the published cost (F_up/F = 0.09) and one more; never the last block,
  # which is the stage output again.
  assert chosen == ("stem", "stage1", "stage3.block0", "stage3.block2", "stage3", "features",
                    "logits")
  assert points.choose_default(("stem", "stage3"), (), {}) == ("stem", "stage3")


def test_unknown_point_lists_the_valid_ones():
  with pytest.raises(ValueError, match="valid points: stem, stage1"):
    points.parse_points(get_model("resnet20", 10), "stage2,stage9.block1")
  assert points.parse_points(get_model("resnet20", 10), "stage3, stem") == ("stem", "stage3")


def test_fraction_table_names_the_block_closest_to_the_paper():
  text = report.fractions_markdown({"stage2": 0.3, "stage3.block2": 0.13, "stage3.block3": 0.067,
                                    "stage3": 0.0}, flops.PAPER_FRACTION)
  assert "| stage3.block3 | 0.0670 | 1.134 |" in text
  assert text.endswith("stage3.block3.")
  assert "Closest" not in report.fractions_markdown({"stage2": 0.3}, 0.09)


def test_default_grid_covers_two_points_inside_the_last_stage():
  model = get_model("resnet20", 10)  # three blocks per stage; stage3.block2 is stage3 itself
  grid, _, frac = cli.grid_points(model, None, batch_size=4)
  assert grid == ("stem", "stage1", "stage2", "stage3.block0", "stage3.block1", "stage3",
                  "features", "logits")
  assert set(points.block_points(model, "stage3")) <= set(frac)  # every block is reported
  assert frac["stage2"] > frac["stage3.block0"] > frac["stage3.block1"] > frac["stage3"]
  explicit, _, _ = cli.grid_points(model, "stage3,stage3.block1,stage2", batch_size=4)
  assert explicit == ("stage2", "stage3.block1", "stage3")


def test_throughput_protocol_formula_and_evaluation_count():
  from experiments.bench import throughput
  # 200 epochs evaluated every 10th (20) plus the final evaluation.
  assert throughput.n_evaluations(200, 10) == 21
  assert throughput.n_evaluations(7, 1) == 8
  p = throughput.protocol(4, step_s=0.5, eval_s=20.0, num_epochs=10, spe=100, n_evals=3,
                          batch=128)
  assert p["protocol_s"] == pytest.approx(10 * 100 * 0.5 + 3 * 20.0)
  assert p["runs_per_hour"] == pytest.approx(4 * 3600 / 560.0)
  assert p["images_per_s"] == pytest.approx(4 * 10 * 100 * 128 / 560.0)
  assert p["train_images_per_s"] == pytest.approx(4 * 128 / 0.5)


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_throughput_times_k_parallel_runs_and_labels_fixed_steps(fmnist_lt, tmp_path):
  from conftest import small_config
  from experiments.bench import throughput
  from experiments.fill import render
  config = small_config()
  res = throughput.run(config, ks=(1, 2), dtypes=("float32", "bfloat16"), steps=2,
                       test_subset=100, data=fmnist_lt, log=lambda *_: None)
  rows = res["rows"]
  assert [(r["dtype"], r["K"]) for r in rows] == [("float32", 1), ("float32", 2),
                                                  ("bfloat16", 1), ("bfloat16", 2)]
  spe = fmnist_lt.num_train // config.optim.batch_size
  assert res["settings"]["steps_per_epoch"] == spe and res["settings"]["n_evals"] == 3
  for r in rows:
    assert r["timed_steps"] == min(2, spe) and r["step_ms"] > 0 and r["compile_s"] >= 0
    assert "steps" in r["mode"] and "eval of 100 test images scaled to" in r["mode"]
    # The extrapolated protocol is made of the measured pieces.
    assert r["protocol_s"] == pytest.approx(2 * spe * r["step_ms"] / 1e3 + 3 * r["eval_s"])
    assert r["runs_per_hour"] == pytest.approx(r["K"] * 3600 / r["protocol_s"])
  assert rows[0]["vs_k1"] == 1.0 and rows[1]["vs_k1"] == pytest.approx(
      rows[1]["runs_per_hour"] / rows[0]["runs_per_hour"])
  assert rows[0]["vs_float32"] is None and rows[3]["vs_float32"] == pytest.approx(
      rows[3]["runs_per_hour"] / rows[1]["runs_per_hour"])
  assert [c["ok"] for c in res["checks"]] == [None, None]  # K = 8 not run
  assert len(res["machine"]["load_average_start"]) == 3
  table = throughput.markdown(res)
  assert table.count("\n| bfloat16 |") == 2 and "not run: float32: K=8" in table
  path = tmp_path / "tp.json"
  path.write_text(json.dumps(res))
  filled = render(f"bench-throughput:{path}")
  assert filled.startswith("Machine: ") and filled.endswith(table)


def test_throughput_flags_parse_and_leave_steps_unset():
  a = cli.parse_args(["--throughput", "--k", "1,8", "--dtype", "float32,bfloat16",
                      "--n-max", "500", "--test-subset", "1000"])
  assert (a.throughput, a.k, a.dtype, a.n_max, a.test_subset) == (
      True, "1,8", "float32,bfloat16", 500, 1000)
  assert a.steps is None and a.model is None  # a whole epoch of the config's own model
  assert cli.parse_args(["--quick"]).steps == 1
