"""The benchmark's FLOP model: XLA's counts, the cost model, and the check that LPA adds
exactly ``T·2F_up`` FLOPs to a plain step.

``F`` is the train-mode forward of the whole network, ``F_up`` that of the layers above a
point; both are read from XLA's ``cost_analysis``, always on the CPU backend.  Not run as a
doctest: compiling ResNet-32 takes 5–15 s on a CPU.

>>> from lpa_jax.models import get_model
>>> model = get_model("resnet32", 10)
>>> F, frac = flop_fractions(model, ("stage2", "stage3"), batch_size=128)   # doctest: +SKIP
>>> f = frac["stage2"]                                                      # doctest: +SKIP
>>> round(f, 4), round(cost_model(3, f), 3)    # 1 + T·2F_up/(3F)           # doctest: +SKIP
(0.2973, 1.595)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lpa_jax.perturb.hooks import cut_staged, full_apply

IMAGE_SHAPE = (32, 32, 3)  # CIFAR; every benchmarked model takes it (the MLP flattens it)
FLOP_TOL = 0.05  # BN/ReLU backward, the δ gather/scatter and the projection are not free
# The published implementation's cost, +18 % at T = 3 (ResNet-110): 1 + 2·3·f/3 = 1.18.
PAPER_FRACTION = 0.09


def flops_of(compiled) -> float:
  """FLOPs of a compiled computation (``cost_analysis`` is a dict or a list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float((cost or {}).get("flops", 0.0))


def counting_device():
  """The device whose XLA counts FLOPs faithfully: the host CPU.  XLA:GPU lowers convolutions
  to library calls (cuDNN) that its ``cost_analysis`` does not count (a ResNet-32 forward reads
  as ~2% of its FLOPs there), so fractions taken on a GPU are wrong; FLOPs are a property of
  the maths, not the device, so they are always counted on the CPU backend."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: count where we are, and say so
    return None


def flop_source() -> str:
  dev = counting_device()
  return ("XLA:CPU cost_analysis" if dev is not None
          else f"XLA:{jax.default_backend()} cost_analysis (no CPU backend)")


def init_variables(model):
  """The model's variables, initialised as the bench's FLOP counts and pieces use them."""
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE), train=False)


def flop_fractions(model, points, batch_size: int) -> tuple[float, dict[str, float]]:
  """``(F, {point: F_up / F})`` for the train-mode forward (BN on batch statistics), the mode
  the train step runs in; ``upper`` is counted from an activation of the right shape.  Counted
  by XLA:CPU whatever the default backend (see :func:`counting_device`)."""
  dev = counting_device()
  put = (lambda t: jax.device_put(t, dev)) if dev is not None else (lambda t: t)
  variables = put(init_variables(model))
  x = put(jnp.zeros((batch_size,) + IMAGE_SHAPE, jnp.float32))
  flops = lambda fn, *args: flops_of(jax.jit(fn).lower(*args).compile())
  full = flops(lambda v, x: full_apply(cut_staged(model, model.points[-1]), v, x, True),
               variables, x)
  frac = {}
  for p in points:
    cut = cut_staged(model, p)
    act = put(jnp.zeros(activation_shape(model, p, batch_size, variables), jnp.float32))
    frac[p] = flops(lambda v, a, cut=cut: cut.upper(v, a, True), variables, act) / full
  return full, frac


def activation_shape(model, point: str, batch_size: int, variables=None) -> tuple[int, ...]:
  """The shape of the activation at ``point`` for a batch (abstract evaluation, no FLOPs).

  >>> from lpa_jax.models import get_model
  >>> model = get_model("resnet32", 10)
  >>> abstract = jax.eval_shape(lambda: init_variables(model))   # shapes only: no FLOPs
  >>> activation_shape(model, "stage3", 128, abstract)
  (128, 8, 8, 64)
  """
  variables = init_variables(model) if variables is None else variables
  cut = cut_staged(model, point)
  x = jax.ShapeDtypeStruct((batch_size,) + IMAGE_SHAPE, jnp.float32)
  return tuple(jax.eval_shape(lambda v, x: cut.lower(v, x, True)[0], variables, x).shape)


def cost_model(T: int, frac: float) -> float:
  """SPEC §1: each PGD step re-runs the upper part forward + backward to the activation
  (≈ 2 F_up) on top of a plain step (forward + backward ≈ 3 F)."""
  return 1.0 + T * 2.0 * frac / 3.0


def onehot_gather_flops(batch_size: int, num_classes: int, dim: int) -> float:
  """FLOPs a ``one_hot(y) @ δ`` class-table gather adds per PGD step: ``2·B·C·D`` forward and
  as much for the gradient to ``δ``; a row gather (``δ[y]``) costs ``B·D`` instead.

  >>> onehot_gather_flops(128, 1000, 8 * 8 * 64) / 1e9    # ResNet-32 at stage3, C = 1000
  2.097152
  """
  return 4.0 * batch_size * num_classes * dim


def step_gflops(step, state, batch) -> float | None:
  """XLA's FLOP count of the compiled step, per device (cached: no second compile).  PGD is
  unrolled, so all T steps are counted (a ``while`` body would count once).  CPU only."""
  if jax.default_backend() != "cpu":
    return None  # XLA:GPU/TPU do not count library convolutions: the number would mislead
  try:
    return flops_of(step.lower(state, batch).compile()) / 1e9
  except Exception:  # noqa: BLE001 — a diagnostic only
    return None


def flop_check(rows, gflops_forward: float | None) -> dict | None:
  """Whether XLA's count of each compiled LPA step exceeds plain's by ``T·2F_up``.

  That is the cost model's FLOPs, so the layers below the point are never recomputed (that
  would add ``2(F - F_up)`` per step) and the class-table gather costs nothing that grows
  with ``C`` (``one_hot(y) @ δ`` adds :func:`onehot_gather_flops` per step).  A row passes
  within ``FLOP_TOL`` of ``max(T·2F_up, F)``.  ``None`` where step FLOPs were not counted
  (GPU runs) or without ``gflops_forward`` (F per device, in GFLOP).

  >>> plain_row = dict(method="plain", step_gflops=50.0)          # XLA's count of each step
  >>> lpa_row = dict(method="lpa", point="stage3", T=3, flop_fraction_above=0.09,
  ...                step_gflops=50.0 + 3 * 2 * 0.09 * 16.6)       # plain + T·2F_up
  >>> flop_check([plain_row, lpa_row], gflops_forward=16.6)["ok"]
  True
  """
  plain = rows[0].get("step_gflops") if rows and rows[0]["method"] == "plain" else None
  counted = [r for r in rows if r["method"] == "lpa" and r.get("step_gflops") is not None
             and r.get("flop_fraction_above") is not None]
  if not (gflops_forward and plain and counted):
    return None
  model = lambda r: r["T"] * 2 * r["flop_fraction_above"] * gflops_forward
  err = {id(r): (r["step_gflops"] - plain) - model(r) for r in counted}
  rel = {id(r): err[id(r)] / max(model(r), gflops_forward) for r in counted}
  off = [r for r in counted if abs(rel[id(r)]) > FLOP_TOL]
  worst = max(counted, key=lambda r: abs(rel[id(r)]))
  return dict(
      target=f"every LPA step adds T*2F_up FLOPs to plain (XLA count, within {FLOP_TOL:.0%} "
             "of max(T*2F_up, F))",
      ok=not off,
      detail="; ".join(f"{r['point']} T={r['T']}: {err[id(r)]:+.2f} GFLOP" for r in off)
      or f"{len(counted)} rows; largest gap {rel[id(worst)]:+.1%} ({worst['point']} "
         f"T={worst['T']})")
