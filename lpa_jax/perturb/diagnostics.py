"""Per-class diagnostics shared by every activation method, and the check that stops a run
when one of them (or a class statistic, radius or δ) is not finite.

>>> act, labels_B = jnp.ones((2, 3)), jnp.array([0, 1])
>>> new_act = act.at[0, 1].add(1.0)                  # δ on example 0 (class 0): raises logit 1
>>> logits, clean_logits = new_act @ jnp.eye(3, 2), act @ jnp.eye(3, 2)
>>> targets = jax.nn.one_hot(labels_B, 2)
>>> aux = perturbation_diagnostics(new_act, act, labels_B, 2, clean_logits, logits, targets)
>>> np.asarray(aux["delta_norm_C"]).round(3), np.asarray(aux["loss_change_C"]).round(3)
(array([1., 0.], dtype=float32), array([0.62, 0.  ], dtype=float32))
>>> check_finite(jax.device_get(aux), step=12, method="lpa", point="stage3")   # all finite
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpa_jax.perturb.base import default_loss, invalid_label_count
from lpa_jax.perturb.tables import per_class_mean, row_norms

# Per-class vectors that must be finite for every present class (a NaN statistic would
# otherwise give NaN radii and, through the projection, a silently zero δ).
CHECKED = ("class_stat_C", "delta_norm_C", "radius_C", "delta_table_norm_C", "loss_change_C",
           "expansive_share_C", "clean_prob_C", "sign_C", "act_norm_C")


def perturbation_diagnostics(new_act, act, labels_B, num_classes, clean_logits, logits,
                             targets_BxC, clean_targets_BxC=None, sign_C=None,
                             loss_fn=None) -> dict:
  """Per-class means over the batch's samples of a perturbation ``δ = new_act − act``.

  ``delta_norm_C`` (mean ‖δ_i‖), ``act_norm_C`` (mean clean ‖a_i‖: a relative radius is a share
  of it, and a zero here means the features at the point died), ``sign_C``,
  ``expansive_share_C`` (share with ‖a+δ‖ > ‖a‖),
  ``present_C``, ``invalid_labels`` (labels outside ``[0, C)``: :func:`check_finite` raises on
  them); with ``clean_logits`` also ``loss_change_C`` (perturbed minus clean loss, in
  ``loss_fn`` — the loss PGD follows, default cross-entropy; the clean loss uses
  ``clean_targets_BxC``, default ``targets_BxC``) and ``clean_prob_C`` (clean probability of
  the true class).
  """
  loss_fn = loss_fn or default_loss
  new_act, act, logits = jax.lax.stop_gradient((new_act, act, logits))
  onehot_BxC = jax.nn.one_hot(labels_B, num_classes)
  delta = (new_act - act).astype(jnp.float32)
  act = act.astype(jnp.float32)
  act_norm_B = row_norms(act)
  expansive_B = (row_norms(act + delta) > act_norm_B).astype(jnp.float32)
  sign_C = jnp.zeros((num_classes,)) if sign_C is None else sign_C
  out = {
      "delta_norm_C": per_class_mean(onehot_BxC, row_norms(delta)),
      "act_norm_C": per_class_mean(onehot_BxC, act_norm_B),
      "sign_C": jnp.asarray(sign_C, jnp.float32) * jnp.ones(num_classes),
      "expansive_share_C": per_class_mean(onehot_BxC, expansive_B),
      "present_C": (onehot_BxC.sum(0) > 0).astype(jnp.float32),
      "invalid_labels": invalid_label_count(labels_B, num_classes),
  }
  if clean_logits is not None:
    clean_logits = jax.lax.stop_gradient(clean_logits)
    clean_targets_BxC = targets_BxC if clean_targets_BxC is None else clean_targets_BxC
    dloss_B = loss_fn(logits, targets_BxC) - loss_fn(clean_logits, clean_targets_BxC)
    prob_B = jnp.sum(jax.nn.softmax(clean_logits.astype(jnp.float32)) * onehot_BxC, -1)
    out["loss_change_C"] = per_class_mean(onehot_BxC, dloss_B.astype(jnp.float32))
    out["clean_prob_C"] = per_class_mean(onehot_BxC, prob_B)
  return out


CAUSES = ("class_stat_C", "radius_C")  # what the method reads; the rest are its outputs


def nonfinite_classes(aux: dict, names=CHECKED) -> dict[str, list[int]]:
  """``{name: [class, ...]}`` for every checked per-class entry that is NaN/inf at a present
  class (host-side; ``aux`` as numpy)."""
  present = np.asarray(aux.get("present_C", 1.0)) > 0
  out = {}
  for name in names:
    if name in aux:
      v = np.asarray(aux[name], np.float64)
      # The split's statistic matters for every class; the rest only where a class is present.
      mask = True if name == "class_stat_C" or v.shape != np.shape(present) else present
      bad = ~np.isfinite(v) & mask
      if np.any(bad):
        out[name] = np.flatnonzero(bad).tolist()
  return out


def check_finite(aux: dict, step: int | None = None, method: str = "the activation method",
                 point: str | None = None, names=CHECKED) -> None:
  """Raises ``FloatingPointError`` naming the method, point, quantity and classes when a class
  statistic, radius, δ or diagnostic (of ``names``) is NaN/inf; a no-op otherwise.

  Call it on the host with a step's aux (the library's loop does, every step: first on the
  :data:`CAUSES`, then on the loss, then on the rest).  Whatever ``names`` says, it first
  raises ``ValueError`` when ``aux['invalid_labels']`` counts labels outside ``[0, C)``
  (under ``jit`` the labels could not be checked where they came in).

  >>> check_finite({"invalid_labels": np.float32(2), "present_C": np.ones(10)}, step=3)
  Traceback (most recent call last):
  ValueError: the batch at step 3 has 2 label(s) outside [0, 10): labels must be 0-indexed ...
  """
  check_label_count(aux, step)
  bad = nonfinite_classes(aux, names)
  if not bad:
    return
  where = f"{method}" + (f" at point {point!r}" if point else "")
  what = "; ".join(f"{k} at class(es) {v}" for k, v in bad.items())
  at = f" at step {step}" if step is not None else ""
  raise FloatingPointError(
      f"{where}: non-finite {what}{at}. A NaN class statistic or radius would silently turn δ "
      "off, so training stops here. Check the inputs and the learning rate; the last good "
      "checkpoint is kept in the work dir.")


def check_label_count(aux: dict, step: int | None = None) -> None:
  """Raises ``ValueError`` when ``aux['invalid_labels']`` (from the train step or
  :func:`perturbation_diagnostics`) is positive: a label ``C`` would get class ``C−1``'s row
  of every class table and ``−1`` class 0's, silently."""
  n = float(np.asarray(aux.get("invalid_labels", 0.0)))
  if n > 0:
    c = np.shape(aux["present_C"])[-1] if "present_C" in aux else "num_classes"
    at = f" at step {step}" if step is not None else ""
    raise ValueError(
        f"the batch{at} has {int(n)} label(s) outside [0, {c}): labels must be 0-indexed "
        "class ids (shift 1-indexed labels by one; drop unlabelled examples marked -1 before "
        "training)")
