"""Training under ``jax.distributed``: 2 processes × 4 CPU devices train as 1 process × 8.

The 2 processes are started here as subprocesses on localhost (this file is also their
script).  By default they take 3 jitted steps; the slow tests run the whole loop (evaluation,
orbax checkpoints from both processes, metrics and results from process 0), once cut
mid-epoch and resumed.  The reference is the 8-device run in the pytest process (marked
``multidevice``, these tests run in the child pytest that has 8 fake CPU devices).
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CHILD_REPORT, small_config

HERE = os.path.dirname(os.path.abspath(__file__))
OVERRIDES = {"perturb.activation": "lpa", "perturb.lpa.eps": 0.5,
             "perturb.lpa.split": "longtail", "optim.batch_size": 32,
             "train.augment": "crop_flip"}


def _worker(process_id: int, port: int, workdir: str, cut: int) -> None:
  """One of the 2 processes: joins the other and trains; with ``cut`` > 0 it stops after
  ``cut`` steps and resumes to the end."""
  from experiments.train import distributed, loop
  distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  cfg = small_config(**OVERRIDES)
  if cut:
    assert loop.train_and_evaluate(cfg, workdir, progress=False, max_steps=cut) is None
  results = loop.train_and_evaluate(cfg, workdir, progress=False)
  print("worker", process_id, "test_accuracy", results["test_accuracy"], flush=True)


def _step_worker(process_id: int, port: int, out: str) -> None:
  """One of the 2 processes: 3 train steps of the jitted step alone (no loop, no evaluation);
  process 0 saves the parameters and the last step's δ norms."""
  from experiments.data import load_task_data
  from experiments.train import distributed
  from experiments.train.build import build_train_step
  from lpa_jax.train.step import make_mesh
  distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  cfg = small_config(**OVERRIDES)
  step, state, batch_fn = build_train_step(cfg, load_task_data(cfg.data), make_mesh())
  for i in range(3):
    state, metrics = step(state, batch_fn(state, 0, i))
  leaves = jax.tree.leaves(jax.device_get(state.params))
  if distributed.is_main():
    np.savez(out, *leaves, delta_norm_C=jax.device_get(metrics["delta_norm_C"]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir: str, cut) -> list[subprocess.Popen]:
  # Not the multidevice child's marker: conftest would then give each process 8 devices.
  env = {**{k: v for k, v in os.environ.items() if k != CHILD_REPORT},
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
             [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
  port = _free_port()
  return [subprocess.Popen([sys.executable, __file__, str(i), str(port), workdir, str(cut)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:  # one failing process leaves the other waiting on it
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _final_params(workdir: str, cfg, data):
  from experiments.train import checkpoint
  from experiments.train.build import build_run
  from lpa_jax.train.step import make_mesh
  template = build_run(cfg, data, make_mesh()).init_state
  state, _ = checkpoint.restore_latest(checkpoint.manager(workdir), template)
  return jax.device_get(state)


@pytest.mark.multidevice
@pytest.mark.slow  # ~60 s on 2 shared cores: three JAX processes compile the LPA step
@pytest.mark.parametrize("cut", [0, 4])
def test_two_processes_match_one(tmp_path, fmnist_lt, cut):
  from experiments.train import loop
  assert jax.device_count() == 8
  cfg = small_config(**OVERRIDES)
  procs = _start_two_processes(str(tmp_path / "two"), cut)
  try:  # the reference trains while the two processes start
    ref = loop.train_and_evaluate(cfg, str(tmp_path / "one"), progress=False, data=fmnist_lt)
  finally:
    outs = _wait(procs)
  assert all("test_accuracy" in out for out in outs)
  with open(tmp_path / "two" / "results.json") as f:
    two = json.load(f)
  assert two["steps"] == ref["steps"] and len(two["devices"]) == 8
  assert two["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=2e-3)
  np.testing.assert_allclose(two["per_class_accuracy"], ref["per_class_accuracy"], atol=1e-2)
  # Process 0 alone wrote the metrics: one row per epoch, as in the 1-process run.
  rows_1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
  rows_2 = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["epoch"] for r in rows_2] == [r["epoch"] for r in rows_1] == [1, 2]
  for r1, r2 in zip(rows_1, rows_2):  # δ came from the global batch in both
    np.testing.assert_allclose(r2["loss"], r1["loss"], rtol=1e-4)
    np.testing.assert_allclose(r2["delta_norm_C"], r1["delta_norm_C"], rtol=1e-3, atol=1e-6)
  s1 = _final_params(str(tmp_path / "one"), cfg, fmnist_lt)
  s2 = _final_params(str(tmp_path / "two"), cfg, fmnist_lt)
  assert int(s2.step) == ref["steps"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               s1.params, s2.params)


@pytest.mark.multidevice
def test_two_processes_step_as_one(tmp_path, fmnist_lt):
  """3 steps over 2 processes × 4 devices equal 3 steps over 1 × 8: parameters, and δ from
  the global batch (its class norms)."""
  from experiments.train.build import build_train_step
  from lpa_jax.train.step import make_mesh
  out = str(tmp_path / "two.npz")
  procs = _start_two_processes(out, "steps")
  try:  # the reference steps while the two processes start
    step, state, batch_fn = build_train_step(small_config(**OVERRIDES), fmnist_lt, make_mesh())
    for i in range(3):
      state, metrics = step(state, batch_fn(state, 0, i))
    want = jax.tree.leaves(jax.device_get(state.params))
  finally:
    _wait(procs)
  with np.load(out) as got:
    assert len(got.files) == len(want) + 1
    for k, a in enumerate(want):
      np.testing.assert_allclose(got[f"arr_{k}"], a, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["delta_norm_C"], jax.device_get(metrics["delta_norm_C"]),
                               rtol=1e-3, atol=1e-6)
    assert np.max(got["delta_norm_C"]) > 0


@pytest.mark.multidevice
@pytest.mark.slow  # the 2-process step test above covers this path; here, bit for bit
def test_process_local_batches_equal_the_device_gather(fmnist_lt):
  """The multi-process input path, run in one process: the same global batch, bit for bit."""
  from experiments.train import distributed
  from experiments.train.build import build_train_step, make_epoch_perm, steps_per_epoch
  from lpa_jax.train.step import make_mesh
  cfg = small_config(**OVERRIDES)
  mesh = make_mesh()
  _, state, batch_fn = build_train_step(cfg, fmnist_lt, mesh)
  perm = make_epoch_perm(cfg, fmnist_lt.num_train)
  spe = steps_per_epoch(cfg, fmnist_lt.num_train, mesh)
  local_fn = distributed.make_process_batch_fn(cfg, fmnist_lt, mesh, spe, perm)
  for epoch, i in ((0, 0), (1, 2)):
    want, got = batch_fn(state, epoch, i), local_fn(state, epoch, i)
    assert got["image"].sharding == want["image"].sharding
    np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
    np.testing.assert_array_equal(np.asarray(got["label"]), np.asarray(want["label"]))


if __name__ == "__main__":
  if sys.argv[4] == "steps":
    _step_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
  else:
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
