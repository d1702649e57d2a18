"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56/110, and PreAct ResNet-18.

Points: ``stem, stage1, stage2, stage3[, stage4], features, logits``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lpa_jax.models.staged import GlobalPool, linear_head, run_stages

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
  """``num_blocks`` residual blocks; the first one may downsample."""
  block: type[nn.Module]
  features: int
  num_blocks: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_blocks):
      x = self.block(self.features, self.stride if i == 0 else 1, name=f"block{i}")(x, train)
    return x


class Stem(nn.Module):
  features: int
  bn_relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=conv_init)(x)
    return nn.relu(_bn(train)(x)) if self.bn_relu else x


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs: three stages of widths 16, 32, 64."""
  depth: int = 32
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)

  @property
  def points(self) -> tuple[str, ...]:
    return ("stem", "stage1", "stage2", "stage3", "features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got depth={self.depth}")
    n = (self.depth - 2) // 6
    w = self.widths
    layers = [("stem", Stem(w[0], name="stem_layer"))]
    layers += [(f"stage{i + 1}", Stage(BasicBlock, w[i], n, 1 if i == 0 else 2,
                                       name=f"stage{i + 1}_layer")) for i in range(3)]
    layers += [("features", GlobalPool(name="features_layer")),
               ("logits", linear_head(self.num_classes))]
    return run_stages(self, layers, x, train, start, stop)


class PreActResNet18(nn.Module):
  """PreAct ResNet-18 (He et al. 2016b), CIFAR variant: four stages of two blocks."""
  num_classes: int = 10

  @property
  def points(self) -> tuple[str, ...]:
    return ("stem", "stage1", "stage2", "stage3", "stage4", "features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    layers = [("stem", Stem(64, bn_relu=False, name="stem_layer"))]
    layers += [(f"stage{i + 1}", Stage(PreActBlock, 64 * 2**i, 2, 1 if i == 0 else 2,
                                       name=f"stage{i + 1}_layer")) for i in range(4)]
    layers += [("features", GlobalPool(bn_relu=True, name="features_layer")),
               ("logits", linear_head(self.num_classes))]
    return run_stages(self, layers, x, train, start, stop)
