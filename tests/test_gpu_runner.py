"""The GPU machine's paper-scale long-tail runner, dry-run on CPU; its portable data file."""
import json
import lzma
import os
import time

import numpy as np
import pytest

from experiments.gpu import longtail_paper as runner
from experiments.data import TaskData, longtail_counts
from experiments.data.portable import (decode_images, encode_images, load_portable, read_header,
                                   save_portable)

# A dry run: the paper task's config, shrunk to an MLP, batch 8, 2 epochs.
DRY = ["model.name=mlp", "model.kwargs={'widths': (16,)}", "optim.batch_size=8",
       "optim.num_epochs=2", "optim.warmup_epochs=0.0", "train.eval_every=1",
       # The paper's learning rate is for batch 128 and a ResNet: at batch 8 this 16-unit MLP's
       # features die in epoch 1 (the guard then stops LPA, rightly); the dry run tests
       # chunking, so it trains at a rate this network stands.
       "optim.lr=0.01"]


def _tiny_task(rng) -> TaskData:
  """CIFAR-shaped long-tail data (random pixels with some structure: a gradient per class)."""
  counts = longtail_counts(8, 10, 8)  # [8, 6, 5, ...]: a few batches of 8
  y_train = np.repeat(np.arange(10), counts).astype(np.int32)
  y_test = np.repeat(np.arange(10), 2).astype(np.int32)

  def images(y):
    ramp = np.linspace(0, 200, 32)[None, :, None, None] * (y[:, None, None, None] + 1) / 10
    noise = rng.integers(0, 56, (len(y), 32, 32, 3))
    return (ramp + noise).astype(np.uint8)
  return TaskData(name="CIFAR-10-LT (tiny)", x_train=images(y_train), y_train=y_train,
                  x_test=images(y_test), y_test=y_test, num_classes=10,
                  class_names=[str(c) for c in range(10)],
                  extras={"class_counts": np.bincount(y_train, minlength=10), "source": "jpeg75"})


def _paper_meta():
  from experiments.configs.longtail import get_config
  data = get_config("paper_cifar10").data
  return {"data": {k: data.get(k) for k in runner.DATA_FIELDS}}


def test_images_round_trip_exactly():
  rng = np.random.default_rng(0)
  ramp = np.add.outer(np.arange(32), 3 * np.arange(32))[None, :, :, None] + np.arange(3)
  smooth = (ramp + rng.integers(0, 2, (4, 32, 32, 3))).astype(np.uint8)  # max 127
  for x in (rng.integers(0, 256, (3, 5, 6, 1)), smooth, np.full((2, 4, 4, 3), 255)):
    x = x.astype(np.uint8)
    np.testing.assert_array_equal(decode_images(encode_images(x), x.shape), x)
  # Smooth images are what the predictor is for: their residuals pack to ~1-2 bits a pixel.
  assert len(encode_images(smooth)) < 0.3 * smooth.size


def test_portable_file_keeps_the_task_and_detects_damage(tmp_path):
  data = _tiny_task(np.random.default_rng(1))
  path = str(tmp_path / "task.npz")
  save_portable(data, path, meta={"data": {"name": "cifar10"}})
  back = load_portable(path)
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(back, field), getattr(data, field))
  assert (back.name, back.class_names, back.extras["source"]) == (
      data.name, data.class_names, "jpeg75")
  np.testing.assert_array_equal(back.class_counts(), data.class_counts())
  assert read_header(path)["meta"] == {"data": {"name": "cifar10"}}
  with np.load(path) as z:  # one label changed, everything else as saved
    arrays = dict(z)
  arrays["y_test"] = arrays["y_test"].copy()
  arrays["y_test"][0] += 1
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="corrupt"):
    load_portable(path)


def test_a_file_for_another_data_config_is_refused(tmp_path):
  from experiments.configs.longtail import get_config
  header = {"meta": {"data": {**_paper_meta()["data"], "imbalance_ratio": 50.0}}}
  with pytest.raises(ValueError, match="data.imbalance_ratio: 50.0 in the file, 100.0"):
    runner.check_data(header, get_config("paper_cifar10"))


def test_deadline_stops_the_loop_like_ctrl_c():
  from experiments.train import loop
  with loop.StopFlag() as stop, runner.Deadline(0.2):
    t0 = time.time()
    while not stop.set and time.time() - t0 < 10:
      time.sleep(0.01)
  assert stop.set and time.time() - t0 < 5


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_dry_run_trains_in_chunks_that_resume_elsewhere(tmp_path):
  data_file = str(tmp_path / "data.npz")
  task = _tiny_task(np.random.default_rng(2))
  save_portable(task, data_file, meta=_paper_meta())
  total = 2 * (task.num_train // 8)  # 2 epochs of full batches of 8
  state = str(tmp_path / "out" / "state.tar.gz")
  common = ["train", "--data", data_file, "--methods", "ce,lpa", "--seeds", "0,1",
            "--save_state", state, *sum((["--set", s] for s in DRY), [])]
  # Chunk 1 stops the first method's seeds (one program) after 3 of their steps.
  assert runner.main(common + ["--root", str(tmp_path / "a"), "--max_steps", "3"]) == 0
  assert os.path.getsize(state) > 0
  assert not list((tmp_path / "a").glob("runs/*/seed*/results.json"))
  # Chunk 2 runs on "another machine": a fresh root, only the packed state carried over.
  root = tmp_path / "b"
  assert runner.main(common + ["--root", str(root), "--state", state]) == 0
  results = sorted(root.glob("runs/*/seed*/results.json"))
  assert [p.relative_to(root).parts[1:3] for p in results] == [
      ("ce", "seed0"), ("ce", "seed1"), ("lpa", "seed0"), ("lpa", "seed1")]
  for p in results:
    res = json.loads(p.read_text())
    assert res["steps"] == total and res["num_train"] == task.num_train
    assert not (p.parent / "checkpoints").exists()  # finished: only results and metrics
    rows = [json.loads(x) for x in open(p.parent / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]  # the cut epoch is one row, not two
  assert json.loads((root / "suite.json").read_text())["suite"] == "paper_longtail_cifar10"
  # A third call finds everything finished and trains nothing.
  assert runner.main(common + ["--root", str(tmp_path / "c"), "--state", state]) == 0


def test_packed_state_keeps_each_runs_newest_checkpoint(tmp_path):
  import tarfile
  for run, steps in (("ce/seed0", (96, 192)), ("lpa/seed0", (5,))):
    for step in steps:
      d = tmp_path / "root" / "runs" / run / "checkpoints" / str(step)
      d.mkdir(parents=True)
      (d / "state").write_text(str(step))
  (tmp_path / "root" / "suite.json").write_text("{}")
  runner.pack_state(str(tmp_path / "root"), str(tmp_path / "s.tar.gz"))
  with tarfile.open(tmp_path / "s.tar.gz") as tar:
    files = sorted(m.name for m in tar.getmembers() if m.isfile())
  assert files == ["runs/ce/seed0/checkpoints/192/state", "runs/lpa/seed0/checkpoints/5/state",
                   "suite.json"]
  runner.unpack_state(str(tmp_path / "s.tar.gz"), str(tmp_path / "again"))
  assert (tmp_path / "again" / "runs/ce/seed0/checkpoints/192/state").read_text() == "192"


# ----------------------------------------------------------- the jpeg encoding of the data file
def _cifar_jpegs(n_per_class: int = 3):
  """The first JPEG files of each class and split of the CIFAR-10 (JPEG-75) offline copy."""
  import tarfile

  from experiments.data.sources import CIFAR10_JPEG_TARBALL, resolve_data_dir
  root, _ = resolve_data_dir()
  if root is None or not (root / CIFAR10_JPEG_TARBALL).exists():
    pytest.skip("no CIFAR-10 (JPEG-75) offline copy")
  out = {"train": [], "test": []}
  seen = {}
  with tarfile.open(root / CIFAR10_JPEG_TARBALL) as tar:
    for m in tar:
      split, _, rest = m.name.partition("/")
      cls = rest.split("/")[0]
      if m.isfile() and split in out and seen.get((split, cls), 0) < n_per_class:
        seen[(split, cls)] = seen.get((split, cls), 0) + 1
        out[split].append((cls, tar.extractfile(m).read()))
      if len(seen) == 20 and all(v == n_per_class for v in seen.values()):
        break
  return out


def test_pillow_decodes_the_jpegs_as_tensorflow_does():
  """The CIFAR-10 (JPEG-75) pixels lpa_jax trains on come from tf.io.decode_image (fast IDCT,
  fancy chroma upsampling); Pillow's own decode differs, decode_jpegs does not."""
  import io

  import tensorflow as tf
  from PIL import Image

  from experiments.data.jpeg import decode_jpegs
  blobs = [b for split in _cifar_jpegs().values() for _, b in split]
  want = np.stack([tf.io.decode_image(b, channels=3).numpy() for b in blobs])
  np.testing.assert_array_equal(decode_jpegs(blobs), want)
  plain = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
  assert (plain != want).mean() > 0.1  # what it guards against
  with pytest.raises(ValueError, match="4:2:0 colour JPEGs only"):
    buf = io.BytesIO()
    Image.fromarray(want[0]).save(buf, "PNG")
    decode_jpegs([buf.getvalue()])


def test_jpeg_encoded_file_is_exact_smaller_and_corrects_any_difference(tmp_path):
  import tensorflow as tf
  files = _cifar_jpegs()
  x = {s: np.stack([tf.io.decode_image(b, channels=3).numpy() for _, b in files[s]])
       for s in files}
  y = {s: np.arange(len(files[s]), dtype=np.int32) % 10 for s in files}
  x["train"][0, 0, 0] ^= 1  # an image whose JPEG no longer decodes to it: the residual fixes it
  data = TaskData(name="CIFAR-10 (JPEG-75) sample", x_train=x["train"], y_train=y["train"],
                  x_test=x["test"], y_test=y["test"], num_classes=10,
                  class_names=[str(c) for c in range(10)],
                  extras={"class_counts": np.bincount(y["train"], minlength=10),
                          "source": "jpeg75"})
  jpegs = {"x_train": [b for _, b in files["train"]], "x_test": [b for _, b in files["test"]]}
  path, loco = str(tmp_path / "jpeg.npz"), str(tmp_path / "loco.npz")
  size = save_portable(data, path, jpegs=jpegs)
  assert size < 0.75 * save_portable(data, loco)
  header = read_header(path)
  assert header["encoding"] == {"x_train": "jpeg", "x_test": "jpeg"}
  assert header["jpeg_corrected"] == {"x_train": 3, "x_test": 0}  # the flipped pixel's RGB
  back = load_portable(path)
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(back, field), getattr(data, field))
  with np.load(path) as z:  # a decoder that gives other pixels is caught by the checksum
    arrays = dict(z)
  arrays["x_test"] = np.frombuffer(lzma.compress(np.ones(x["test"].size, np.uint8).tobytes()),
                                   np.uint8)
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="corrupt.*JPEG files.*--encoding=loco"):
    load_portable(path)
  with pytest.raises(ValueError, match="2 JPEG files for 30 images"):
    save_portable(data, path, jpegs={"x_train": jpegs["x_train"][:2]})


def test_portable_file_from_int64_labels_loads_and_verifies(tmp_path):
  import dataclasses
  data = _tiny_task(np.random.default_rng(2))
  wide = dataclasses.replace(data, y_train=data.y_train.astype(np.int64),
                             y_test=data.y_test.astype(np.int64))
  path = str(tmp_path / "task.npz")
  save_portable(wide, path)
  back = load_portable(path)                     # the checksum covers the stored int32 labels
  np.testing.assert_array_equal(back.y_train, data.y_train)
  assert back.y_train.dtype == np.int32
  for bad in (data.y_train.astype(np.float32), data.y_train - 1):   # float; a label of -1
    with pytest.raises(ValueError, match="y_train must hold integer class ids"):
      save_portable(dataclasses.replace(data, y_train=bad), path)
