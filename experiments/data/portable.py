"""A task's arrays in one compact file that loads without TensorFlow (numpy, the standard
library and, for the ``jpeg`` encoding, Pillow).

For machines without TensorFlow or the offline copies (e.g. a lent GPU box, whose whole
working tree must fit in 64 MiB): :func:`save_portable` writes a :class:`TaskData` — e.g.
CIFAR-10 (JPEG-75)-LT IR 100 (12,406 training images) and its 10,000 test images, 19.8 MiB
(``jpeg``) or 39.4 MiB (``loco``) instead of 69 MB of pixels — and :func:`load_portable` gives
back the same arrays, bit for bit (a SHA-256 of the pixels and labels is checked on load).

Images are stored losslessly in one of two encodings, per array:

* ``loco``: per channel, each pixel minus the LOCO-I/JPEG-LS median predictor of its left,
  upper and upper-left neighbours (mod 256), then LZMA.  The residuals of natural images are
  small, so LZMA packs them to ~61 % of the raw bytes (deflate: ~93 %).  Any images.
* ``jpeg``: the JPEG files the arrays were decoded from, plus the LZMA-packed difference
  (mod 256) between the arrays and :func:`experiments.data.jpeg.decode_jpegs` of those files —
  all zeros where that decode reproduces the arrays, as it does for CIFAR-10 (JPEG-75).
  About a third of ``loco``'s size; reading it needs Pillow.

  >>> import os, tempfile
  >>> from experiments.data import TaskData
  >>> x = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  >>> y = np.arange(8, dtype=np.int32) % 2
  >>> path = os.path.join(tempfile.mkdtemp(), "tiny.npz")   # e.g. ".device_data/cifar10_lt.npz"
  >>> size = save_portable(TaskData("tiny", x, y, x, y, 2, ["a", "b"]), path)
  >>> data = load_portable(path)
  >>> data.name, data.x_train.shape, bool((data.x_train == x).all())
  ('tiny', (8, 4, 4, 3), True)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os

import numpy as np

from experiments.data.task import TaskData

FORMAT = 2  # 2: per-array encodings (format 1 files, all loco, still load)
ENCODINGS = ("loco", "jpeg")


def _neighbours(p_NxCxHxW: np.ndarray):
  """Left, upper and upper-left neighbours (0 outside the image), as int16."""
  p = p_NxCxHxW.astype(np.int16)
  padded = np.pad(p, ((0, 0), (0, 0), (1, 0), (1, 0)))
  return padded[..., 1:, :-1], padded[..., :-1, 1:], padded[..., :-1, :-1]


def _median_predict(left, up, upleft):
  """LOCO-I median edge detector: min/max of left and up at an edge, else the plane."""
  hi, lo = np.maximum(left, up), np.minimum(left, up)
  return np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))


def encode_images(x_NxHxWxC: np.ndarray) -> bytes:
  """Lossless, compact bytes of a uint8 image batch (see the module docstring).

  >>> x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  >>> bool((decode_images(encode_images(x), x.shape) == x).all())
  True
  """
  p = np.ascontiguousarray(np.asarray(x_NxHxWxC, np.uint8).transpose(0, 3, 1, 2))
  residual = (p.astype(np.int16) - _median_predict(*_neighbours(p))) % 256
  return lzma.compress(residual.astype(np.uint8).tobytes(), preset=6)


def decode_images(blob: bytes, shape) -> np.ndarray:
  """The uint8 ``[N, H, W, C]`` batch :func:`encode_images` packed.

  Pixels are rebuilt row by row, each row left to right, every image and channel at once
  (H·W vectorised numpy steps, about a second for 22k CIFAR images).
  """
  n, h, w, c = shape
  residual_HxWxNxC = np.frombuffer(lzma.decompress(blob), np.uint8).reshape(
      n, c, h, w).transpose(2, 3, 0, 1).astype(np.int16)
  # Pixel-major layout: each step reads and writes contiguous [N, C] planes.
  p = np.zeros((h + 1, w + 1, n, c), np.int16)  # row 0 and column 0: the zero padding
  for i in range(1, h + 1):
    for j in range(1, w + 1):
      pred = _median_predict(p[i, j - 1], p[i - 1, j], p[i - 1, j - 1])
      p[i, j] = (pred + residual_HxWxNxC[i - 1, j - 1]) % 256
  return np.ascontiguousarray(p[1:, 1:].transpose(2, 0, 1, 3).astype(np.uint8))


def _digest(data: TaskData) -> str:
  h = hashlib.sha256()
  for a in (data.x_train, data.y_train, data.x_test, data.y_test):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _pack_jpegs(x: np.ndarray, blobs, name: str) -> tuple[dict, int]:
  """The ``jpeg`` encoding of ``x``: its files, their offsets and the residual (npz arrays),
  and how many sub-pixels the residual corrects."""
  from experiments.data.jpeg import decode_jpegs
  if len(blobs) != len(x):
    raise ValueError(f"{name}: {len(blobs)} JPEG files for {len(x)} images")
  residual = (np.asarray(x, np.int16) - decode_jpegs(blobs)) % 256
  offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  arrays = {f"{name}_jpeg": np.frombuffer(b"".join(blobs), np.uint8),
            f"{name}_offsets": offsets,
            name: np.frombuffer(lzma.compress(residual.astype(np.uint8).tobytes(), preset=6),
                                np.uint8)}
  return arrays, int(np.count_nonzero(residual))


def _unpack_jpegs(z, name: str, shape) -> np.ndarray:
  from experiments.data.jpeg import decode_jpegs
  raw, offsets = z[f"{name}_jpeg"].tobytes(), z[f"{name}_offsets"]
  blobs = [raw[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
  residual = np.frombuffer(lzma.decompress(z[name].tobytes()), np.uint8).reshape(shape)
  return ((decode_jpegs(blobs).astype(np.int16) + residual) % 256).astype(np.uint8)


def save_portable(data: TaskData, path: str, meta: dict | None = None,
                  jpegs: dict | None = None) -> int:
  """Writes ``data`` (training and test split, class names and counts) to ``path`` (.npz);
  ``meta`` (JSON) is kept beside, e.g. the data config it came from.  Returns the file size.

  ``jpegs``: ``{"x_train": [bytes, ...], "x_test": [...]}``, the JPEG file each image was
  decoded from, in order, for the ``jpeg`` encoding of that array (module docstring); arrays
  not named are stored ``loco``.  The header records, per array, how many sub-pixels the
  residual had to correct (``jpeg_corrected``).

  Validation splits and per-example extras (domains, noise masks) are not stored: a task that
  has them is refused rather than silently cut.
  """
  extra = sorted(set(data.extras) - {"class_counts", "source"})
  extra += ["x_val"] if data.x_val is not None else []
  if extra:
    raise ValueError(f"save_portable stores train/test tasks only; {data.name!r} also has "
                     f"{extra}")
  # Labels are stored as int32: the checksum covers what is stored, so a file written from
  # int64 (or other integer) labels loads back and verifies.
  labels = {}
  for name in ("y_train", "y_test"):
    y = np.asarray(getattr(data, name))
    bad_range = y.size and (y.min() < 0 or y.max() >= 2 ** 31)
    if not np.issubdtype(y.dtype, np.integer) or bad_range:
      raise ValueError(f"save_portable: {name} must hold integer class ids in [0, 2^31), got "
                       f"dtype {y.dtype}" + (f", range [{y.min()}, {y.max()}]" if y.size else ""))
    labels[name] = y.astype(np.int32)
  data = dataclasses.replace(data, **labels)
  jpegs = dict(jpegs or {})
  unknown = sorted(set(jpegs) - {"x_train", "x_test"})
  if unknown:
    raise ValueError(f"jpegs may name x_train and x_test, got {unknown}")
  arrays, encoding, corrected = {}, {}, {}
  for name, x in (("x_train", data.x_train), ("x_test", data.x_test)):
    if name in jpegs:
      packed, corrected[name] = _pack_jpegs(x, jpegs[name], name)
      arrays.update(packed)
      encoding[name] = "jpeg"
    else:
      arrays[name] = np.frombuffer(encode_images(x), np.uint8)
      encoding[name] = "loco"
  header = {"format": FORMAT, "name": data.name, "num_classes": int(data.num_classes),
            "class_names": list(data.class_names), "source": data.extras.get("source"),
            "sha256": _digest(data), "x_train_shape": list(data.x_train.shape),
            "x_test_shape": list(data.x_test.shape), "encoding": encoding,
            "jpeg_corrected": corrected, "meta": meta or {}}
  tmp = f"{path}.tmp{os.getpid()}.npz"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(tmp, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
           y_train=data.y_train, y_test=data.y_test, **arrays)
  os.replace(tmp, path)
  return os.path.getsize(path)


def read_header(path: str) -> dict:
  """The file's description: name, shapes, class names, checksum and the saved ``meta``."""
  with np.load(path) as z:
    return json.loads(z["header"].tobytes().decode())


def load_portable(path: str) -> TaskData:
  """The :class:`TaskData` saved by :func:`save_portable`, checked against its SHA-256."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No portable data file at {path}. Make it where the dataset's cache is, e.g. "
        "`python -m experiments.gpu.longtail_paper export`, and copy it here.")
  with np.load(path) as z:
    header = json.loads(z["header"].tobytes().decode())
    if header.get("format") not in (1, FORMAT):
      raise ValueError(f"{path}: portable format {header.get('format')}, this version reads "
                       f"1 and {FORMAT}; export it again")
    y_train, y_test = z["y_train"], z["y_test"]
    encoding = header.get("encoding", {})
    x_train, x_test = (
        _unpack_jpegs(z, name, header[f"{name}_shape"]) if encoding.get(name) == "jpeg"
        else decode_images(z[name].tobytes(), header[f"{name}_shape"])
        for name in ("x_train", "x_test"))
  counts = np.bincount(y_train, minlength=header["num_classes"])
  data = TaskData(name=header["name"], x_train=x_train, y_train=y_train, x_test=x_test,
                  y_test=y_test, num_classes=header["num_classes"],
                  class_names=list(header["class_names"]),
                  extras={"class_counts": counts, "source": header["source"]})
  if _digest(data) != header["sha256"]:
    jpeg = [n for n, e in header.get("encoding", {}).items() if e == "jpeg"]
    raise ValueError(f"{path} is corrupt: its arrays do not match the checksum saved with "
                     "them; copy or export it again" + (
                         f" (its {', '.join(jpeg)} are JPEG files: if the file is intact, "
                         "this Pillow decodes them unlike the one that wrote it; export with "
                         "--encoding=loco)" if jpeg else ""))
  return data
