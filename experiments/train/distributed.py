"""Training past one host: ``jax.distributed``, process-local batches, global arrays.

Every process runs the same program over one ``('data',)`` mesh of *all* processes' devices.
Each process holds the (small) dataset on its host and, at every step, gathers only the rows
of the global batch that its own devices hold; :func:`host_array` assembles them into one
global array.  The train step is jitted over that global batch, so class-level quantities
(``δ_c``, class statistics, gradient means) are computed over all processes' examples, as on
one host.  State, metrics and predictions are replicated; orbax checkpoints are written by all
processes together, metrics and results by process 0 alone (:func:`is_main`).  Not run as a
doctest (several processes, and a training run):

  >>> initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # first   # doctest: +SKIP
  >>> results = train_and_evaluate(config, "runs/lt")   # on every process    # doctest: +SKIP
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.data.pipeline import dataset_stats, prepare_batch
from lpa_jax.train.step import step_keys


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to the others (``jax.distributed.initialize``); call it before anything
  touches a JAX backend.  With no arguments JAX finds them itself on a TPU slice, under SLURM
  or Open MPI; on plain GPU hosts name the coordinator (process 0's ``host:port``), the number
  of processes and this process's index.  Not run as a doctest: it needs the other processes.

  >>> initialize("localhost:1234", num_processes=2, process_id=1)   # doctest: +SKIP
  """
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes, process_id=process_id).items()
            if v is not None}
  jax.distributed.initialize(**kwargs)


def is_main() -> bool:
  """Whether this process writes the run's files (metrics, results): process 0.

  >>> is_main()   # one process
  True
  """
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches ``name`` (no-op in one process), e.g. after process 0
  has prepared the work dir that the others then read."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def host_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds whole: each process copies
  only the slices its own devices hold (``jax.device_put`` of a host array cannot address
  another process's devices).

  >>> from lpa_jax.train.step import make_mesh
  >>> host_array(np.arange(8), NamedSharding(make_mesh(), P("data"))).shape
  (8,)
  """
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch(x: jax.Array) -> np.ndarray:
  """``x`` on this host as numpy; gathered from all processes when sharded across them.

  >>> fetch(jnp.arange(3)).tolist()
  [0, 1, 2]
  """
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_process_batch_fn(config, data, mesh, spe: int, epoch_perm: Callable) -> Callable:
  """``(state, epoch, i, perm=None) -> batch`` like :func:`experiments.train.build.make_batch_fn`,
  but each process reads only its devices' rows of the global batch from host memory.

  The global batch (indices ``perm[i]``, augmentation keys, normalisation) is the one a single
  process would make, so 2 processes × 4 devices train exactly as 1 × 8.  Not run as a
  doctest: it needs a loaded ``data``.

  >>> batch_fn = make_process_batch_fn(config, data, mesh, 7, epoch_perm)   # doctest: +SKIP
  >>> batch_fn(state, 0, 0)["image"].shape   # the global batch             # doctest: +SKIP
  (128, 28, 28, 1)
  """
  sharded = NamedSharding(mesh, P("data"))
  mean, std = (tuple(s) for s in dataset_stats(config.data.name))
  augment = config.train.augment

  def prepare(rng, step, images, labels):
    r_data, _ = step_keys(rng, step)
    return prepare_batch(r_data, images, labels, augment, mean, std)
  prepare = jax.jit(prepare, out_shardings=sharded)
  x_train, y_train = data.x_train, np.asarray(data.y_train, np.int32)
  host_perm = {}  # the epoch's permutation on the host, fetched once per epoch

  def rows(perm, i):
    key = id(perm)
    if key not in host_perm:
      host_perm.clear()
      host_perm[key] = (perm, np.asarray(perm))  # keeps perm alive so its id stays unique
    return host_perm[key][1][i]

  def batch_fn(state, epoch: int, i: int, perm=None):
    perm = epoch_perm(epoch) if perm is None else perm
    idx_B = rows(perm, i)
    images = jax.make_array_from_callback(
        (len(idx_B),) + x_train.shape[1:], sharded, lambda index: x_train[idx_B[index[0]]])
    labels = jax.make_array_from_callback(
        idx_B.shape, sharded, lambda index: y_train[idx_B[index[0]]])
    return prepare(state.rng, epoch * spe + i, images, labels)
  return batch_fn
