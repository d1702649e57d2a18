"""K runs as one program (experiments.train.parallel): K seeds trained by one vmapped step equal K
separate runs, also across a stop and resume, and the sweep's --parallel writes the same files.

Tolerance: final parameters within rtol 1e-5 / atol 1e-6 (on this CPU they are bit-identical);
per-epoch metric rows within rtol 1e-5 / atol 1e-6 (the vmapped step's batched reductions may
round ``grad_norm`` differently, ~1e-7); test accuracy and per-class accuracy exactly equal.
"""
import json
import os

import jax
import numpy as np
import pytest

from conftest import small_config
from experiments.train import checkpoint, loop, parallel
from lpa_jax.train.step import make_mesh

SEEDS = (0, 1, 2)


def _configs(activation, **overrides):
  return [small_config(**{"perturb.activation": activation, "seed": s, **overrides})
          for s in SEEDS]


def _rows(workdir):
  return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _final_params(workdir, template):
  state, _ = checkpoint.restore_latest(checkpoint.manager(workdir), template)
  return jax.device_get(state.params)


def _assert_same_runs(cfgs, data, sep_dirs, par_dirs, sep_res, par_res):
  templates = parallel.build_parallel(cfgs, data, make_mesh()).init_states
  for k in range(len(cfgs)):
    assert par_res[k]["steps"] == sep_res[k]["steps"]
    assert par_res[k]["test_accuracy"] == sep_res[k]["test_accuracy"], k
    assert par_res[k]["per_class_accuracy"] == sep_res[k]["per_class_accuracy"], k
    sep_rows, par_rows = _rows(sep_dirs[k]), _rows(par_dirs[k])
    assert [r["epoch"] for r in par_rows] == [1, 2]  # one row per epoch, also after a resume
    for a, b in zip(sep_rows, par_rows):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_allclose(np.asarray(b[key], float), np.asarray(a[key], float),
                                   rtol=1e-5, atol=1e-6, err_msg=f"run {k} {key}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6),
                 _final_params(sep_dirs[k], templates[k]),
                 _final_params(par_dirs[k], templates[k]))
  # The seeds are distinct runs, not one run copied K times.
  assert len({_rows(d)[0]["loss"] for d in par_dirs}) == len(par_dirs)


def test_check_group_refuses_configs_that_differ_beyond_the_seed():
  cfgs = _configs("none")
  parallel.check_group(cfgs)
  cfgs[2].optim.lr = 0.01
  with pytest.raises(ValueError, match=r"run 2 differs from run 0 in:\n  optim.lr"):
    parallel.check_group(cfgs)


@pytest.mark.slow
def test_one_compile_for_k_runs_across_an_epoch_boundary(fmnist_lt):
  cfgs = _configs("lpa")[:2]
  prun = parallel.build_parallel(cfgs, fmnist_lt, make_mesh())
  state_K = parallel.stack_states(prun.init_states, make_mesh())
  spe = prun.run.steps_per_epoch
  for step in range(spe + 1):
    epoch, i = divmod(step, spe)
    state_K, metrics_K = prun.train_step(state_K,
                                         prun.batch_fn(state_K, epoch, i, prun.epoch_perm(epoch)))
  assert prun.train_step._cache_size() == 1
  assert metrics_K["loss"].shape == (2,) and metrics_K["delta_norm_C"].shape[0] == 2
  assert int(state_K.step) == spe + 1
  run1 = parallel.unstack_state(state_K, 1)
  assert jax.tree.structure(run1) == jax.tree.structure(prun.init_states[1])


def _separate(cfgs, dirs, data):
  return [loop.train_and_evaluate(c, d, progress=False, data=data) for c, d in zip(cfgs, dirs)]


@pytest.mark.slow  # 37 s; the other parallel-equals-separate tests run by default
def test_lpa_parallel_equals_separate_after_a_stop_and_resume(tmp_path, fmnist_lt):
  """Three LPA seeds as one program, stopped mid-epoch and resumed: each run equals its
  unbroken separate run (class statistics, δ and batch order are per run)."""
  cfgs = _configs("lpa", **{"perturb.lpa.eps": 1.0})
  sep_dirs = [str(tmp_path / f"sep{s}") for s in SEEDS]
  par_dirs = [str(tmp_path / f"par{s}") for s in SEEDS]
  sep_res = _separate(cfgs, sep_dirs, fmnist_lt)
  assert parallel.train_and_evaluate_parallel(cfgs, par_dirs, progress=False, max_steps=2,
                                              data=fmnist_lt) is None
  assert [checkpoint.manager(d).latest_step() for d in par_dirs] == [2, 2, 2]
  par_res = parallel.train_and_evaluate_parallel(cfgs, par_dirs, progress=False, data=fmnist_lt)
  assert [r["parallel"]["runs"] for r in par_res] == [3, 3, 3]
  _assert_same_runs(cfgs, fmnist_lt, sep_dirs, par_dirs, sep_res, par_res)


@pytest.mark.slow
def test_plain_ce_parallel_equals_separate_when_resumed_from_different_steps(tmp_path,
                                                                             fmnist_lt):
  """Plain CE; after a stop, run 0 is advanced alone, so the group resumes from different
  steps: the runs behind catch up as separate runs, then the group finishes as one."""
  cfgs = _configs("none")
  sep_dirs = [str(tmp_path / f"sep{s}") for s in SEEDS]
  par_dirs = [str(tmp_path / f"par{s}") for s in SEEDS]
  sep_res = _separate(cfgs, sep_dirs, fmnist_lt)
  assert parallel.train_and_evaluate_parallel(cfgs, par_dirs, progress=False, max_steps=2,
                                              data=fmnist_lt) is None
  assert loop.train_and_evaluate(cfgs[0], par_dirs[0], progress=False, max_steps=2,
                                 data=fmnist_lt) is None
  par_res = parallel.train_and_evaluate_parallel(cfgs, par_dirs, progress=False, data=fmnist_lt)
  _assert_same_runs(cfgs, fmnist_lt, sep_dirs, par_dirs, sep_res, par_res)


def test_sweep_groups_consecutive_seeds_of_one_method():
  from experiments import sweep
  todo = [({"slug": m, "seed": s}, f"{m}/{s}", "todo") for m in ("ce", "lpa") for s in (0, 1, 2)]
  seeds = lambda gs: [[r["seed"] for r, *_ in g] for g in gs]  # noqa: E731
  assert seeds(sweep.groups(todo, 2)) == [[0, 1], [2], [0, 1], [2]]
  assert seeds(sweep.groups(todo, 8)) == [[0, 1, 2], [0, 1, 2]]
  assert seeds(sweep.groups(todo, 1)) == [[s] for s in (0, 1, 2, 0, 1, 2)]
  assert [g[0][0]["slug"] for g in sweep.groups(todo, 8)] == ["ce", "lpa"]


# Fields of results.json that say how and where a run was made, not what it trained.
_HOW = ("wall_time_s", "workdir", "parallel")


@pytest.mark.slow
def test_sweep_parallel_writes_the_serial_sweeps_files(tmp_path):
  from experiments import sweep
  from experiments.configs import suites
  suite = suites.get_config("smoke")
  roots = {k: str(tmp_path / f"k{k}") for k in (1, 2)}
  for k, root in roots.items():
    assert sweep.run_suite(suite, root, seeds=[0, 1], progress=False, report=False,
                           parallel=k) == {"ran": 4, "skipped": 0, "stopped": 0}
  for slug in ("ce", "lpa"):
    for seed in (0, 1):
      a, b = (os.path.join(roots[k], "runs", slug, f"seed{seed}") for k in (1, 2))
      assert sorted(os.listdir(a)) == sorted(os.listdir(b))  # checkpoints cleaned in both
      ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (a, b))
      assert rb["parallel"]["runs"] == 2 and "parallel" not in ra
      assert {k: v for k, v in ra.items() if k not in _HOW} == \
          {k: v for k, v in rb.items() if k not in _HOW}, (slug, seed)
      for x, y in zip(_rows(a), _rows(b)):
        assert x.keys() == y.keys()
        for key in x:
          np.testing.assert_allclose(np.asarray(y[key], float), np.asarray(x[key], float),
                                     rtol=1e-5, atol=1e-6, err_msg=f"{slug} {seed} {key}")
      assert json.load(open(os.path.join(a, "config.json"))) == \
          json.load(open(os.path.join(b, "config.json")))
  # Rerunning with --parallel skips what either sweep finished.
  assert sweep.run_suite(suite, roots[2], seeds=[0, 1], progress=False, report=False,
                         parallel=2) == {"ran": 0, "skipped": 4, "stopped": 0}
