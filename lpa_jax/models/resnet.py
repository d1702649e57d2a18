"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56/110, and PreAct ResNet-18.

Points, bottom to top: ``stem``, then per stage ``stageS.block0 … stageS.block{n-1}, stageS``
(the stage output is its last block's output), then ``features, logits``:

>>> from lpa_jax.models import get_model
>>> get_model("resnet20", 10).points[:5]
('stem', 'stage1.block0', 'stage1.block1', 'stage1.block2', 'stage1')
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lpa_jax.models.staged import (GlobalPool, Layer, block_points, make_head, run_stages,
                                   staged_points)

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, dtype, name=None):
  # Flax keeps the running statistics (and scale, bias) float32 for any compute dtype.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype, name=None):
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=kernel // 2,
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    f, dt = self.features, self.dtype
    y = nn.relu(_bn(train, dt)(_conv(f, 3, self.stride, dt, "conv1")(x)))
    y = _bn(train, dt)(_conv(f, 3, 1, dt, "conv2")(y))
    if x.shape[-1] != f or self.stride != 1:
      x = _bn(train, dt, "shortcut_bn")(_conv(f, 1, self.stride, dt, "shortcut")(x))
    return nn.relu(x + y)


class PreActBlock(nn.Module):
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    f, dt = self.features, self.dtype
    out = nn.relu(_bn(train, dt)(x))
    shortcut = x
    if x.shape[-1] != f or self.stride != 1:
      shortcut = _conv(f, 1, self.stride, dt, "shortcut")(out)
    y = _conv(f, 3, self.stride, dt)(out)
    y = _conv(f, 3, 1, dt)(nn.relu(_bn(train, dt)(y)))
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
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, blocks: tuple[int, int] | None = None):
    lo, hi = blocks if blocks is not None else (0, self.num_blocks)
    for i in range(lo, hi):
      x = self.block(self.features, self.stride if i == 0 else 1, self.dtype,
                     name=f"block{i}")(x, train)
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
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = _conv(self.features, 3, 1, self.dtype)(x)
    return nn.relu(_bn(train, self.dtype)(x)) if self.bn_relu else x


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs: three stages of ``n`` blocks, widths 16, 32, 64.

  ``head``: ``linear`` (default) or ``cosine`` (normalised classifier, for LDAM).
  ``dtype``: compute dtype (parameters stay float32, logits are float32; see
  :mod:`lpa_jax.models.staged`).
  """
  depth: int = 32
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  head: str = "linear"
  dtype: Any = jnp.float32

  @property
  def num_blocks(self) -> int:
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got depth={self.depth}")
    return (self.depth - 2) // 6

  @property
  def points(self) -> tuple[str, ...]:
    return staged_points(3, self.num_blocks)

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    n, w, dt = self.num_blocks, self.widths, self.dtype
    layers = [("stem", Stem(w[0], dtype=dt, name="stem_layer"))]
    for i in range(3):
      stage = Stage(BasicBlock, w[i], n, 1 if i == 0 else 2, dt, name=f"stage{i + 1}_layer")
      layers += stage_layers(f"stage{i + 1}", stage)
    layers += [("features", GlobalPool(dtype=dt, name="features_layer")),
               ("logits", make_head(self.num_classes, self.head, dt))]
    return run_stages(self, layers, x, train, start, stop)


class PreActResNet18(nn.Module):
  """PreAct ResNet-18 (He et al. 2016b), CIFAR variant: four stages of two blocks.

  ``head`` and ``dtype`` as for :class:`CifarResNet`.
  """
  num_classes: int = 10
  head: str = "linear"
  dtype: Any = jnp.float32

  @property
  def points(self) -> tuple[str, ...]:
    stages = sum((block_points(f"stage{i + 1}", 2) for i in range(4)), ())
    return ("stem",) + stages + ("features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    dt = self.dtype
    layers = [("stem", Stem(64, bn_relu=False, dtype=dt, name="stem_layer"))]
    for i in range(4):
      stage = Stage(PreActBlock, 64 * 2**i, 2, 1 if i == 0 else 2, dt,
                    name=f"stage{i + 1}_layer")
      layers += stage_layers(f"stage{i + 1}", stage)
    layers += [("features", GlobalPool(bn_relu=True, dtype=dt, name="features_layer")),
               ("logits", make_head(self.num_classes, self.head, dt))]
    return run_stages(self, layers, x, train, start, stop)
