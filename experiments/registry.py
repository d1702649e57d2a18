"""Builds perturbation methods by name from a config: one activation, one logit and one
gradient method, composable (e.g. ``activation=lpa, logit=lpl, gradient=sam``).

Each registry maps a name to an :class:`Entry`: ``build(cfg, ctx)``, where ``cfg`` is the
method's own config block (``config.perturb.<name>``, its defaults in
``experiments/configs/methods.py``) and ``ctx`` the run :class:`Context`
(the entry reads what the method's factory needs — class counts, schedule — off ``ctx`` and
passes it as hyper-parameters), with the settings at which the method would do nothing and
whether it splits the classes.  Adding a method touches its module, its defaults block and one
line here.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np
import optax

from lpa_jax.models.staged import depth_below_logits, stage_level
from lpa_jax.perturb import activation, classes, gradient, logit
from lpa_jax.perturb.adaptive import lpa_adaptive
from experiments import gradients
from lpa_jax.perturb.base import Perturbation, chain, check_finite_params, identity
from lpa_jax.perturb.hooks import Cut
from lpa_jax.perturb.lpa import lpa
from lpa_jax.perturb.place import place


class Context(NamedTuple):
  """Facts about the run that the config-driven registry needs to build and place methods.

  Method factories themselves take hyper-parameters only; the registry reads the number of
  classes, the class counts and the schedule from here, and cuts the model with ``cut_fn``.
  """
  num_classes: int
  class_counts: np.ndarray
  steps_per_epoch: int
  num_epochs: int
  cut_fn: Callable[[str], Cut]     # point name -> Cut
  points: tuple[str, ...]          # valid point names, bottom to top
  seed: int = 0                    # the run's seed (gradient noise draws from it)
  head: str = "linear"             # the model's classifier head ('cosine' for LDAM)
  clean_pass: bool = True          # random methods run a clean pass for statistics/diagnostics

  def depth(self, point: str) -> float:
    """``L − l`` of ``point`` in the run's staged model (LPA's radius factor ``β^(L−l)``)."""
    return depth_below_logits(self.points, point)


class Entry(NamedTuple):
  """A registered method: ``build(cfg, ctx)``; ``null(block)`` names the settings at which it
  would perturb nothing (``'rate=0'``) or returns ``None``; ``class_level``: it splits the
  classes (all class-level methods of a run share one split)."""
  build: Callable
  null: Callable | None = None
  class_level: bool = False


def logit_equivalent_point(points) -> str:
  """The last hidden point: above it only pooling and the linear head remain, so a class-level
  δ there is exactly a class-level logit shift in the span of the head's weights (SPEC §1)."""
  points = list(points)
  top = points.index("features") if "features" in points else len(points) - 1
  return points[max(top - 1, 0)]


def default_point(points) -> str:
  """The default perturbed point **(ours)**: the highest point whose ``f_up`` is non-linear.

  That is the point just below :func:`logit_equivalent_point` (and below its alias, the last
  block of the last stage): ``stage3.block{n-2}`` of a CIFAR ResNet (``f_up`` = one residual
  block, pooling and the head: the paper's "point inside the last stage", whose cost the
  benchmark reports), ``stage2`` of the small CNN, ``hidden{k-1}`` of the MLP.  At the
  logit-equivalent point LPA would only shift logits, which LPL already does; the evidence
  suites compare the two points.
  """
  points = list(points)
  last_hidden = logit_equivalent_point(points)
  i = points.index(last_hidden) - 1
  if i > 0 and points[i].startswith(last_hidden + "."):
    i -= 1  # the last block of the last stage is the same activation as the stage output
  return points[max(i, 0)]


def resolve_point(point: str, ctx: Context) -> str:
  return default_point(ctx.points) if point in ("auto", "default", None) else point


def describe_activation(pcfg, points) -> tuple[str, str | None]:
  """``(method, point)`` of a run's activation method, for messages (point ``None`` when the
  method has none or picks among several)."""
  name = pcfg.activation
  block = getattr(pcfg, name, None) if name != "none" else None
  point = block.get("point", None) if block is not None else None
  if point in ("auto", "default"):
    point = default_point(points)
  return name, point


def default_mixup_points(points) -> tuple[str, ...]:
  """Manifold Mixup's layer set: the input and up to two stage outputs below the last hidden
  stage (the paper's {0, 1, 2} for ResNets; a stem is skipped)."""
  stages = list(stage_level(points))
  below = stages[:stages.index(logit_equivalent_point(stages))]
  return ("input",) + tuple(p for p in below if p != "stem")[:2]


def _lpa_kwargs(cfg, ctx: Context) -> dict:
  return dict(num_classes=ctx.num_classes, class_counts=ctx.class_counts, split=cfg.split,
              eps=cfg.eps, delta_eps=cfg.delta_eps, beta=cfg.beta, steps=cfg.steps,
              varied=cfg.varied, normalize=cfg.normalize, lowrank=cfg.lowrank or None,
              radius_mode=cfg.radius_mode,
              num_head=classes.run_num_head(cfg.num_head, ctx.num_classes), signs=cfg.signs,
              # loss mode's fields; .get: a block saved before they existed has none
              **{k: cfg.get(k) for k in ("target", "target_delta", "eta", "eps_min", "eps_max")})


def _shape_of(ctx: Context, points):
  """Per-example activation shapes at ``points``, by abstract evaluation (no run-time FLOPs)."""
  def shape_of(variables, x, train):
    return {p: jax.eval_shape(lambda p=p: ctx.cut_fn(p).lower(variables, x, train)[0]).shape[1:]
            for p in points}
  return shape_of


def _lpa(cfg, ctx: Context) -> Perturbation:
  point = resolve_point(cfg.point, ctx)
  cut = ctx.cut_fn(point)
  extra = [p for p in cfg.extra_points if p != point]
  for p in extra:
    above = ctx.points[ctx.points.index(point) + 1:]
    if p not in above:
      raise ValueError(f"lpa.extra_points: {p!r} is not a point above {point!r}; points above "
                       f"it are: {', '.join(above)}")
  method = lpa(depth=ctx.depth(point), extra_points={p: ctx.depth(p) for p in extra},
               **_lpa_kwargs(cfg, ctx))
  return place(method, cut, _shape_of(ctx, extra) if extra else None)


def _lpa_adaptive(cfg, ctx: Context) -> Perturbation:
  """Adaptive-layer LPA; its candidates default to every stage-level point below the logits."""
  candidates = tuple(cfg.candidates) or stage_level(ctx.points)[:-1]
  for p in candidates:
    if p not in ctx.points:
      raise ValueError(f"Unknown candidate point {p!r}; valid points are: {', '.join(ctx.points)}")
  cuts = [ctx.cut_fn(p) for p in candidates]
  return lpa_adaptive([(lpa(depth=ctx.depth(c.point), **_lpa_kwargs(cfg, ctx)), c) for c in cuts],
                      cfg.every, select=cfg.select)


def _at_point(factory, *fields, depth=False):
  """A registry entry for a single-point method taking ``fields`` from its config block."""
  def make(cfg, ctx: Context) -> Perturbation:
    cut = ctx.cut_fn(resolve_point(cfg.point, ctx))
    kw = {f: cfg[f] for f in fields}
    return place(factory(**kw, **({"depth": ctx.depth(cut.point)} if depth else {})), cut,
                 clean_pass=ctx.clean_pass)
  return make


def _mixup(cfg, ctx: Context) -> Perturbation:
  points = tuple(cfg.points) or default_mixup_points(ctx.points)
  top = ctx.cut_fn(ctx.points[-1])
  cuts = [activation.input_cut(top) if p == "input" else ctx.cut_fn(p) for p in points]
  return activation.manifold_mixup(cuts, alpha=cfg.alpha, select=cfg.select,
                                   clean_pass=ctx.clean_pass)


def _class_level(factory, *fields):
  def make(cfg, ctx: Context):
    return factory(num_classes=ctx.num_classes, class_counts=ctx.class_counts, split=cfg.split,
                   num_head=cfg.num_head, signs=cfg.signs, **{f: cfg[f] for f in fields})
  return make


class GradientPlacement(NamedTuple):
  """Where a run's config puts its gradient-level method (the methods themselves are optax
  transforms, or LPG's logit method): ``pre`` on the raw gradients, before the optimiser;
  ``post`` on the momentum output; ``wrap(tx)`` around the whole optimiser (SAM); ``logit``
  after the logit methods (LPG's custom backward)."""
  pre: optax.GradientTransformation | None = None
  post: optax.GradientTransformation | None = None
  wrap: Callable | None = None
  logit: Perturbation | None = None


GAF_WHERE = ("raw", "momentum")


def _gaf(cfg, ctx: Context) -> GradientPlacement:
  if cfg.where not in GAF_WHERE:
    raise ValueError(f"gaf.where must be one of {GAF_WHERE}, got {cfg.where!r}")
  tx = gradient.gaf(cfg.alpha, cfg.beta, cfg.form, unit_slope=cfg.get("unit_slope", False))
  return GradientPlacement(pre=tx) if cfg.where == "raw" else GradientPlacement(post=tx)


def _zero(*fields):
  """A rule: ``'f=0 and g=0'`` when every one of ``fields`` is zero, else None."""
  return lambda b: (" and ".join(f"{f}=0" for f in fields)
                    if all(float(b[f]) == 0 for f in fields) else None)


def _lpl_null(b):
  if float(b["alpha"]) == 0:
    return "alpha=0"
  return "steps=0 (fixed K)" if not b["varied"] and int(b["steps"]) == 0 else None


def _radius_null(b):
  """LPA's and LPG's radius ``ε + Δε·|τ − q_c|`` (varied) or ``ε`` (fixed) is 0 everywhere."""
  if b["varied"]:
    return _zero("eps", "delta_eps")(b)
  return "eps=0 (fixed radius)" if float(b["eps"]) == 0 else None


# The registries.  A selected method whose strength is zero would run as plain training under
# its name: the factories accept zero (identity at zero radius is a property the tests use); a
# run does not (``null``).
ACTIVATION: dict[str, Entry] = {
    "none": Entry(lambda cfg, ctx: place(identity(), ctx.cut_fn(ctx.points[-1]),
                                         diagnostics=False)),
    "lpa": Entry(_lpa, _radius_null, class_level=True),
    "lpa_adaptive": Entry(_lpa_adaptive, _radius_null, class_level=True),
    "dropout": Entry(_at_point(activation.dropout, "rate"), _zero("rate")),
    "noise": Entry(_at_point(activation.noise, "sigma", "mode"), _zero("sigma")),
    "manifold_mixup": Entry(_mixup),
    "adversarial": Entry(_at_point(activation.adversarial, "eps", "beta", "method", "steps",
                                   depth=True), _zero("eps")),
    "deep_augmentation": Entry(_at_point(activation.deep_augmentation, "mode", "rate",
                                         "pca_frac")),
}
LOGIT: dict[str, Entry] = {
    "none": Entry(lambda cfg, ctx: identity()),
    "lpl": Entry(_class_level(logit.lpl, "alpha", "steps", "varied", "steps_min", "steps_max",
                              "normalize"), _lpl_null, class_level=True),
    "logit_adjust": Entry(lambda cfg, ctx: logit.logit_adjust(ctx.class_counts, tau=cfg.tau,
                                                              mode=cfg.mode), _zero("tau")),
    "ldam": Entry(lambda cfg, ctx: logit.ldam(
        ctx.class_counts, max_margin=cfg.max_margin, scale=cfg.scale, drw=cfg.drw,
        drw_beta=cfg.drw_beta, num_epochs=ctx.num_epochs, steps_per_epoch=ctx.steps_per_epoch,
        drw_fraction=cfg.drw_fraction, batch_normalize=cfg.batch_normalize,
        normalized_head=ctx.head == "cosine")),
}
GRADIENT: dict[str, Entry] = {
    "none": Entry(lambda cfg, ctx: GradientPlacement()),
    "lpg": Entry(lambda cfg, ctx: GradientPlacement(
        logit=_class_level(gradient.lpg, "eps", "delta_eps", "varied")(cfg, ctx)), _radius_null,
        class_level=True),
    "gaf": Entry(_gaf),
    "sam": Entry(lambda cfg, ctx: GradientPlacement(wrap=lambda tx: gradients.sam(tx, cfg.rho)),
                 _zero("rho")),
    "clip": Entry(lambda cfg, ctx: GradientPlacement(pre=gradients.clip(cfg.max_norm))),
    "grad_noise": Entry(lambda cfg, ctx: GradientPlacement(pre=gradients.grad_noise(
        cfg.eta, cfg.gamma, seed=_run_seed(ctx.seed, cfg.seed))), _zero("eta")),
}
TABLES = {"activation": ACTIVATION, "logit": LOGIT, "gradient": GRADIENT}


def entry(name: str, level: str | None = None) -> Entry:
  """The registered method ``name`` (at ``level``, or at any level); a plain ``build`` function
  put in a table counts as an :class:`Entry` with no null settings."""
  tables = [TABLES[level]] if level else list(TABLES.values())
  for table in tables:
    if name in table:
      e = table[name]
      return e if isinstance(e, Entry) else Entry(e)
  known = ", ".join(n for t in tables for n in t)
  raise ValueError(f"Unknown {level or ''} perturbation {name!r}; registered: {known}".replace(
      "Unknown  ", "Unknown "))


def _lookup(kind: str, name: str):
  return entry(name, kind).build


def check_block(name: str, block) -> None:
  """Rejects NaN / inf numeric fields of a method's config block, naming ``name.field``."""
  fields = block.to_dict() if hasattr(block, "to_dict") else dict(block)
  for field, value in fields.items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      check_finite_params(name, **{field: value})


def _block(pcfg, name):
  """The method's config block (``None`` for ``none``), checked by :func:`check_block`."""
  block = getattr(pcfg, name, None) if name != "none" else None
  if block is not None:
    check_block(name, block)
  return block


def selected(pcfg) -> list[tuple[str, str]]:
  """``[(level, name), ...]`` of the methods a ``config.perturb`` selects (several logit
  methods allowed, in order), each checked to be registered."""
  out = [("activation", pcfg.activation)]
  out += [("logit", n) for n in logit_names(pcfg.logit)]
  out.append(("gradient", pcfg.gradient))
  for level, name in out:
    entry(name, level)
  chosen = [(lvl, n) for lvl, n in out if n != "none"]
  check_one_split(pcfg, [n for _, n in chosen])
  for _, n in chosen:
    check_not_null(n, getattr(pcfg, n, None))
  return chosen


def check_not_null(name: str, block) -> None:
  """Refuses a selected method whose hyper-parameters make it do nothing (``lpl.alpha=0``,
  ``logit_adjust.tau=0``, ``sam.rho=0``, a zero radius, rate or noise scale): its run would be
  plain training reported under the method's name.

  >>> check_not_null("logit_adjust", {"tau": 1.0, "mode": "loss"})   # perturbs: no error
  """
  rule = entry(name).null
  reason = rule(block) if rule is not None and block is not None else None
  if reason:
    raise ValueError(f"{name} with {reason} perturbs nothing: the run would be plain training "
                     f"under {name}'s name; set a non-zero value, or select none at its level")


SPLIT_FIELDS = ("split", "num_head", "signs")


def check_one_split(pcfg, names) -> None:
  """All class-level methods of a run share one class split (rule, head size, signs)."""
  blocks = [(n, pcfg[n]) for n in names if entry(n).class_level]
  for n, block in blocks[1:]:
    for f in SPLIT_FIELDS:
      a, b = blocks[0][1][f], block[f]
      if (tuple(a) if isinstance(a, (list, tuple)) else a) != \
         (tuple(b) if isinstance(b, (list, tuple)) else b):
        raise ValueError(
            f"One class split per run: {blocks[0][0]}.{f}={a!r} but {n}.{f}={b!r}; set "
            f"--config.perturb.{n}.{f} to the same value")


def _run_seed(run_seed: int, offset: int) -> int:
  """Gradient noise draws from the run's seed (offset by the block's ``seed``), so every seed
  of a sweep gets its own noise."""
  return int(run_seed) * 1_000_003 + int(offset)


def needs_class_statistics(pcfg) -> bool:
  """Whether a logit or gradient method of the run re-splits classes from the epoch's
  statistics (LPL / LPG with a balanced split), which must come from clean logits."""
  return any(level != "activation" and entry(name, level).class_level
             and pcfg[name].split in classes.REFRESHED for level, name in selected(pcfg))


def make_activation(pcfg, ctx: Context) -> Perturbation:
  """The activation method, placed.  Random methods (dropout, noise, deep augmentation,
  Manifold Mixup) skip their extra clean pass unless :func:`needs_class_statistics`."""
  selected(pcfg)
  ctx = ctx._replace(clean_pass=needs_class_statistics(pcfg))
  name = pcfg.activation
  return _lookup("activation", name)(_block(pcfg, name), ctx)


def logit_names(spec) -> list[str]:
  """``'logit_adjust,lpl'`` (or a sequence) -> ``['logit_adjust', 'lpl']``; ``'none'`` -> []."""
  names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
  names = [n for n in names if n and n != "none"]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"perturb.logit names {dup} more than once: {spec!r}")
  return names


def make_logit(pcfg, ctx: Context) -> Perturbation:
  """One logit method, or several :func:`~lpa_jax.perturb.base.chain` ed in the order given
  (``logit_adjust,lpl``); ``none`` is :func:`~lpa_jax.perturb.base.identity`."""
  return chain(*(_lookup("logit", name)(_block(pcfg, name), ctx)
                 for name in logit_names(pcfg.logit)))


def make_gradient(pcfg, ctx: Context) -> GradientPlacement:
  name = pcfg.gradient
  return _lookup("gradient", name)(_block(pcfg, name), ctx)
