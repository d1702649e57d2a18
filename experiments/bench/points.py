"""Which intervention points the benchmark's LPA grid covers.

Stage outputs (``stem``, ``stage1`` ... ``logits``) always; where the model also names points
inside a stage (residual blocks, ``stage3.block1``), two of the last stage's block points by
default: the one whose F_up/F is closest to the published cost (F_up/F ≈ 0.09: +18 % at
T = 3) and the middle one.

>>> choose_default(("stem", "stage3", "features"), ("stage3.block0", "stage3.block1",
...                "stage3.block2"), {"stage3.block0": 0.2, "stage3.block1": 0.1,
...                "stage3.block2": 0.0, "stage3": 0.0})
('stem', 'stage3.block0', 'stage3.block1', 'stage3', 'features')
"""
from __future__ import annotations

import re

from experiments.bench.flops import PAPER_FRACTION
from lpa_jax.perturb.hooks import cut_staged


def stage_points(model) -> tuple[str, ...]:
  """The model's stage-level points (names without a dot), bottom to top."""
  return tuple(p for p in model.points if "." not in p)


def last_stage(model) -> str:
  """The last stage's output: the stage point just below pooling (``features``), else the
  last hidden point; above it only pooling and the head remain.

  >>> from lpa_jax.models import get_model
  >>> last_stage(get_model("resnet32", 10)), last_stage(get_model("mlp", 10))
  ('stage3', 'hidden2')
  """
  stages = stage_points(model)
  top = stages.index("features") if "features" in stages else len(stages) - 1
  return stages[max(top - 1, 0)]


def block_points(model, stage: str) -> tuple[str, ...]:
  """The points the model names inside ``stage`` (``stage3.block1`` ...), bottom to top."""
  listed = tuple(model.points) + tuple(getattr(model, "block_points", ()))
  return order(model, [p for p in dict.fromkeys(listed) if p.startswith(stage + ".")])


def order(model, points) -> tuple[str, ...]:
  """``points`` bottom to top: by stage, a stage's inner points (by their numbers) before it.

  >>> from lpa_jax.models import get_model
  >>> order(get_model("resnet32", 10), ["stage3", "stage2", "stage3.block4", "stage3.block1"])
  ('stage2', 'stage3.block1', 'stage3.block4', 'stage3')
  """
  stages = stage_points(model)

  def key(p):
    stage, _, inner = p.partition(".")
    return (stages.index(stage), 0 if inner else 1, [int(n) for n in re.findall(r"\d+", inner)])
  return tuple(sorted(dict.fromkeys(points), key=key))


def parse_points(model, arg: str) -> tuple[str, ...]:
  """The comma list ``arg`` checked against the model (any point it can be cut at), ordered.

  >>> from lpa_jax.models import get_model
  >>> parse_points(get_model("resnet32", 10), "stage3,stage2")
  ('stage2', 'stage3')
  """
  wanted = [p.strip() for p in arg.split(",") if p.strip()]
  stages = stage_points(model)
  for p in wanted:
    ok = p.partition(".")[0] in stages
    if ok:
      try:
        cut_staged(model, p)
      except ValueError:
        ok = False
    if not ok:
      inner = [b for s in stages for b in block_points(model, s)]
      raise ValueError(f"Unknown point {p!r} for this model; valid points: "
                       f"{', '.join(order(model, list(model.points) + inner))}")
  return order(model, wanted)


def choose_default(stages, blocks, frac: dict, target: float = PAPER_FRACTION):
  """Every stage point plus two of ``blocks`` (points inside the last stage), bottom to top:
  the block whose ``F_up/F`` (``frac``) is closest to ``target`` and the middle one.  Blocks
  no dearer than the stage output itself (its last block) are left out."""
  if not blocks:
    return tuple(stages)
  stage = blocks[0].partition(".")[0]
  inside = [b for b in blocks if frac[b] > frac.get(stage, 0.0) + 1e-9]
  picked = set()
  if inside:
    picked.add(min(inside, key=lambda b: abs(frac[b] - target)))
    rest = [b for b in inside if b not in picked]
    if rest:
      picked.add(rest[len(rest) // 2])
  by_stage = {s: [b for b in blocks if b in picked] if s == stage else [] for s in stages}
  return tuple(p for s in stages for p in by_stage[s] + [s])
