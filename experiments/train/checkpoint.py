"""Orbax checkpointing with automatic, verified resume from the work dir (``args=`` API).

Each checkpoint holds two items: ``state`` (the :class:`TrainState`) and ``meta`` (JSON): a
SHA-256 digest of the state's arrays and their signature (path, shape, dtype), plus whatever
the loop adds (the metrics of a partly done epoch).  Restoring tries the newest checkpoint
first and falls back to older ones, with a warning, when one is unreadable or fails its
digest; a state of another shape (another method or model) is refused with a clear message.

  >>> import tempfile
  >>> from lpa_jax.train.state import TrainState
  >>> state = TrainState(step=jnp.int32(3), params={"w": jnp.ones(2)}, model_state={},
  ...                    opt_state=(), act_state=(), logit_state=(), rng=jax.random.PRNGKey(0))
  >>> mgr = manager(tempfile.mkdtemp())                            # e.g. manager("runs/lt")
  >>> save(mgr, state, extra={"epoch_rows": []})
  >>> template_state = state.replace(params={"w": jnp.zeros(2)})   # the structure to fill
  >>> state, extra = restore_latest(mgr, template_state)
  >>> int(state.step), state.params["w"].tolist(), extra
  (3, [1.0, 1.0], {'epoch_rows': []})
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The work dir's checkpoint holds a differently shaped state (another method or model)."""


class NoUsableCheckpoint(RuntimeError):
  """Every checkpoint in the work dir is unreadable or fails its integrity check."""


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))


def signature(state) -> list[list]:
  """``[path, shape, dtype]`` of every array of ``state``: its structure, comparable as JSON."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return [[jax.tree_util.keystr(p), list(np.shape(x)), str(getattr(x, "dtype", None) or
                                                           np.asarray(x).dtype)]
          for p, x in leaves]


def digest(state) -> str:
  """SHA-256 of every array's bytes, in tree order (detects any flipped bit on restore)."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(jax.device_get(state)):
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save(mgr: ocp.CheckpointManager, state, extra: dict | None = None,
         force: bool = False) -> None:
  """Saves ``state`` at its step with its digest, signature and ``extra`` (JSON)."""
  step = int(jax.device_get(state.step))
  if mgr.latest_step() == step:
    return
  meta = {"digest": digest(state), "signature": signature(state), **(extra or {})}
  # Orbax's writer threads log a failure's whole traceback before re-raising it here; the
  # caller reports the error once (a full disk otherwise ends under a hundred lines).
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)), force=force)
    mgr.wait_until_finished()
  finally:
    absl_logger.setLevel(level)


def _describe_mismatch(saved: list, wanted: list) -> str:
  saved_d = {p: (s, d) for p, s, d in saved}
  wanted_d = {p: (s, d) for p, s, d in wanted}
  lines = [f"  only in the checkpoint: {p}" for p in saved_d if p not in wanted_d]
  lines += [f"  only in this run: {p}" for p in wanted_d if p not in saved_d]
  lines += [f"  {p}: shape/dtype {saved_d[p]} in the checkpoint, {wanted_d[p]} in this run"
            for p in wanted_d if p in saved_d and saved_d[p] != wanted_d[p]]
  return "\n".join(lines[:12] + ([f"  ... and {len(lines) - 12} more"] if len(lines) > 12
                                 else []))


def _mismatch(directory, detail: str) -> CheckpointMismatch:
  return CheckpointMismatch(
      f"The checkpoint in {directory} does not fit this run's state (another method, model "
      f"or library version?):\n{detail}\nUse another work dir, or start afresh in this one "
      "(--fresh, or train_and_evaluate(..., fresh=True)).")


def _restore_step(mgr, step: int, state):
  """``(state, extra)`` from checkpoint ``step``; raises on a bad or mismatched checkpoint."""
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  wanted = signature(state)
  if meta["signature"] != wanted:
    raise _mismatch(mgr.directory, _describe_mismatch(meta["signature"], wanted))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  if digest(restored) != meta["digest"]:
    raise ValueError("integrity check failed: the restored arrays differ from those saved")
  extra = {k: v for k, v in meta.items() if k not in ("digest", "signature")}
  return restored, extra


@contextlib.contextmanager
def _quiet_failures():
  """While a damaged checkpoint is read: orbax's abandoned read coroutines report the same
  failure again as 'Exception ignored in ...' (tens of lines each) and its logger logs it; the
  caller reports it once."""
  hook, absl_logger = sys.unraisablehook, logging.getLogger("absl")
  level = absl_logger.level

  def drop_coroutines(unraisable):
    if "coroutine" not in repr(unraisable.object):
      hook(unraisable)
  sys.unraisablehook = drop_coroutines
  absl_logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    gc.collect()  # the abandoned coroutines are reported when collected: do it here
    sys.unraisablehook = hook
    absl_logger.setLevel(level)


def _first_line(e: BaseException) -> str:
  """The gist of ``e``: its first line, without TensorStore's spec dump."""
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return first.split(" See full TensorStore details")[0][:300]


def restore_latest(mgr: ocp.CheckpointManager, state):
  """``(state, extra)`` from the newest usable checkpoint, restored into ``state``'s structure
  and shardings; ``(state, None)`` when the work dir has none.

  An unreadable or corrupt checkpoint is skipped with a warning naming it, and the next older
  one is tried; none usable raises :class:`NoUsableCheckpoint`.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      with _quiet_failures():
        return _restore_step(mgr, step, state)
    except CheckpointMismatch:
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read one checkpoint: try the next
      first = _first_line(e)
      errors.append(f"step {step}: {type(e).__name__}: {first}")
      warnings.warn(f"Checkpoint {os.path.join(str(mgr.directory), str(step))} is unusable "
                    f"({type(e).__name__}: {first}); trying an older one.", stacklevel=2)
  if errors:
    raise NoUsableCheckpoint(
        f"No usable checkpoint in {mgr.directory}:\n  " + "\n  ".join(errors) +
        "\nStart afresh in this work dir with --fresh (train_and_evaluate(..., fresh=True)).")
  return state, None
