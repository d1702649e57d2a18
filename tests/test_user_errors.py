"""Errors the user can fix print one line naming the field or the path, not a traceback
(issue 35): bad values the library refuses, a misspelt field, missing, partial or damaged data,
a work dir or cache the run cannot write."""
import os
import pathlib
import subprocess
import sys

import pytest

from test_survival import REPO, _env, _lines

TINY = ["--config.optim.num_epochs=1", "--config.data.n_max=300", "--config.data.test_subset=200",
        "--config.model.kwargs.widths=(4,8,8)", "--noprogress"]
LPA = "--config.perturb.activation=lpa"
FMNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def _unwritable(tmp_path) -> pathlib.Path:
  """A directory this process cannot create anything in: a read-only one, or as root (whom
  permissions do not stop) sysfs, where even root may not create files."""
  read_only = tmp_path / "read_only"
  read_only.mkdir(exist_ok=True)
  read_only.chmod(0o555)
  for candidate in (read_only, pathlib.Path("/sys")):
    try:
      (candidate / "lpa_probe").mkdir()
    except OSError:
      return candidate
    (candidate / "lpa_probe").rmdir()
  pytest.skip("no directory this process cannot write in")


def _data(tmp_path, files) -> list[str]:
  """Flags for a data dir holding ``files`` of Fashion-MNIST's four, each a few bytes (cut
  short), and a cache of its own (nothing is read from, or written to, the usual one)."""
  root = tmp_path / "data"
  (root / "fashion_mnist").mkdir(parents=True)
  for name in files:
    (root / "fashion_mnist" / name).write_bytes(b"\x1f\x8b\x08\x00cut short")
  return [f"--config.data.data_dir={root}", f"--config.data.cache_dir={tmp_path / 'cache'}"]


# id: (the flags, given tmp_path and the work dir; what the one line must name)
CASES = {
    "radius_mode": (lambda t: [LPA, "--config.perturb.lpa.radius_mode=relativ"],
                    "config.perturb.lpa): lpa.radius_mode must be one of"),
    "negative eps": (lambda t: [LPA, "--config.perturb.lpa.eps=-1"],
                     "config.perturb.lpa): lpa needs eps >= 0"),
    "zero steps": (lambda t: [LPA, "--config.perturb.lpa.steps=0"],
                   "config.perturb.lpa): lpa.steps"),
    "batch above the data": (lambda t: ["--config.optim.batch_size=100000"],
                             "config.optim.batch_size=100000: exceeds the"),
    "unknown point": (lambda t: [LPA, "--config.perturb.lpa.point=foo"],
                      "config.perturb.lpa): Unknown intervention point 'foo'"),
    "unknown split": (lambda t: [LPA, "--config.perturb.lpa.split=foo"],
                      "config.perturb.lpa): Unknown split rule 'foo'"),
    "unknown schedule": (lambda t: ["--config.optim.schedule=foo"],
                         "optim.schedule must be one of"),
    "an empty class": (lambda t: ["--config.data.imbalance_ratio=100000"],
                       "data.imbalance_ratio=100000 leaves class(es)"),
    "num_head above C": (lambda t: [LPA, "--config.perturb.lpa.num_head=50"],
                         "config.perturb.lpa): num_head must lie in [0, 10], got 50"),
    "lpl alpha 1e30": (lambda t: ["--config.perturb.logit=lpl", "--config.perturb.lpl.alpha=1e30"],
                       "config.perturb.lpl): lpl.alpha=1e+30 with up to 40 steps"),
    "misspelt field": (lambda t: ["--config.optim.lrr=0.1"],
                       "config.optim has no field 'lrr' (--config.optim.lrr=0.1); did you mean "
                       "config.optim.lr?"),
    "missing data": (lambda t: _data(t, []) + ["--config.data.download=False"],
                     "Could not load dataset 'fashion_mnist'"),
    "partial data": (lambda t: _data(t, FMNIST_FILES[1::2]),
                     "holds only part of this dataset's files: missing "
                     "fashion_mnist/train-images-idx3-ubyte.gz"),
    "truncated data": (lambda t: _data(t, FMNIST_FILES),
                       "Could not prepare fashion_mnist from the data dir"),
    "read-only work dir": (lambda t: [f"--workdir={_unwritable(t) / 'run'}"], "cannot write"),
    "read-only cache": (lambda t: _data(t, FMNIST_FILES)
                        + [f"--config.data.cache_dir={_unwritable(t) / 'cache'}"],
                        "cannot write"),
}


# One of each kind runs by default; each case is a CLI run of several seconds.
DEFAULT_CASES = ("radius_mode", "misspelt field", "partial data", "read-only cache")


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in DEFAULT_CASES else
                                               pytest.mark.slow) for c in CASES])
def test_an_error_the_user_can_fix_prints_one_line(tmp_path, case):
  flags, named = CASES[case]
  wd = tmp_path / "run"
  args = [f"--workdir={wd}"] + TINY + flags(tmp_path)  # a later flag wins: a case's work dir
  res = subprocess.run([sys.executable, "-m", "experiments.main"] + args, cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
  lines = _lines(res.stderr)
  assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert lines and lines[0].startswith("Error: ") and named in lines[0], res.stderr[-3000:]
  if case == "missing data":  # one error, with the places it looked on the lines below
    assert "data dir (config data_dir): " + str(tmp_path / "data") in res.stderr
  else:
    assert len(lines) == 1, res.stderr[-3000:]
  if "read-only" in case:
    assert str(_unwritable(tmp_path)) in lines[0]
  else:
    assert not wd.exists()  # refused before the work dir was claimed


def test_traceback_flag_shows_the_library_error(tmp_path):
  res = subprocess.run([sys.executable, "-m", "experiments.main", f"--workdir={tmp_path / 'run'}",
                        LPA, "--config.perturb.lpa.steps=0", "--traceback"] + TINY, cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=600)
  assert res.returncode != 0 and "Traceback" in res.stderr
  assert "lpa.steps (PGD steps T) must be an integer >= 1" in res.stderr


def test_unknown_field_suggests_the_nearest_or_lists_them():
  from experiments.cli import unknown_field
  spec = os.path.join(REPO, "experiments", "configs", "longtail.py:quick")
  assert unknown_field(["--config.optim.lr=0.1", "--config.seed=2"], spec) is None
  assert unknown_field(["--config.optimm.lr=0.1"], spec) == (
      "Error: config has no field 'optimm' (--config.optimm.lr=0.1); did you mean config.optim?")
  assert unknown_field(["--config.optim.lr.x=1"], spec) == (
      "Error: config.optim.lr is a float, it has no field 'x' (--config.optim.lr.x=1)")
  assert "its fields are: batch_size, decay_epochs" in unknown_field(
      ["--config.optim.zzzzz=1"], spec)
