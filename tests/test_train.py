"""Train step and loop: data parallelism, one compile, resume, NaN stop, configs, results."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from experiments.train import loop
from experiments.train.build import build_run, build_train_step
from experiments.train.schedules import make_schedule
from lpa_jax.train.step import make_mesh


def _steps(cfg, data, mesh, n):
  step, state, batch_fn = build_train_step(cfg, data, mesh)
  metrics = None
  for i in range(n):
    state, metrics = step(state, batch_fn(state, 0, i))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.multidevice
@pytest.mark.parametrize("activation", ["none", "lpa"])
def test_eight_devices_match_one(fmnist_lt, activation):
  assert jax.device_count() == 8
  cfg = small_config(**{"perturb.activation": activation, "perturb.lpa.eps": 1.0,
                        "perturb.lpa.split": "longtail"})
  s1, m1 = _steps(cfg, fmnist_lt, make_mesh(jax.devices()[:1]), 3)
  s8, m8 = _steps(cfg, fmnist_lt, make_mesh(), 3)
  chex.assert_trees_all_close(s1.params, s8.params, rtol=2e-4, atol=2e-5)
  if activation == "lpa":  # δ comes from the global batch on both
    np.testing.assert_allclose(m1["delta_norm_C"], m8["delta_norm_C"], rtol=1e-4, atol=1e-6)
    assert np.max(m1["delta_norm_C"]) > 0


def test_step_compiles_once_across_epochs(fmnist_lt):
  cfg = small_config(**{"perturb.activation": "lpa"})
  run = build_run(cfg, fmnist_lt, make_mesh())
  state, spe = run.init_state, run.steps_per_epoch
  for step in range(spe + 2):  # crosses an epoch boundary (split refresh)
    state, _ = run.train_step(state, run.batch_fn(state, step // spe, step % spe))
  assert run.train_step._cache_size() == 1


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
  cfg = small_config(**{"perturb.activation": "lpa", "perturb.lpa.eps": 0.5,
                        "optim.batch_size": 32})
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), progress=False)
  part = str(tmp_path / "part")
  total = full["steps"]
  assert total >= 8
  # Stop twice mid-epoch (and once across an epoch boundary), then finish.
  assert loop.train_and_evaluate(cfg, part, progress=False, max_steps=3) is None
  assert loop.train_and_evaluate(cfg, part, progress=False, max_steps=total - 5) is None
  resumed = loop.train_and_evaluate(cfg, part, progress=False)
  assert resumed["steps"] == full["steps"]
  assert resumed["test_accuracy"] == full["test_accuracy"]
  assert resumed["per_class_accuracy"] == full["per_class_accuracy"]
  # One row per epoch, and the epochs cut in two average over all their steps, as unbroken.
  rows = [json.loads(x) for x in open(os.path.join(part, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [1, 2]
  assert rows == [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]


def test_a_resumed_runs_wall_time_counts_every_invocation(tmp_path, monkeypatch):
  # The sweeps' measured core-hours add results.json's wall_time_s: a run resumed from a
  # checkpoint must not report only its last invocation.  The first invocation runs on a
  # clock that advances 100 s per reading, the second on the real one.
  import types
  cfg = small_config(**{"optim.batch_size": 32})
  ticks = iter(range(0, 10**6, 100))
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: float(next(ticks))))
  assert loop.train_and_evaluate(cfg, str(tmp_path), progress=False, max_steps=3) is None
  monkeypatch.undo()
  res = loop.train_and_evaluate(cfg, str(tmp_path), progress=False)
  assert 100 <= res["wall_time_s"] < 100 + 600, res["wall_time_s"]


def test_results_json_has_the_promised_fields(tmp_path):
  cfg = small_config(**{"perturb.activation": "lpa", "optim.num_epochs": 1})
  loop.train_and_evaluate(cfg, str(tmp_path), progress=False)
  with open(tmp_path / "results.json") as f:  # strict JSON: no NaN / Infinity anywhere
    res = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
  for key in ("test_accuracy", "per_class_accuracy", "shot_accuracy", "dataset", "num_train",
              "config", "devices", "wall_time_s"):
    assert key in res, key
  assert res["dataset"] == "Fashion-MNIST-LT (IR=100)"
  assert len(res["per_class_accuracy"]) == 10
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert len(lines) == 1 and "delta_norm_C" in json.loads(lines[0])


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, fmnist_lt):
  cfg = small_config(**{"optim.lr": 1e30})
  with pytest.raises(FloatingPointError, match="loss became"):
    loop.train_and_evaluate(cfg, str(tmp_path), progress=False)


@pytest.mark.parametrize("split", ["x_train", "x_val", "x_test"])
def test_non_finite_inputs_are_refused_before_training(tmp_path, fmnist_lt, split):
  # NaN training images used to stop the run at its first step as a NaN loss (blaming the
  # learning rate); NaN test images gave NaN logits, scored as class 0, and an accuracy.
  import dataclasses

  import numpy as np

  from experiments.data.sources import DataCorrupt
  data = dataclasses.replace(fmnist_lt, x_val=fmnist_lt.x_test[:50], y_val=fmnist_lt.y_test[:50])
  x = getattr(data, split).astype(np.float32)
  x[3, 0, 0, 0] = np.nan
  data = dataclasses.replace(data, **{split: x})
  with pytest.raises(DataCorrupt, match=rf"{split} holds 1 NaN or infinite value\(s\) in 1 of "
                     rf"{len(x)} images \(the first: image 3\)"):
    loop.train_and_evaluate(small_config(), str(tmp_path / "run"), progress=False, data=data)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,match", [
    ("optim.lr", -1.0, "optim.lr"),
    ("train.augment", "rotate", "train.augment"),
    ("perturb.activation", "magic", "registered"),
    ("data.noise_rate", 1.5, "data.noise_rate"),
])
def test_bad_config_values_name_the_field(field, value, match):
  from experiments.configs.common import validate
  with pytest.raises(ValueError, match=match):
    validate(small_config(**{field: value}))


def test_unknown_lpa_point_lists_valid_points(fmnist_lt):
  cfg = small_config(**{"perturb.activation": "lpa", "perturb.lpa.point": "stage3"})
  with pytest.raises(ValueError, match="hidden1, hidden2, logits"):
    build_run(cfg, fmnist_lt, make_mesh())


def test_step_schedule_matches_the_longtail_protocol():
  from experiments.configs import longtail
  cfg = longtail.get_config("paper_cifar10").optim
  sched = make_schedule(cfg, steps_per_epoch=10, num_epochs=200)
  np.testing.assert_allclose(float(sched(0)), 0.1 / 50, rtol=1e-5)  # linear warm-up, 5 epochs
  np.testing.assert_allclose(float(sched(100)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(sched(1600)), 0.1 * 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(sched(1800)), 0.1 * 1e-4, rtol=1e-6)


def test_a_nan_class_statistic_stops_the_run_naming_method_point_and_class(tmp_path, fmnist_lt,
                                                                           monkeypatch):
  """Fault injection: the epoch's statistic of class 2 turns NaN at the first refresh."""
  from lpa_jax.perturb import classes
  real = classes.refresh_split

  def poisoned(rule, split, stats):
    out = real(rule, split, stats)
    return out._replace(q_C=out.q_C.at[2].set(jnp.nan))
  monkeypatch.setattr(classes, "refresh_split", poisoned)
  cfg = small_config(**{"perturb.activation": "lpa", "perturb.lpa.split": "balanced",
                        "perturb.lpa.point": "hidden1"})
  with pytest.raises(FloatingPointError,
                     match=r"lpa at point 'hidden1': non-finite class_stat_C at class\(es\) \[2\]"):
    loop.train_and_evaluate(cfg, str(tmp_path), progress=False, data=fmnist_lt)


def test_clipping_that_never_acts_is_reported_and_warned(tmp_path, fmnist_lt):
  # A clipping run whose threshold no gradient reaches equals plain training: say so.
  never = small_config(**{"perturb.gradient": "clip", "perturb.clip.max_norm": 1e6})
  with pytest.warns(UserWarning, match="Gradient clipping at max_norm 1e\\+06 never acted"):
    res = loop.train_and_evaluate(never, str(tmp_path / "never"), progress=False,
                                  data=fmnist_lt)
  assert res["gradient_clipping"]["steps_clipped"] is False
  always = small_config(**{"perturb.gradient": "clip", "perturb.clip.max_norm": 1e-6})
  res = loop.train_and_evaluate(always, str(tmp_path / "always"), progress=False,
                                data=fmnist_lt)
  assert res["gradient_clipping"]["steps_clipped_fraction"] == 1.0
  rows = [json.loads(x) for x in open(tmp_path / "always" / "metrics.jsonl")]
  assert [r["clipped"] for r in rows] == [1.0, 1.0]
  plain = loop.train_and_evaluate(small_config(), str(tmp_path / "plain"), progress=False,
                                  data=fmnist_lt)
  assert "gradient_clipping" not in plain
