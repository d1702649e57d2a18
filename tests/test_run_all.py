"""The prepared GPU command (experiments/gpu/run_all.py), dry-run end to end on CPU: every file
it brings back, its refusal before anything runs, and a failing or hanging phase recorded."""
import importlib.util
import json
import os
import sys
import tarfile
import time

import numpy as np

from experiments.gpu import longtail_paper, phases, run_all
from experiments.data import TaskData, longtail_counts
from experiments.data.portable import save_portable

TORCH = importlib.util.find_spec("torch") is not None


def _tiny_data_file(path: str) -> str:
  """CIFAR-shaped long-tail data (33 training, 20 test images) for the paper task's config."""
  from experiments.configs.longtail import get_config
  rng = np.random.default_rng(0)
  y_train = np.repeat(np.arange(10), longtail_counts(8, 10, 8)).astype(np.int32)
  y_test = np.repeat(np.arange(10), 2).astype(np.int32)
  images = lambda y: rng.integers(0, 256, (len(y), 32, 32, 3)).astype(np.uint8)
  task = TaskData(name="CIFAR-10-LT (tiny)", x_train=images(y_train), y_train=y_train,
                  x_test=images(y_test), y_test=y_test, num_classes=10,
                  class_names=[str(c) for c in range(10)],
                  extras={"class_counts": np.bincount(y_train, minlength=10),
                          "source": "jpeg75"})
  data = get_config("paper_cifar10").data
  save_portable(task, path, meta={"data": {k: data.get(k) for k in longtail_paper.DATA_FIELDS}})
  return path


def _read(out, name):
  with open(os.path.join(out, name)) as f:
    return json.load(f)


def _check_throughput(out):
  result = _read(out, "throughput.json")
  got = [(r["dtype"], r["K"]) for r in result["rows"]]
  assert got == [(d, k) for d in phases.DRY.dtypes for k in phases.DRY.ks]
  for r in result["rows"]:
    assert r["step_ms"] > 0 and r["runs_per_hour"] > 0 and r["mode"] == "whole epoch"
  assert result["skipped"] == [] and "| float32 | 2 |" in result["markdown"]


def _check_peer(out):
  result = _read(out, "peer.json")
  timed = ["jax_plain", "jax_lpa"] + (["torch_plain", "torch_lpa"] if TORCH else [])
  assert sorted(k for k, v in result["median_ms"].items() if v) == sorted(timed)
  assert all(len(result["times_ms"][k]) == result["rounds"] >= 3 for k in timed)
  assert result["settings"]["point"] == "stage2"  # the registry's default for ResNet-8
  ratios = result["ratios"]
  assert set(ratios) == {"plain torch/jax", "lpa torch/jax", "jax lpa/plain", "torch lpa/plain"}
  for name in ratios if TORCH else ["jax lpa/plain"]:
    assert ratios[name] > 0
  ms = result["median_ms"]
  if TORCH:  # a median of per-round ratios lies within the per-round ratios
    per_round = [t / j for t, j in zip(result["times_ms"]["torch_plain"],
                                       result["times_ms"]["jax_plain"])]
    assert min(per_round) <= ratios["plain torch/jax"] <= max(per_round)
    assert result["torch"]["device"] == "cpu" and ms["torch_lpa"] > 0


def _check_longtail(out, tmp_path):
  result = _read(out, "longtail.json")
  assert result["methods"] == ["ce", "lpa"] == list(phases.METHOD_ORDER[:2])
  assert [(r["method"], r["seed"], r["status"]) for r in result["runs"]] == [
      ("ce", 0, "finished"), ("ce", 1, "finished"), ("lpa", 0, "finished"),
      ("lpa", 1, "finished")]
  unpacked = str(tmp_path / "unpacked")
  with tarfile.open(os.path.join(out, "paper_lt_state.tar.gz")) as tar:
    tar.extractall(unpacked, filter="data")
  for method in ("ce", "lpa"):
    for seed in (0, 1):
      d = os.path.join(unpacked, "runs", method, f"seed{seed}")
      res = json.load(open(os.path.join(d, "results.json")))
      assert 0 <= res["test_accuracy"] <= 1 and res["num_train"] == 33
      assert [json.loads(x)["epoch"] for x in open(os.path.join(d, "metrics.jsonl"))] == [1, 2]
  assert json.load(open(os.path.join(unpacked, "suite.json")))["methods"][0]["name"] == "CE"


def test_dry_run_brings_back_every_measurement(tmp_path):
  out = str(tmp_path / "out")
  data = _tiny_data_file(str(tmp_path / "tiny.npz"))
  assert run_all.main(["--dry_run", "--budget_s=600", f"--data={data}", f"--out={out}",
                       f"--root={tmp_path / 'root'}",
                       f"--state={tmp_path / 'no_state.tar.gz'}"]) == 0
  files = sorted(os.listdir(out))
  assert files == sorted(run_all.OUT_FILES) and len(files) <= run_all.MAX_FILES
  assert all(os.path.getsize(os.path.join(out, f)) <= run_all.MAX_BYTES for f in files)
  summary = _read(out, "summary.json")
  assert summary["status"] == "done" and summary["outputs"]["ok"]
  statuses = {n: p["status"] for n, p in summary["phases"].items()}
  assert statuses == {"throughput": "ok", "peer": "ok" if TORCH else "skipped", "longtail": "ok"}
  assert summary["device"]["backend"] == "cpu" and summary["versions"]["jax"]
  assert all(p["wall_s"] > 0 for p in summary["phases"].values())
  _check_throughput(out)
  _check_peer(out)
  _check_longtail(out, tmp_path)
  report = open(os.path.join(out, "report.md")).read()
  assert "## peer" in report and "| lpa |" in report and "4 of 4 runs finished" in report


def test_a_missing_data_file_is_refused_before_anything_runs(tmp_path, capsys):
  out = str(tmp_path / "out")
  missing = str(tmp_path / "nowhere.npz")
  assert run_all.main([f"--data={missing}", f"--out={out}"]) == 2
  said = capsys.readouterr().out
  assert missing in said and "python -m experiments.gpu.longtail_paper export" in said
  assert os.listdir(out) == ["summary.json"]  # no phase started
  summary = _read(out, "summary.json")
  assert summary["status"] == "refused" and summary["phases"] == {}
  assert "python -m experiments.gpu.longtail_paper export" in summary["problems"][0]


def test_a_jpeg_data_file_needs_pillow_there(tmp_path, monkeypatch, capsys):
  data = _tiny_data_file(str(tmp_path / "tiny.npz"))
  with np.load(data) as z:  # mark it jpeg-encoded: only the header is read before refusing
    arrays = dict(z)
  header = json.loads(arrays["header"].tobytes().decode())
  header["encoding"] = {"x_train": "jpeg", "x_test": "loco"}
  arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  np.savez(data, **arrays)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "PIL" else real(name, *a))
  out = str(tmp_path / "out")
  assert run_all.main([f"--data={data}", f"--out={out}", "--state="]) == 2
  said = capsys.readouterr().out
  assert "PIL is not importable" in said and "--encoding=loco" in said


def test_the_committed_tree_leaves_room_for_what_a_device_call_carries():
  """A device call carries the working tree, the data file, .device_deps and the state in
  64 MiB: committed records that crowd them out fail here, not in a GPU window."""
  size = run_all.carry_size()
  parts = size["parts"]
  assert parts["working tree"] > 1e6 and size["total"] == sum(parts.values())
  have = lambda path: os.path.exists(os.path.join(run_all.REPO, path))  # noqa: E731
  assert ("data to come" in parts) != have(run_all.DATA_FILE)
  assert ("state to come" in parts) != have(run_all.STATE_FILE)
  assert size["ok"], (f"a device call would carry {size['total'] / 2**20:.1f} MiB "
                      f"({parts}), over 64 MiB")
  assert run_all.main(["--check_carry"]) in (0, 2)  # 2 only for a missing .device_deps here


def test_a_phase_stopped_after_writing_its_final_file_counts_as_done(tmp_path):
  """The long tail packs its state and writes its file, then its exit (interpreter teardown)
  ran past the limit: it is done, not timed out.  A file still being rewritten is not."""
  path = str(tmp_path / "longtail.json")
  started = os.path.getmtime(str(tmp_path)) - 1
  stopped = lambda: dict(status="timeout", error="stopped after 117 s")  # noqa: E731
  with open(path, "w") as f:
    json.dump({"phase": {"status": "ok", "reason": None}}, f)
  record = run_all.outcome(stopped(), path, started)
  assert record["status"] == "ok" and record["stopped_after_writing"]
  assert run_all.outcome(stopped(), path, time.time() + 60)["status"] == "timeout"  # stale
  for unfinished in ({"phase": {"status": "ok"}, "finished": False},
                     {"phase": {"status": "partial"}}):
    with open(path, "w") as f:
      json.dump(unfinished, f)
    assert run_all.outcome(stopped(), path, started)["status"] == "timeout"


def test_a_failing_or_hanging_phase_is_recorded(tmp_path):
  boom = run_all.run_phase("x", [sys.executable, "-c", "raise ValueError('bad header')"], 60)
  assert boom["status"] == "error" and boom["error"] == "ValueError: bad header"
  hang = run_all.run_phase("y", [sys.executable, "-c", "import time; print('hi', flush=True); "
                                 "time.sleep(60)"], 1.0)
  assert hang["status"] == "timeout" and hang["wall_s"] < 20 and "hi" in hang["output_tail"]
  # A clean exit that wrote no file is an error; a written file gives its own status.
  path = str(tmp_path / "peer.json")
  assert run_all.outcome(dict(status="ok", error=None), path)["status"] == "error"
  with open(path, "w") as f:
    json.dump({"phase": {"status": "skipped", "reason": "torch is not importable"}}, f)
  got = run_all.outcome(dict(status="ok", error=None), path)
  assert (got["status"], got["reason"], got["file"]) == ("skipped", "torch is not importable",
                                                        "peer.json")
