"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-16-8, WRN-28-10.

Points: ``stem, stage1, stage2, stage3, features, logits``.
"""
from __future__ import annotations

import flax.linen as nn

from lpa_jax.models.resnet import PreActBlock, Stage, Stem
from lpa_jax.models.staged import GlobalPool, linear_head, run_stages


class WideResNet(nn.Module):
  """WRN-depth-k: pre-activation blocks, stage widths 16k, 32k, 64k."""
  depth: int = 28
  widen: int = 10
  num_classes: int = 10

  @property
  def points(self) -> tuple[str, ...]:
    return ("stem", "stage1", "stage2", "stage3", "features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got depth={self.depth}")
    n = (self.depth - 4) // 6
    layers = [("stem", Stem(16, bn_relu=False, name="stem_layer"))]
    layers += [(f"stage{i + 1}", Stage(PreActBlock, 16 * self.widen * 2**i, n,
                                       1 if i == 0 else 2, name=f"stage{i + 1}_layer"))
               for i in range(3)]
    layers += [("features", GlobalPool(bn_relu=True, name="features_layer")),
               ("logits", linear_head(self.num_classes))]
    return run_stages(self, layers, x, train, start, stop)
