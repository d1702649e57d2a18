"""Small networks for quick CPU runs: a 3-stage CNN and an MLP."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lpa_jax.models.staged import GlobalPool, make_head, run_stages


class ConvStage(nn.Module):
  """conv3x3-BN-ReLU, then 2x2 max-pool when ``pool``."""
  features: int
  pool: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x)
    return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class SmallCNN(nn.Module):
  """Three conv stages (widths ``widths``), global pooling, a ``linear`` or ``cosine`` head.

  Points: ``stage1, stage2, stage3, features, logits``.  ``dtype``: compute dtype (parameters
  stay float32, logits are float32).
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  head: str = "linear"
  dtype: Any = jnp.float32

  @property
  def points(self) -> tuple[str, ...]:
    return tuple(f"stage{i + 1}" for i in range(len(self.widths))) + ("features", "logits")

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    last = len(self.widths) - 1
    dt = self.dtype
    layers = [(f"stage{i + 1}", ConvStage(w, i < last, dt, name=f"stage{i + 1}_layer"))
              for i, w in enumerate(self.widths)]
    layers += [("features", GlobalPool(dtype=dt, name="features_layer")),
               ("logits", make_head(self.num_classes, self.head, self.dtype))]
    return run_stages(self, layers, x, train, start, stop)


class MLP(nn.Module):
  """Flatten, ``len(widths)`` ReLU layers, a ``linear`` or ``cosine`` head.

  Points: ``hidden1, ..., hiddenK, logits``.  ``dtype``: compute dtype (parameters stay
  float32, logits are float32).
  """
  num_classes: int = 10
  widths: Sequence[int] = (256, 256)
  head: str = "linear"
  dtype: Any = jnp.float32

  @property
  def points(self) -> tuple[str, ...]:
    return tuple(f"hidden{i + 1}" for i in range(len(self.widths))) + ("logits",)

  @nn.compact
  def __call__(self, x, train: bool = False, start: str | None = None, stop: str | None = None):
    def dense_relu(i, w):
      def fn(h, train):
        h = h.reshape(h.shape[0], -1) if i == 0 else h
        return nn.relu(nn.Dense(w, dtype=self.dtype, name=f"hidden{i + 1}_layer")(h))
      return fn
    layers = [(f"hidden{i + 1}", dense_relu(i, w)) for i, w in enumerate(self.widths)]
    layers += [("logits", make_head(self.num_classes, self.head, self.dtype))]
    return run_stages(self, layers, x, train, start, stop)
