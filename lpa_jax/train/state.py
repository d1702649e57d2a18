"""The train state: everything a run needs to continue, checkpointed as one pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax

from lpa_jax.perturb.classes import ClassStats


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any      # mutable model collections, e.g. {'batch_stats': ...}
  opt_state: Any
  act_state: Any        # activation-level perturbation state (e.g. LPA's class split)
  logit_state: Any      # logit-level perturbation state
  class_stats: ClassStats  # running per-class statistics of the current epoch
  rng: jax.Array        # raw uint32 key; per-step keys are fold_in(rng, step)
