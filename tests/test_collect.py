"""experiments.collect: finished and stopped runs' records reach the repository; unfinished
runs, checkpoints, logs and locks do not."""
import json
import os

import pytest

from experiments import collect


def _write(path, text="x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def test_collect_copies_finished_and_stopped_records_only(tmp_path):
  src, dest = tmp_path / "sweep", tmp_path / "repo"
  _write(src / "suite.json", json.dumps({"suite": "s"}))
  done = src / "runs" / "lpa" / "seed0"
  for name in collect.RECORDS[:-1]:
    _write(done / name)
  _write(done / "checkpoints" / "5" / "state")
  _write(done / ".lock")
  _write(src / "runs" / "lpa" / "seed1" / "metrics.jsonl")            # still training
  _write(src / "runs" / "ce" / "seed0" / "stopped.json", '{"reason": "guard"}')
  _write(dest / "runs" / "lpa" / "seed0" / "old_file")                 # an earlier version
  out, runs = collect.collect(str(src), str(dest))
  assert out == str(dest)
  assert runs == [os.path.join("runs", "ce", "seed0"), os.path.join("runs", "lpa", "seed0")]
  assert sorted(os.listdir(dest / "runs" / "lpa" / "seed0")) == sorted(collect.RECORDS[:-1])
  assert os.listdir(dest / "runs" / "ce" / "seed0") == ["stopped.json"]
  assert not (dest / "runs" / "lpa" / "seed1").exists()
  assert json.loads((dest / "suite.json").read_text()) == {"suite": "s", "seeds": [0]}


def test_collect_refuses_a_root_with_nothing_finished(tmp_path):
  _write(tmp_path / "suite.json", json.dumps({"suite": "s"}))
  _write(tmp_path / "runs" / "ce" / "seed0" / "metrics.jsonl")
  with pytest.raises(FileNotFoundError, match="No finished runs"):
    collect.collect(str(tmp_path), str(tmp_path / "out"))
