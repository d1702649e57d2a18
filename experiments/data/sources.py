"""Where raw datasets come from: local offline copies, TFDS, and an on-disk ``.npz`` cache.

Every dataset is reduced once to four uint8/int32 arrays (``x_train, y_train, x_test,
y_test``) and cached as ``<cache_dir>/arrays/<dataset>__<source>__<origin>.npz``, where
``origin`` names where the arrays came from (``dir-<hash of the data dir>`` or ``tfds``), so a
cache built from one data dir is never read for another.  Later loads read only that file, so
they never import TensorFlow — which is how machines without TF (e.g. GPU boxes) get data:
copy a prepared cache dir there and point ``LPA_CACHE_DIR`` at it (with no data dir on that
machine, any cache of the dataset is used).  A corrupt cache file is named and rebuilt.

TensorFlow / TFDS are imported lazily, inside the functions that build a cache.

Example (not run as a doctest: it loads MNIST, the TFDS data):
  >>> raw = load_raw("mnist", data_dir=None, cache_dir=None)   # doctest: +SKIP
  >>> raw.x_train.shape, raw.source                             # doctest: +SKIP
  ((60000, 28, 28, 1), 'official')
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import pathlib
import socket
import tarfile
import warnings
import zipfile
import zlib
from typing import Callable

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CIFAR10_JPEG_TARBALL = "cifar10_jpeg75/cifar10_jpeg75.tar.gz"

# The repo root is the parent of the `lpa_jax` package; the offline copies live beside it.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SHARED_DATA = _REPO_ROOT.parent / "shared" / "data"


@dataclasses.dataclass
class RawData:
  """Full train/test arrays of one dataset, exactly as cached."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: list[str]
  source: str  # "official" or "jpeg75" (lossy: results must say "CIFAR-10 (JPEG-75)")


def resolve_cache_dir(cache_dir: str | None = None) -> pathlib.Path:
  """``cache_dir``, else ``$LPA_CACHE_DIR``, else ``~/.cache/lpa_jax``.

  >>> str(resolve_cache_dir("/tmp/c"))
  '/tmp/c'
  """
  path = cache_dir or os.environ.get("LPA_CACHE_DIR") or "~/.cache/lpa_jax"
  return pathlib.Path(path).expanduser()


def resolve_data_dir(data_dir: str | None = None) -> tuple[pathlib.Path | None, str]:
  """The offline data root and how it was chosen.

  The first one *set* wins (config, then ``$LPA_DATA_DIR``, then ``../shared/data`` beside
  the repo): an explicit choice is never silently overridden by another copy.

  >>> resolve_data_dir("/tmp/d")
  (PosixPath('/tmp/d'), 'config data_dir')
  """
  if data_dir:
    return pathlib.Path(data_dir).expanduser(), "config data_dir"
  if os.environ.get("LPA_DATA_DIR"):
    return pathlib.Path(os.environ["LPA_DATA_DIR"]).expanduser(), "$LPA_DATA_DIR"
  if DEFAULT_SHARED_DATA.is_dir():
    return DEFAULT_SHARED_DATA, "../shared/data beside the repo"
  return None, "none set (no config data_dir, no $LPA_DATA_DIR, no ../shared/data)"


def cache_path(cache_dir: pathlib.Path, name: str, source: str,
               origin: str | None = None) -> pathlib.Path:
  """``<cache_dir>/arrays/<name>__<source>__<origin>.npz`` (``origin=None``: the name older
  versions used, read only when no data dir is set).

  >>> cache_path(pathlib.Path("/c"), "mnist", "official", "tfds").name
  'mnist__official__tfds.npz'
  """
  return cache_dir / "arrays" / (f"{name}__{source}" + (f"__{origin}" if origin else "") + ".npz")


def origin_tag(root: pathlib.Path | None) -> str:
  """``'dir-<10 hex>'`` for a data dir (its resolved path), ``'tfds'`` for a download."""
  if root is None:
    return "tfds"
  return "dir-" + hashlib.sha1(str(root.expanduser().resolve()).encode()).hexdigest()[:10]


def _save_npz(path: pathlib.Path, raw: RawData) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
  # Compressed: MNIST-sized caches stay small enough to ship to a machine without TF.
  np.savez_compressed(tmp, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test,
                      y_test=raw.y_test, class_names=np.array(raw.class_names))
  os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _load_npz(path: pathlib.Path, source: str) -> RawData:
  with np.load(path) as z:
    return RawData(x_train=z["x_train"], y_train=z["y_train"].astype(np.int32),
                   x_test=z["x_test"], y_test=z["y_test"].astype(np.int32),
                   class_names=[str(c) for c in z["class_names"]], source=source)


class CacheUnreadable(OSError):
  """A cache file exists but cannot be read (permissions, an I/O error): it is kept."""


class DataNotFound(FileNotFoundError):
  """The dataset is not where it was looked for, or only part of its files are; the message
  says where it looked and how to get it."""


class DataCorrupt(ValueError):
  """Data that is there but cannot be used: a local copy that cannot be prepared (files cut
  short or damaged), or images holding NaN (:func:`experiments.data.task.check_finite_inputs`);
  the message names the files, or the split and the image."""


# What a damaged .npz raises: a failed CRC or a cut-short archive, a bad member, a missing key.
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError)


def _read_cache(path: pathlib.Path, source: str) -> RawData | None:
  """The cached arrays, or None when absent; a corrupt file (failed checksum or parse) is named,
  removed and rebuilt.  One that cannot be read (permissions, an I/O error) is never deleted:
  on a machine whose only copy is the cache that would destroy the dataset; it raises
  :class:`CacheUnreadable` saying why."""
  if not path.exists():
    return None
  try:
    return _load_npz(path, source)
  except _CORRUPT as e:
    warnings.warn(f"Cache file {path} is corrupt ({type(e).__name__}: {e}); deleting it and "
                  "rebuilding it from the source.", stacklevel=3)
    path.unlink(missing_ok=True)
    return None
  except OSError as e:
    raise CacheUnreadable(
        f"Cannot read the cache file {path} ({type(e).__name__}: {e.strerror or e}); it was "
        "left as it is. Fix its permissions or the disk, or point data.cache_dir / "
        "LPA_CACHE_DIR elsewhere.") from e


# ----------------------------------------------------------------------------- builders
# Each builder returns RawData; all of them import TF lazily.

def _tfds_arrays(builder) -> tuple[np.ndarray, ...]:
  import tensorflow_datasets as tfds
  out = []
  for split in ("train", "test"):
    d = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
    out += [np.asarray(d[0], np.uint8), np.asarray(d[1], np.int32)]
  return tuple(out)


def _stock_builder(name: str, cache_dir: pathlib.Path, manual_dir: pathlib.Path | None):
  """Prepare a stock TFDS builder; with ``manual_dir`` it uses those files, no network."""
  import tensorflow_datasets as tfds
  # Its progress bars fill a log with redrawn lines (preparing MNIST takes seconds), and bury
  # the one line an error prints.
  tfds.disable_progress_bar()
  builder = tfds.builder(name, data_dir=str(cache_dir / "tfds"))
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  # One download_dir per dataset: TFDS caches extracted files by file name, and MNIST and
  # Fashion-MNIST share file names.
  builder.download_and_prepare(download_dir=str(cache_dir / "downloads" / name),
                               download_config=config)
  return builder


def _build_stock(name: str, class_names: list[str] | None):
  def build(cache_dir: pathlib.Path, manual_dir: pathlib.Path | None) -> RawData:
    builder = _stock_builder(name, cache_dir, manual_dir)
    names = class_names or list(builder.info.features["label"].names)
    return RawData(*_tfds_arrays(builder), class_names=names, source="official")
  return build


def _extract_once(tarball: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  marker = dest / ".extracted"
  if not marker.exists():
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
      tar.extractall(dest, filter="data")
    marker.touch()
  return dest


def _build_cifar10_jpeg(cache_dir: pathlib.Path, tarball: pathlib.Path) -> RawData:
  import tensorflow_datasets as tfds
  root = _extract_once(tarball, cache_dir / "extracted" / "cifar10_jpeg75")
  builder = tfds.folder_dataset.ImageFolder(str(root))
  folders = list(builder.info.features["label"].names)
  unknown = sorted(set(folders) - set(CIFAR10_CLASSES))
  if unknown or len(folders) != 10:
    raise ValueError(f"{root}: expected the 10 CIFAR-10 class folders {CIFAR10_CLASSES}, "
                     f"found {folders}")
  # ImageFolder numbers folders alphabetically; map explicitly to the official label order
  # rather than relying on the two orders happening to coincide.
  to_official = np.array([CIFAR10_CLASSES.index(f) for f in folders], np.int32)
  x_tr, y_tr, x_te, y_te = _tfds_arrays(builder)
  return RawData(x_tr, to_official[y_tr], x_te, to_official[y_te],
                 class_names=list(CIFAR10_CLASSES), source="jpeg75")


EXPLICIT = ("config data_dir", "$LPA_DATA_DIR")  # data dirs chosen by the user


@dataclasses.dataclass(frozen=True)
class _Source:
  key: str                          # cache key: "official" or "jpeg75"
  local: tuple[str, ...] | None     # files under the data root needed offline; None = online
  build: Callable[..., RawData]
  host: tuple[str, int] | None = None  # download server, probed before TFDS's slow retries


def _sources(name: str) -> list[_Source]:
  """Sources in order of preference for reading a cache (exact before lossy)."""
  if name in ("mnist", "fashion_mnist"):
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    # The manual idx files are byte-identical to what TFDS downloads: one cache key.
    build = _build_stock(name, classes)
    return [_Source("official", tuple(f"{name}/{f}" for f in MNIST_FILES),
                    lambda c, root: build(c, root / name)),
            _Source("official", None, lambda c, root: build(c, None),
                    host=("storage.googleapis.com", 443) if name == "mnist" else
                    ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80))]
  if name == "cifar10":
    return [_Source("official", None, lambda c, root: _build_stock(
                "cifar10", CIFAR10_CLASSES)(c, None), host=("www.cs.toronto.edu", 443)),
            _Source("jpeg75", (CIFAR10_JPEG_TARBALL,),
                    lambda c, root: _build_cifar10_jpeg(c, root / CIFAR10_JPEG_TARBALL))]
  if name == "cifar100":
    return [_Source("official", None,
                    lambda c, root: _build_stock("cifar100", None)(c, None),
                    host=("www.cs.toronto.edu", 443))]
  raise ValueError(f"no raw source for dataset {name!r}")


def _reachable(host: tuple[str, int], timeout: float = 5.0) -> bool:
  try:
    socket.create_connection(host, timeout=timeout).close()
    return True
  except OSError:
    return False


def _not_found(name, data_root, how, cache_dir, download, errors) -> DataNotFound:
  needs = [f for s in _sources(name) if s.local for f in s.local]
  lines = [f"Could not load dataset {name!r}. Looked in:",
           f"  * cache: {cache_dir / 'arrays'}/{name}__*.npz (none usable)",
           f"  * data dir ({how}): {data_root}"
           + (f" — expected {', '.join(needs)} there" if needs else
              " — no offline copy of this dataset is supported")]
  lines.append("  * TFDS download: " + ("failed" if download else "disabled (download=False)"))
  lines += [f"    {e}" for e in errors]
  lines += ["Fix: set LPA_DATA_DIR (or --config.data.data_dir) to a folder holding the "
            "offline copies (see shared/data/README.md), point LPA_CACHE_DIR at a prepared "
            "cache, or run once on a machine with internet access."]
  return DataNotFound("\n".join(lines))


def _local_files(s: _Source, root: pathlib.Path | None) -> bool:
  """Whether ``root`` holds all of ``s``'s files; raises at once when it holds only some."""
  if s.local is None or root is None:
    return False
  missing = [f for f in s.local if not (root / f).exists()]
  if missing and len(missing) < len(s.local):
    # TFDS would look for the rest online and retry for minutes: fail now, and say what.
    raise DataNotFound(
        f"Data dir {root} holds only part of this dataset's files: missing "
        f"{', '.join(missing)} (expected at {', '.join(str(root / f) for f in missing)}). "
        "Copy the missing files there (see shared/data/README.md).")
  return not missing


def _corrupt(name: str, s: _Source, root: pathlib.Path, e: Exception) -> Exception:
  """:class:`DataCorrupt` for a local copy that failed to build, or ``e`` itself when it is not
  about the data (a full disk, a read-only cache: their own handlers name them)."""
  if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS,
                                             errno.ENOSPC, errno.EDQUOT):
    return e
  first = (str(e).strip().splitlines() or [""])[0][:400]
  files = ", ".join(str(root / f) for f in s.local)
  return DataCorrupt(
      f"Could not prepare {name} from the data dir {root}: {type(e).__name__}: {first} The "
      f"files ({files}) are probably cut short or damaged: copy them again (see "
      "shared/data/README.md; SHA256SUMS beside them, where present, lists their checksums).")


def _cache_candidates(name, sources, cache, root, explicit) -> list[tuple[pathlib.Path, str]]:
  """``(path, source key)`` of the caches ``name`` may be read from, best first.

  Built from ``root`` (or downloaded) first.  Unless the data dir was given explicitly, also
  caches named the way older versions named them, and, when ``root`` does not hold the
  dataset (e.g. a GPU machine handed a cache dir), any cache of ``name``.
  """
  local = [s for s in sources if _local_files(s, root)]
  usable = [s for s in sources if s in local or s.local is None]
  paths = [(cache_path(cache, name, s.key, origin_tag(root if s.local else None)), s.key)
           for s in usable]
  if explicit:
    return paths
  paths += [(cache_path(cache, name, s.key), s.key) for s in usable]
  if not local:
    order = [s.key for s in sources]
    found = [(p, p.name[len(name) + 2:-4].split("__")[0])
             for p in sorted((cache / "arrays").glob(f"{name}__*.npz"))]
    paths += sorted([pk for pk in found if pk[1] in order], key=lambda pk: order.index(pk[1]))
  return paths


def cached_file(name: str, data_dir: str | None = None,
                cache_dir: str | None = None) -> pathlib.Path | None:
  """The cache file :func:`load_raw` would read first, or None when it would have to build.

  >>> import tempfile
  >>> cached_file("mnist", cache_dir=tempfile.mkdtemp()) is None   # an empty cache: build it
  True
  >>> cached_file("mnist")        # on a machine with the data cached   # doctest: +SKIP
  PosixPath('/root/.cache/lpa_jax/arrays/mnist__official__dir-b06afdb62b.npz')
  """
  root, how = resolve_data_dir(data_dir)
  for path, _ in _cache_candidates(name, _sources(name), resolve_cache_dir(cache_dir), root,
                                   how in EXPLICIT):
    if path.exists():
      return path
  return None


def load_raw(name: str, data_dir: str | None = None, cache_dir: str | None = None,
             download: bool = True) -> RawData:
  """Full arrays of ``name``: from cache, else built from a local copy, else downloaded.

  Not run as a doctest: it loads CIFAR-10 (the TFDS data).

  >>> raw = load_raw("cifar10")                      # doctest: +SKIP
  >>> raw.source  # offline copy: lossy JPEG re-encoding          # doctest: +SKIP
  'jpeg75'
  """
  cache = resolve_cache_dir(cache_dir)
  sources = _sources(name)
  root, how = resolve_data_dir(data_dir)
  raw = _first_cache(name, sources, cache, root, how)
  if raw is not None:  # TF never imported on this path
    return raw
  # Building is one process's job: TFDS prepares into a temporary dir and renames it, so two
  # processes preparing at once (two sweep shards on a fresh machine) fail with
  # FileExistsError.  The second waits here, then reads what the first cached.
  with _build_lock(cache, name):
    raw = _first_cache(name, sources, cache, root, how)
    return raw if raw is not None else _build(name, sources, cache, root, how, download)


def _first_cache(name, sources, cache, root, how) -> RawData | None:
  for path, key in _cache_candidates(name, sources, cache, root, how in EXPLICIT):
    raw = _read_cache(path, key)
    if raw is not None:
      return raw
  return None


@contextlib.contextmanager
def _build_lock(cache: pathlib.Path, name: str):
  """An exclusive, blocking ``flock`` on ``<cache>/locks/<name>.lock`` while ``name`` is
  built; the kernel drops it if the holder dies."""
  path = cache / "locks" / f"{name}.lock"
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"Waiting for another process that is preparing {name} in {cache} ...",
            flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build(name, sources, cache, root, how, download) -> RawData:
  errors = []
  # Build from a local copy before trying the network (the offline order of the spec).
  for s in sorted(sources, key=lambda s: s.local is None):
    if s.local is not None and not _local_files(s, root):
      continue
    if s.local is None and not download:
      continue
    if s.local is None and s.host and not _reachable(s.host):
      # TFDS would retry for minutes on an offline machine; fail in seconds instead.
      errors.append(f"no network: cannot reach {s.host[0]}:{s.host[1]}")
      continue
    try:
      raw = s.build(cache, root)
    except Exception as e:  # noqa: BLE001 — collected into the not-found message
      if s.local is not None:  # a local copy exists but is broken: say which, and what to do
        raise _corrupt(name, s, root, e) from e
      errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
      continue
    _save_npz(cache_path(cache, name, s.key, origin_tag(root if s.local else None)), raw)
    return raw
  raise _not_found(name, root, how, cache, download, errors)
