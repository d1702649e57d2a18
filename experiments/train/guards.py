"""Epoch-level checks that an activation method perturbed something, and not too much.

A radius that is absurd but finite (``eps=1e38`` in absolute mode) or a statistic that switches
every class off leaves δ zero everywhere: the run then equals plain cross-entropy while
labelled with the method.  The per-class diagnostics of the epoch row show it: no class has a
non-zero mean ‖δ‖.  LPA's balanced split assigns its signs at the end of epoch 1, so an epoch 1
with no signed class at all is how that split starts, not a fault.

  >>> check_perturbing({"delta_norm_C": [0.0, 0.2], "sign_C": [0.0, 1.0]}, epoch=2)
  >>> check_perturbing({"delta_norm_C": [0.0, 0.0], "sign_C": [0.0, 0.0]}, epoch=1)

δ can also vanish because the network did: when training collapses, the features at the point
die (every clean activation zero) and a relative radius ε·‖a‖ is zero with them.  The rows'
``act_norm_C`` tells the two apart, and the message names the one that happened.

Strength: the per-class loss change ``loss_change_C`` (perturbed minus clean loss) that LPA and
the adversarial baseline log grows during training, about tenfold on Fashion-MNIST-LT between
epoch 1 and mid-training (``experiments/results/fmnist_lt_tune``), so a radius calibrated at
initialisation says little about what a run does.  Each epoch row gets
``loss_change_signed``, the mean |loss change| over the classes the method perturbs.
:func:`check_strength` flags an epoch whose value exceeds a ceiling (``train.max_loss_change``,
default 1 nat: LPA's relative ε 0.1 on that task reached −5.5 nats for a contractive class and
lost 16 points to CE): the trainer warns once per run, or stops it when
``train.max_loss_change_action='stop'``.  :func:`strength_summary` reports the run's median
over its second half against the 0.05-nat floor (SPEC §1) and the epochs above the ceiling in
``results.json``.

  >>> signed_loss_change({"loss_change_C": [-0.2, 0.4, 0.0], "sign_C": [-1.0, 1.0, 0.0]})
  0.3
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
  head = (f"Training stopped: {where} perturbed nothing in epoch {epoch}: δ is zero for every "
          f"class (signed classes: {signed or 'none'}), so this run would equal plain "
          "cross-entropy under the method's name. ")
  if _features_died(row):
    raise NothingPerturbed(
        head + "The cause is the network, not the radius: the clean activations at the "
        "point are zero for every class (mean ‖a‖ per class: "
        f"{_rounded(row['act_norm_C'])}), so a radius relative to ‖a‖ is zero too. The "
        "features there died: training collapsed (this epoch's training accuracy "
        f"{_percent(row.get('accuracy'))}, test accuracy {_percent(row.get('test_accuracy'))}). "
        "Look at the earlier epochs' loss change (metrics.jsonl, loss_change_C) for the "
        "perturbation that drove it; a smaller radius (perturb.*.eps), β or learning rate "
        "avoids it. The last good checkpoint is kept in the work dir.")
  raise NothingPerturbed(
      head + "Check the radius (perturb.*.eps and its radius_mode: an absolute radius far "
      "beyond the activations' scale overflows) and the class split. The last good "
      "checkpoint is kept in the work dir.")


def _features_died(row: dict) -> bool:
  """Whether the row's clean activation norms (``act_norm_C``) are zero at every present class."""
  if "act_norm_C" not in row:
    return False
  norm_C = np.asarray(row["act_norm_C"], np.float64)
  present = np.asarray(row.get("present_C", np.ones_like(norm_C)), np.float64) > 0
  return bool(np.any(present) and np.all(norm_C[present] == 0))


def _rounded(values) -> list[float]:
  return [float(f"{v:.3g}") for v in np.asarray(values, np.float64)]


def _percent(value) -> str:
  return "n/a" if value is None else f"{100 * float(value):.1f} %"


class PerturbationTooStrong(FloatingPointError):
  """An activation method moved the loss of its classes by more than the ceiling in an epoch."""


def signed_loss_change(row: dict) -> float | None:
  """Mean |loss change| over the classes the method perturbs (``sign_C`` ≠ 0 when the row has
  signs, else every class) in an epoch row; ``None`` for rows without ``loss_change_C``."""
  if "loss_change_C" not in row:
    return None
  change = np.abs(np.asarray(row["loss_change_C"], np.float64))
  if "sign_C" in row and np.ndim(row["sign_C"]):
    change = change[np.asarray(row["sign_C"], np.float64) != 0]
  return round(float(change.mean()), 6) if change.size else 0.0


def check_strength(row: dict, epoch: int, perturbation=("none", None),
                   ceiling: float | None = None) -> None:
  """Raises :class:`PerturbationTooStrong` when the row's ``loss_change_signed`` exceeds
  ``ceiling`` (``None``: no ceiling)."""
  value = row.get("loss_change_signed")
  if ceiling is None or value is None or value <= ceiling:
    return
  method, point = perturbation
  where = f"{method}" + (f" at point {point!r}" if point else "")
  per_class = ", ".join(f"{c}: {v:+.2f}" for c, v in enumerate(row["loss_change_C"]))
  raise PerturbationTooStrong(
      f"Training stopped: {where} moved the loss of the classes it perturbs by {value:.2f} nats "
      f"on average in epoch {epoch}, above train.max_loss_change = {ceiling:g} (loss change "
      f"per class: {per_class}). A perturbation that strong no longer augments: the "
      "perturbed samples are pushed across the decision boundary (expansive) or made "
      "trivially easy (contractive), and the model trained on them loses accuracy. Lower the "
      "radius (perturb.*.eps), or set --config.train.max_loss_change=inf to train anyway. "
      "The last good checkpoint is kept in the work dir.")


def floor_message(strength: dict, perturbation=("none", None)) -> str:
  """The warning for a run whose loss change over the second half of training is below the
  floor.  A run that stayed weak throughout is close to plain training; one that reached the
  floor earlier and then faded is not, and is told apart: a network that collapses at the
  point (its training accuracy falling) makes the loss change fade too."""
  method, point = perturbation
  values = strength["per_epoch"]
  head = (f"{method} at {point!r} moved the loss of the classes it perturbs by only "
          f"{strength['median_second_half']:.3f} nats (median over the second half of "
          f"training), below the {strength['floor']:g}-nat floor at which a perturbation "
          "counts as measurable (SPEC §1)")
  if strength["max"] >= strength["floor"]:
    peak = int(np.argmax(values)) + 1
    return (head + f", after reaching {strength['max']:.3f} nats in epoch {peak}: the "
            "perturbation faded during training. A network that collapses at the point "
            "fades it too, so compare the epochs' training accuracy (metrics.jsonl) before "
            "reading this run as close to plain training.")
  return (head + ": this run is close to plain training. A larger radius (perturb.*.eps) "
          "perturbs more; results.json records the per-epoch values.")


def strength_summary(rows, floor: float | None = 0.05, ceiling: float | None = None):
  """``results.json``'s ``perturbation_strength``: the epochs' ``loss_change_signed``, their
  median over the second half of training and their maximum, against ``floor`` and
  ``ceiling``; ``None`` when no row has it (no activation method with a loss change)."""
  values = [r["loss_change_signed"] for r in rows if r.get("loss_change_signed") is not None]
  if not values:
    return None
  late = values[len(values) // 2:]
  median = float(np.median(late))
  above = [i + 1 for i, v in enumerate(values) if ceiling is not None and v > ceiling]
  return {"per_epoch": values, "median_second_half": round(median, 6),
          "max": round(float(max(values)), 6), "floor": floor, "ceiling": ceiling,
          "below_floor": bool(floor is not None and median < floor),
          "epochs_above_ceiling": above}
