"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-16-8, WRN-28-10.

Points, bottom to top: ``stem``, per stage ``stageS.block0 … stageS.block{n-1}, stageS``,
then ``features, logits`` (as the CIFAR ResNets; WRN-28-10 has ``n = 4``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lpa_jax.models.resnet import PreActBlock, Stage, Stem, stage_layers
from lpa_jax.models.staged import GlobalPool, make_head, run_stages, staged_points


class WideResNet(nn.Module):
  """WRN-depth-k: pre-activation blocks, stage widths 16k, 32k, 64k.

  ``head``: ``linear`` (default) or ``cosine`` (normalised classifier, for LDAM).
  ``dtype``: compute dtype (parameters stay float32, logits are float32).
  """
  depth: int = 28
  widen: int = 10
  num_classes: int = 10
  head: str = "linear"
  dtype: Any = jnp.float32

  @property
  def num_blocks(self) -> int:
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got depth={self.depth}")
    return (self.depth - 4) // 6

  @property
  def points(self) -> tuple[str, ...]:
    return staged_points(3, self.num_blocks)

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    dt = self.dtype
    layers = [("stem", Stem(16, bn_relu=False, dtype=dt, name="stem_layer"))]
    for i in range(3):
      stage = Stage(PreActBlock, 16 * self.widen * 2**i, self.num_blocks, 1 if i == 0 else 2,
                    dt, name=f"stage{i + 1}_layer")
      layers += stage_layers(f"stage{i + 1}", stage)
    layers += [("features", GlobalPool(bn_relu=True, dtype=dt, name="features_layer")),
               ("logits", make_head(self.num_classes, self.head, dt))]
    return run_stages(self, layers, x, train, start, stop)
