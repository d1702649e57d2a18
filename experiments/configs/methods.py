"""Default hyper-parameters of every registered method, as ml_collections blocks.

Task configs put each block under ``config.perturb.<name>``; the SPEC defaults live here once.
The library core reads a block by attribute only, so it never needs ml_collections.

>>> blocks = method_blocks("longtail")
>>> blocks["lpa"].steps, blocks["lpl"].alpha
(3, 0.15)
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


def activation_blocks() -> dict[str, mlc.ConfigDict]:
  """The SPEC §1 table's methods; ``point='auto'`` is LPA's default layer.  Rates, σ and the
  PCA fraction are ours; Manifold Mixup's α = 2 and ``points=()`` (= input and the two layers
  below the default one) follow its paper's CIFAR setting."""
  B = lambda **kw: mlc.ConfigDict(kw)  # noqa: E731
  return {
      "dropout": B(point="auto", rate=0.1),
      "noise": B(point="auto", sigma=0.1, mode="additive"),
      "manifold_mixup": B(points=(), alpha=2.0, select="auto"),
      "adversarial": B(point="auto", eps=0.1, beta=0.7, method="fgsm", steps=3),
      "deep_augmentation": B(point="auto", mode="dropout", rate=0.2, pca_frac=0.25),
  }


def logit_blocks(split: str = "balanced") -> dict[str, mlc.ConfigDict]:
  """SPEC §2: LPL α 0.005 with K 20 (balanced) or α 0.15 (long tail; K 20 is ours), varied
  K in 10…40; head size ``num_head`` None = round(0.4·C) (the paper's 4 of 10).  Logit
  adjustment τ 1.  LDAM margin 0.5, scale 30, DRW β 0.9999 from 80% of training (160/200)."""
  return {
      "lpl": mlc.ConfigDict(dict(
          split=split, alpha=0.15 if split == "longtail" else 0.005, steps=20, varied=False,
          steps_min=10, steps_max=40, normalize=True, num_head=_none(int), signs=_none(tuple))),
      "logit_adjust": mlc.ConfigDict(dict(tau=1.0, mode="loss")),
      "ldam": mlc.ConfigDict(dict(max_margin=0.5, scale=30.0, drw=True, drw_beta=0.9999,
                                  drw_fraction=0.8, batch_normalize=True)),
  }


def gradient_blocks(split: str = "balanced") -> dict[str, mlc.ConfigDict]:
  """SPEC §3: LPG ε 0.1, Δε 0.1 (ours), splits as LPL; GAF (α, β) = (0.1, 20); SAM ρ 0.05;
  clipping max-norm 1.0 (ours); gradient noise η 0.01, γ 0.55 (Neelakantan et al.)."""
  return {
      "lpg": mlc.ConfigDict(dict(split=split, eps=0.1, delta_eps=0.1, varied=True,
                                 num_head=_none(int), signs=_none(tuple))),
      "gaf": mlc.ConfigDict(dict(alpha=0.1, beta=20.0, form="atan", where="raw",
                                 unit_slope=False)),
      "sam": mlc.ConfigDict(dict(rho=0.05)),
      "clip": mlc.ConfigDict(dict(max_norm=1.0)),
      "grad_noise": mlc.ConfigDict(dict(eta=0.01, gamma=0.55, seed=0)),
  }


def method_blocks(split: str = "balanced") -> dict[str, mlc.ConfigDict]:
  """One default block per registered method; ``split`` is the task's class-split rule."""
  adaptive = lpa_block(split)
  del adaptive["point"], adaptive["extra_points"]
  adaptive.update(dict(candidates=(), every=10, select="auto"))
  return {"lpa": lpa_block(split), "lpa_adaptive": adaptive, **activation_blocks(),
          **logit_blocks(split), **gradient_blocks(split)}
