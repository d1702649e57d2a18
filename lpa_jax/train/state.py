"""The train state: everything a run needs to continue, checkpointed as one pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any      # mutable model collections, e.g. {'batch_stats': ...}
  opt_state: Any
  act_state: Any        # the activation method's state (LPA: class split and statistics)
  logit_state: Any      # the logit methods' states (LPL, LPG: class split and statistics)
  rng: jax.Array        # raw uint32 key; per-step keys are fold_in(rng, step)
