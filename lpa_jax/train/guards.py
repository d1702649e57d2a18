"""Epoch-level check that an activation method perturbed something.

A radius that is absurd but finite (``eps=1e38`` in absolute mode) or a statistic that switches
every class off leaves δ zero everywhere: the run then equals plain cross-entropy while
labelled with the method.  The per-class diagnostics of the epoch row show it: no class has a
non-zero mean ‖δ‖.  LPA's balanced split assigns its signs at the end of epoch 1, so an epoch 1
with no signed class at all is how that split starts, not a fault.

  >>> check_perturbing({"delta_norm_C": [0.0, 0.2], "sign_C": [0.0, 1.0]}, epoch=2)
  >>> check_perturbing({"delta_norm_C": [0.0, 0.0], "sign_C": [0.0, 0.0]}, epoch=1)
"""
from __future__ import annotations

import numpy as np


class NothingPerturbed(FloatingPointError):
  """An activation method left every activation unchanged for a whole epoch."""


def check_perturbing(row: dict, epoch: int, perturbation=("none", None)) -> None:
  """Raises :class:`NothingPerturbed` when the epoch row's ``delta_norm_C`` is zero for every
  class; a no-op for rows without it (no activation method) and for an epoch 1 in which no
  class was signed yet."""
  if "delta_norm_C" not in row:
    return
  delta_C = np.asarray(row["delta_norm_C"], np.float64)
  if np.any(delta_C > 0):
    return
  sign_C = np.asarray(row.get("sign_C", 0.0), np.float64)
  if epoch == 1 and not np.any(sign_C != 0):
    return
  method, point = perturbation
  where = f"{method}" + (f" at point {point!r}" if point else "")
  signed = np.flatnonzero(sign_C != 0).tolist() if np.ndim(sign_C) else []
  raise NothingPerturbed(
      f"Training stopped: {where} perturbed nothing in epoch {epoch}: δ is zero for every "
      f"class (signed classes: {signed or 'none'}), so this run would equal plain "
      "cross-entropy under the method's name. Check the radius (perturb.*.eps and its "
      "radius_mode: an absolute radius far beyond the activations' scale overflows) and the "
      "class split. The last good checkpoint is kept in the work dir.")
