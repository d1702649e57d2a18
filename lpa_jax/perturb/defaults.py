"""Default hyper-parameters of every registered method, as ml_collections blocks.

Task configs put each block under ``config.perturb.<name>``; the SPEC defaults live here once.
"""
from __future__ import annotations

import ml_collections as mlc


def _none(field_type):
  return mlc.FieldReference(None, field_type=field_type)


def lpa_block(split: str = "balanced") -> mlc.ConfigDict:
  """LPA (SPEC §1): ε 0.1, Δε 0.1, β 0.7, T 3, varied radius, normalised steps, last stage."""
  return mlc.ConfigDict(dict(
      point="auto", split=split, eps=0.1, delta_eps=0.1, beta=0.7, steps=3, varied=True,
      normalize=True, lowrank=0.0, extra_points=(), radius_mode="absolute",
      num_head=_none(int), signs=_none(tuple)))


def method_blocks(split: str = "balanced") -> dict[str, mlc.ConfigDict]:
  """One default block per registered method; ``split`` is the task's class-split rule."""
  return {"lpa": lpa_block(split)}
