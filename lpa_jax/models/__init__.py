"""Staged networks with named intervention points, and a registry to build them by name."""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from lpa_jax.models.resnet import CifarResNet, PreActResNet18
from lpa_jax.models.small import MLP, SmallCNN
from lpa_jax.models.staged import (DTYPES, HEADS, check_point, compute_dtype,
                                   depth_below_logits, intervene, run_stages, stage_level)
from lpa_jax.models.wrn import WideResNet

#: The registered models by name, each a constructor taking ``num_classes`` (:func:`get_model`).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": functools.partial(CifarResNet, depth=20),
    "resnet32": functools.partial(CifarResNet, depth=32),
    "resnet56": functools.partial(CifarResNet, depth=56),
    "resnet110": functools.partial(CifarResNet, depth=110),
    "wrn16_8": functools.partial(WideResNet, depth=16, widen=8),
    "wrn28_10": functools.partial(WideResNet, depth=28, widen=10),
    "preact_resnet18": PreActResNet18,
    "cnn": SmallCNN,
    "mlp": MLP,
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a registered model, e.g. ``get_model("resnet32", num_classes=100)``.

  ``dtype`` (compute dtype, one of :data:`DTYPES`) may be given by name, as a config does:
  ``get_model("resnet32", 10, dtype="bfloat16")``; parameters stay float32 either way.

  >>> get_model("cnn", 10, widths=(8, 16, 32)).points
  ('stage1', 'stage2', 'stage3', 'features', 'logits')
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; registered models: {', '.join(MODELS)}")
  if "dtype" in kwargs:
    kwargs["dtype"] = compute_dtype(kwargs["dtype"], "model.kwargs.dtype")
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "DTYPES", "HEADS", "get_model", "check_point", "compute_dtype",
           "depth_below_logits", "intervene", "run_stages", "stage_level",
           "CifarResNet", "PreActResNet18", "WideResNet", "SmallCNN", "MLP"]
