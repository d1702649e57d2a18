"""Cut models you did not write: any Flax Linen model by module path, any NNX model by attribute.

Both constructors return a :class:`~lpa_jax.perturb.hooks.Cut`, so LPA and every other method
work on these models unchanged::

    cut = cut_linen(model, "encoder/block2")            # Linen, via nn.intercept_methods
    apply_fn, variables = nnx_functional(nnx_model)      # NNX -> pure function + variables dict
    cut = cut_nnx(nnx_model, "layers/3")                 # NNX, by swapping the submodule

How the layers below the point are kept out of ``upper``: ``upper`` runs the whole model on a
zero placeholder input, and the target submodule returns ``act`` without running.  Everything
that only fed the target is then dead code, which jit removes (``jax.jit(...).lower().compile()
.cost_analysis()`` shows it; see ``tests/test_compose.py``).  Likewise ``lower`` runs the
model to the end and the layers above the point are dead.  Outside jit they would run, so jit
the step (the library always does); what remains is trace/compile time, as every half traces
the whole model.  The point must *separate* input from output: if a skip connection bypasses
the target, ``upper`` would see the placeholder there, and lower+upper would differ from the
model's own forward: compare the two once when adopting a new model (as
``tests/test_compose.py`` does).

Train-mode BatchNorm state (the dead-code subtlety): a BatchNorm below the point also runs on
the placeholder in ``upper`` and would return statistics of zeros, which are *not* dead if
returned.  So each half returns the full mutable collections, but only the entries it
owns are new: ``lower`` owns the variables written before the target was called plus the
target's own subtree; ``upper`` owns the rest, and passes the others through from the
variables it was given.  ``{**variables, **lower_state}`` fed to ``upper`` therefore yields
state in which every BatchNorm is updated exactly once, from the real data, and the
placeholder's statistics are dead.  Cost: nothing at run time; one flatten of the collection
at trace time.  A module that writes state *both* before and after the target (weight sharing
across the point) keeps only the ``lower`` update.

The placeholder's shape is the per-example input shape of the last ``lower`` call (or
``input_shape=``), so call ``lower`` (or ``jax.eval_shape`` it) before ``upper``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from lpa_jax.perturb.hooks import Cut

PathLike = str | Sequence[str | int]
NNX_OTHER = "nnx_state"  # non-param, non-BatchStat NNX variables (e.g. dropout RNG counters)


def _parse_path(path: PathLike) -> tuple:
  parts = tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)
  if not parts:
    raise ValueError("An empty path names the whole model; cut at one of its submodules")
  return tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in parts)


def _fmt(path) -> str:
  return "/".join(map(str, path))


def _unknown_path(path, valid) -> ValueError:
  listing = ", ".join(sorted({_fmt(p) for p in valid if p}))
  return ValueError(f"Unknown module path {_fmt(path)!r}; valid module paths are: {listing}")


def _own(new: dict, old: dict, owned: Callable[[tuple], bool]) -> dict:
  """Leaves whose path is ``owned`` come from ``new``, the others from ``old`` (pass-through)."""
  fn, fo = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
  return traverse_util.unflatten_dict({k: (v if owned(k) or k not in fo else fo[k])
                                       for k, v in fn.items()})


class _Shape:
  """Per-example input shape/dtype for ``upper``'s placeholder, learned from ``lower``."""

  def __init__(self, input_shape, dtype=jnp.float32):
    self.shape, self.dtype = (tuple(input_shape) if input_shape else None), dtype

  def see(self, x):
    self.shape, self.dtype = tuple(x.shape[1:]), x.dtype

  def placeholder(self, act):
    if self.shape is None:
      raise ValueError("upper needs the input shape: call cut.lower (or jax.eval_shape it) "
                       "once first, or pass input_shape= to the cut constructor")
    return jnp.zeros((jax.tree.leaves(act)[0].shape[0],) + self.shape, self.dtype)


def _no_extra(extra, point):
  if extra:
    raise ValueError(f"extra points {list(extra)} above {point!r} are supported for lpa_jax's "
                     "staged models only; cut a foreign model at one point")


# --------------------------------------------------------------------------------------- Linen


def cut_linen(model: nn.Module, path: PathLike, depth: int = 1,
              method: Callable | str | None = None, train_kw: str | None = "train",
              input_shape: Sequence[int] | None = None, target_method: str = "__call__",
              mutable: Sequence[str] = ("batch_stats",)) -> Cut:
  """Cuts any Linen model at the output of the submodule at ``path``, without editing it.

  Args:
    model: the (unbound) Linen module; ``model.apply(variables, x, **{train_kw: train})``
      must be its forward pass (``method`` picks another method).
    path: module path, e.g. ``"encoder/block2"`` or ``("encoder", "block2")``; names are
      Linen's (explicit ``name=`` or automatic ``Dense_0``).
    depth: ``L - l`` for the radius factor ``β^(L−l)`` (stages between the point and logits).
    train_kw: keyword the model takes for training mode (``None`` if it takes none).
    input_shape: per-example input shape, if ``upper`` is called before any ``lower``.
    target_method: the target's method whose output is the activation.
    mutable: collections a training pass updates.

  >>> cut = cut_linen(TheirResNet(), "layer3")
  >>> act, st = cut.lower(variables, x, True)
  >>> logits, st2 = cut.upper({**variables, **st}, act, True)
  """
  target = _parse_path(path)
  shape = _Shape(input_shape)

  def run(variables, x, train, act=None):
    mut = [c for c in mutable if c in variables] if train else False
    before = traverse_util.flatten_dict({c: variables[c] for c in mut or ()})
    seen, hits, written = [], [], set()

    def interceptor(next_fun, args, kwargs, ctx):
      path_ = tuple(ctx.module.path)
      seen.append(path_)
      if path_ != target or ctx.method_name != target_method:
        return next_fun(*args, **kwargs)
      if hits:
        raise ValueError(f"Module {_fmt(target)!r} is called more than once; cut at a module "
                         "called once per forward pass")
      root = ctx.module
      while isinstance(root.parent, nn.Module):
        root = root.parent
      now = traverse_util.flatten_dict({c: root.variables.get(c, {}) for c in mut or ()})
      # Identity, not value: a BatchNorm that already ran holds a new array object.
      written.update(k for k, v in now.items() if v is not before.get(k))
      out = next_fun(*args, **kwargs) if act is None else act
      hits.append(out)
      return out

    kw = {train_kw: train} if train_kw else {}
    with nn.intercept_methods(interceptor):
      out = model.apply(variables, x, method=method, mutable=mut, **kw)
    if not hits:
      raise _unknown_path(target, seen)
    logits, state = out if mut else (out, {})
    below = lambda k: k in written or k[1:1 + len(target)] == target
    return logits, hits[0], dict(state), below

  def lower(variables, x, train):
    shape.see(x)
    _, act, state, below = run(variables, x, train)
    return act, _own(state, {c: variables[c] for c in state}, below)

  def upper(variables, act, train, extra=None):
    _no_extra(extra, _fmt(target))
    logits, _, state, below = run(variables, shape.placeholder(act), train, act)
    return logits, _own(state, {c: variables[c] for c in state}, lambda k: not below(k))

  return Cut(lower, upper, _fmt(target), depth, tuple(mutable))


# ----------------------------------------------------------------------------------------- NNX


def _split(model: nnx.Module):
  graphdef, params, stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  variables = {"params": params}
  if jax.tree.leaves(stats):
    variables["batch_stats"] = stats
  if jax.tree.leaves(other):
    variables[NNX_OTHER] = other
  return graphdef, variables


def _merge(graphdef, variables: dict, train: bool) -> nnx.Module:
  # Fresh Variable objects (tree.map rebuilds them): merge must not mutate the caller's state.
  states = [jax.tree.map(lambda v: v, variables.get(c, nnx.State({})))
            for c in ("params", "batch_stats", NNX_OTHER)]
  model = nnx.merge(graphdef, *states)
  model.train() if train else model.eval()
  return model


def _module_paths(model: nnx.Module) -> list[tuple]:
  return [tuple(p) for p, _ in nnx.iter_modules(model)]


def _locate(model: nnx.Module, target: tuple):
  parent = model
  for part in target[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  return parent, target[-1]


def _get(parent, key):
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value):
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _state_vars(model: nnx.Module) -> dict:
  return {tuple(p): v for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)}


def _new_state(model: nnx.Module, variables: dict) -> dict:
  _, _, stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return {c: s for c, s in (("batch_stats", stats), (NNX_OTHER, other)) if c in variables}


def nnx_functional(model: nnx.Module) -> tuple[Callable, dict]:
  """Turns an NNX model into ``apply_fn(variables, x, train) -> (out, new_state)`` and a
  Linen-style ``variables`` dict (``params``, ``batch_stats`` and any other state as
  ``nnx.State`` s), so the train step can differentiate ``variables['params']``.

  The model is split once here and merged *inside* each traced call, which avoids NNX's
  ``TraceContextError`` under ``jax.grad`` / ``lax.fori_loop``.

  >>> apply_fn, variables = nnx_functional(model)
  >>> logits, state = jax.jit(apply_fn, static_argnums=2)(variables, x, True)
  """
  graphdef, variables = _split(model)

  def apply_fn(variables, x, train=False):
    m = _merge(graphdef, variables, train)
    out = m(x)
    return out, (_new_state(m, variables) if train else {})

  return apply_fn, variables


def cut_nnx(model: nnx.Module | nnx.GraphDef, path: PathLike, depth: int = 1,
            input_shape: Sequence[int] | None = None) -> Cut:
  """Cuts any NNX model at the output of the submodule at attribute path ``path``.

  Inside each traced call the model is merged from ``variables`` and the target is swapped
  for a stand-in that records (``lower``) or replaces (``upper``) its output, then put back
  before the new state is split off.  ``variables`` come from :func:`nnx_functional`.

  NNX's own ``Module.perturb`` / ``nnx.capture`` need a ``self.perturb`` call written into
  the model, and still run the layers below it, so they cannot cut a model you did not write.

  >>> apply_fn, variables = nnx_functional(model)
  >>> cut = cut_nnx(model, "blocks/1")
  >>> logits, st = full_apply(cut, variables, x, True)
  """
  target = _parse_path(path)
  if isinstance(model, nnx.Module):
    if target not in _module_paths(model):
      raise _unknown_path(target, _module_paths(model))
    graphdef, _ = _split(model)
  else:
    graphdef = model
  shape = _Shape(input_shape)

  def run(variables, x, train, act=None):
    m = _merge(graphdef, variables, train)
    if target not in _module_paths(m):
      raise _unknown_path(target, _module_paths(m))
    parent, key = _locate(m, target)
    orig = _get(parent, key)
    svars = _state_vars(m)
    start = {k: v.get_raw_value() for k, v in svars.items()}
    hits, written = [], set()

    def stand_in(*args, **kwargs):
      if hits:
        raise ValueError(f"Submodule {_fmt(target)!r} is called more than once; cut at a "
                         "submodule called once per forward pass")
      written.update(k for k, v in svars.items() if v.get_raw_value() is not start[k])
      hits.append(orig(*args, **kwargs) if act is None else act)
      return hits[-1]

    _set(parent, key, stand_in)
    try:
      out = m(x)
    finally:
      _set(parent, key, orig)
    if not hits:
      raise ValueError(f"Submodule {_fmt(target)!r} was never called by the forward pass")
    below = lambda k: k in written or k[:len(target)] == target
    return out, hits[0], m, svars, start, below

  def finish(m, variables, svars, start, owned):
    for k, v in svars.items():
      if not owned(k):  # pass through: the computed update becomes dead code
        v.set_raw_value(start[k])
    return _new_state(m, variables)

  def lower(variables, x, train):
    shape.see(x)
    _, act, m, svars, start, below = run(variables, x, train)
    return act, (finish(m, variables, svars, start, below) if train else {})

  def upper(variables, act, train, extra=None):
    _no_extra(extra, _fmt(target))
    out, _, m, svars, start, below = run(variables, shape.placeholder(act), train, act)
    return out, (finish(m, variables, svars, start, lambda k: not below(k)) if train else {})

  return Cut(lower, upper, _fmt(target), depth, ("batch_stats",))
