"""Shared fixtures, and where the multi-device tests run.

Only the data-parallel tests need several devices: they compare a step sharded over 8 fake CPU
devices with the same step on one.  Every other test compiling an 8-way-sharded step on 2
cores would spend most of the suite's time on it, so the suite runs on one device and the
tests marked ``multidevice`` run together in one child pytest that sets
``--xla_force_host_platform_device_count=8`` before JAX starts; each reports the child's
outcome.  Under ``XLA_FLAGS`` that already force a device count they run in process.
"""
import json
import os
import subprocess
import sys
import tempfile

CHILD_REPORT = "LPA_TEST_MULTIDEVICE_REPORT"  # set in the child: where it writes its outcomes
FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if os.environ.get(CHILD_REPORT):  # before anything initialises a JAX backend
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAKE_DEVICES}".strip()
IN_PROCESS = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
# One XLA compilation cache for the whole run, shared with the subprocesses tests start
# (notebook kernels, killed-and-resumed runs): many tests compile the same small train steps,
# and a program compiled once is then read back instead of recompiled.  A cache the caller
# set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lpa_jax_test_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "multidevice: needs 8 devices; runs in a child pytest with "
                                     "8 fake CPU devices (see tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
  # Under pytest-xdist (--dist loadgroup) the multidevice tests share one worker, so their one
  # child pytest runs once, not once per worker.
  for item in items:
    if item.get_closest_marker("multidevice"):
      item.add_marker(pytest.mark.xdist_group("multidevice"))


def pytest_collection_finish(session):
  session.config.multidevice_ids = [i.nodeid for i in session.items
                                    if i.get_closest_marker("multidevice")]


def _child_outcomes(config) -> dict:
  """Runs every selected multidevice test once, in one child pytest; ``{nodeid: outcome}``."""
  if getattr(config, "multidevice_outcomes", None) is None:
    with tempfile.TemporaryDirectory() as d:
      report = os.path.join(d, "outcomes.json")
      cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             *config.multidevice_ids]
      proc = subprocess.run(cmd, cwd=str(config.rootpath), capture_output=True, text=True,
                            env={**os.environ, CHILD_REPORT: report}, timeout=1800)
      outcomes = json.load(open(report)) if os.path.exists(report) else {}
    config.multidevice_outcomes = outcomes
    config.multidevice_log = (proc.stdout + proc.stderr)[-6000:]
  return config.multidevice_outcomes


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  if IN_PROCESS or not pyfuncitem.get_closest_marker("multidevice"):
    return None
  got = _child_outcomes(pyfuncitem.config).get(pyfuncitem.nodeid)
  if got is None:
    pytest.fail("the 8-device child pytest reported nothing for this test:\n"
                + pyfuncitem.config.multidevice_log, pytrace=False)
  if got["outcome"] == "skipped":
    pytest.skip(got["detail"])
  if got["outcome"] == "failed":
    pytest.fail(f"in the 8-device child pytest ({got['when']}):\n{got['detail']}",
                pytrace=False)
  return True


def pytest_runtest_logreport(report):
  """In the child: each test's outcome (a failure in setup, call or teardown wins)."""
  path = os.environ.get(CHILD_REPORT)
  if not path or not (report.failed or report.skipped or report.when == "call"):
    return
  outcomes = json.load(open(path)) if os.path.exists(path) else {}
  if outcomes.get(report.nodeid, {}).get("outcome") == "failed":
    return
  detail = report.longreprtext if (report.failed or report.skipped) else ""
  outcomes[report.nodeid] = {"outcome": report.outcome, "when": report.when, "detail": detail}
  with open(path, "w") as f:
    json.dump(outcomes, f)


def signal_at_batch(monkeypatch, signum: int, n: int = 10) -> list:
  """Makes the run loop's batch function raise ``signum`` when it builds its ``n``-th batch
  (mid-epoch 2 of :func:`small_config` at batch size 32); returns the list of calls."""
  import signal
  from experiments.train import build
  real, calls = build.make_batch_fn, []

  def make_batch_fn(*args):
    batch_fn = real(*args)

    def signal_at_nth(state, epoch, i, perm=None):
      calls.append(1)
      if len(calls) == n:
        signal.raise_signal(signum)
      return batch_fn(state, epoch, i, perm)
    return signal_at_nth
  monkeypatch.setattr(build, "make_batch_fn", make_batch_fn)
  return calls


def small_config(variant: str = "quick", **overrides):
  """A tiny real-data config: Fashion-MNIST-LT, 100 images at the head, MLP, 2 epochs."""
  from experiments.configs import longtail
  c = longtail.get_config(variant)
  c.data.update(dict(n_max=100, test_subset=500))
  c.model.name = "mlp"
  c.model.kwargs = {"widths": (64, 32)}
  c.optim.update(dict(batch_size=64, num_epochs=2, warmup_epochs=0.0))
  c.train.eval_every = 1
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture(scope="session")
def fmnist_lt():
  """Fashion-MNIST-LT (IR 100, 100 images at the head) as a TaskData, loaded once."""
  from experiments.data import load_task_data
  return load_task_data(small_config().data)
