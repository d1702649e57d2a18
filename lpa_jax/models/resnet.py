"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56/110, and PreAct ResNet-18.

Points, bottom to top: ``stem``, then per stage ``stageS.block0 … stageS.block{n-1}, stageS``
(the stage output is its last block's output), then ``features, logits``:

>>> get_model("resnet20", 10).points[:5]
('stem', 'stage1.block0', 'stage1.block1', 'stage1.block2', 'stage1')
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from lpa_jax.models.staged import GlobalPool, Layer, block_points, make_head, run_stages

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, s, name: nn.Conv(f, (3, 3), (s, s), padding=1, use_bias=False,
                                      kernel_init=conv_init, name=name)
    y = nn.relu(_bn(train)(conv(self.features, self.stride, "conv1")(x)))
    y = _bn(train)(conv(self.features, 1, "conv2")(y))
    if x.shape[-1] != self.features or self.stride != 1:
      x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False,
                  kernel_init=conv_init, name="shortcut")(x)
      x = _bn(train, "shortcut_bn")(x)
    return nn.relu(x + y)


class PreActBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    out = nn.relu(_bn(train)(x))
    shortcut = x
    if x.shape[-1] != self.features or self.stride != 1:
      shortcut = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False,
                         kernel_init=conv_init, name="shortcut")(out)
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding=1, use_bias=False,
                kernel_init=conv_init)(out)
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False,
                kernel_init=conv_init)(nn.relu(_bn(train)(y)))
    return y + shortcut


class Stage(nn.Module):
  """``num_blocks`` residual blocks; the first one may downsample.

  ``blocks=(lo, hi)`` runs blocks ``lo … hi-1`` only, so a parent can name (and cut at) every
  block output while the parameters stay under ``stageS_layer/block{j}``.
  """
  block: type[nn.Module]
  features: int
  num_blocks: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool, blocks: tuple[int, int] | None = None):
    lo, hi = blocks if blocks is not None else (0, self.num_blocks)
    for i in range(lo, hi):
      x = self.block(self.features, self.stride if i == 0 else 1, name=f"block{i}")(x, train)
    return x


def stage_layers(name: str, stage: Stage) -> list[Layer]:
  """``stage`` as one layer per block (``name.block{j}``), then ``name`` itself: an identity on
  the last block's output, so the stage point keeps its meaning and its own perturbation."""
  layers = [(f"{name}.block{j}", lambda h, train, j=j: stage(h, train, (j, j + 1)))
            for j in range(stage.num_blocks)]
  return layers + [(name, lambda h, train: h)]


class Stem(nn.Module):
  features: int
  bn_relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=conv_init)(x)
    return nn.relu(_bn(train)(x)) if self.bn_relu else x


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs: three stages of ``n`` blocks, widths 16, 32, 64.

  ``head``: ``linear`` (default) or ``cosine`` (normalised classifier, for LDAM).
  """
  depth: int = 32
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  head: str = "linear"

  @property
  def num_blocks(self) -> int:
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got depth={self.depth}")
    return (self.depth - 2) // 6

  @property
  def points(self) -> tuple[str, ...]:
    stages = sum((block_points(f"stage{i + 1}", self.num_blocks) for i in range(3)), ())
    return ("stem",) + stages + ("features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    n, w = self.num_blocks, self.widths
    layers = [("stem", Stem(w[0], name="stem_layer"))]
    for i in range(3):
      stage = Stage(BasicBlock, w[i], n, 1 if i == 0 else 2, name=f"stage{i + 1}_layer")
      layers += stage_layers(f"stage{i + 1}", stage)
    layers += [("features", GlobalPool(name="features_layer")),
               ("logits", make_head(self.num_classes, self.head))]
    return run_stages(self, layers, x, train, start, stop)


class PreActResNet18(nn.Module):
  """PreAct ResNet-18 (He et al. 2016b), CIFAR variant: four stages of two blocks."""
  num_classes: int = 10
  head: str = "linear"

  @property
  def points(self) -> tuple[str, ...]:
    stages = sum((block_points(f"stage{i + 1}", 2) for i in range(4)), ())
    return ("stem",) + stages + ("features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    layers = [("stem", Stem(64, bn_relu=False, name="stem_layer"))]
    for i in range(4):
      stage = Stage(PreActBlock, 64 * 2**i, 2, 1 if i == 0 else 2, name=f"stage{i + 1}_layer")
      layers += stage_layers(f"stage{i + 1}", stage)
    layers += [("features", GlobalPool(bn_relu=True, name="features_layer")),
               ("logits", make_head(self.num_classes, self.head))]
    return run_stages(self, layers, x, train, start, stop)
