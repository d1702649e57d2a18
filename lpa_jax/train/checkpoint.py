"""Orbax checkpointing with automatic resume from the work dir (``args=`` API)."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))


def save(mgr: ocp.CheckpointManager, state, force: bool = False) -> None:
  step = int(jax.device_get(state.step))
  if mgr.latest_step() == step:
    return
  mgr.save(step, args=ocp.args.StandardSave(state), force=force)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, state):
  """Returns the latest checkpoint restored into ``state``'s structure and shardings, or
  ``state`` itself when the work dir has none."""
  step = mgr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
