"""Cut models you did not write: any Flax Linen model by module path, any NNX model by attribute.

Both constructors return a :class:`~lpa_jax.perturb.hooks.Cut`, so LPA and every other method
work on these models unchanged::

    cut = cut_linen(model, "encoder/block2", input_shape=x.shape[1:], input_dtype=x.dtype)
    apply_fn, variables = nnx_functional(nnx_model)      # NNX -> pure function + variables dict
    cut = cut_nnx(nnx_model, "layers/3", input_shape=x.shape[1:])

How the layers below the point are kept out of ``upper``: ``upper`` runs the model's forward on
a zero placeholder input, and the target submodule's output is replaced by ``act``.  A Linen
cut also skips the module calls made before the point (on modules other than the target's
ancestors): each hands on zeros of its output's shape without running, once a trace shows the
output does not depend on them (a call whose value is used above the point, e.g. a table
computed from parameters alone, runs).  What is left below the point — code in the ancestors'
own bodies, and with ``cut_nnx`` or ``check=False`` the layers themselves — only fed the
target and is dead code, which jit removes (``jax.jit(...).lower().compile().cost_analysis()``
shows it; see ``tests/test_compose.py``).  Likewise ``lower`` runs the model to the end and the
layers above the point are dead.  Outside jit they would run, so jit the step (the library
always does); what remains is trace/compile time, as every half traces the whole model.  The
point must *separate* input from output: if a skip connection bypasses the target, ``upper``
would see the placeholder there, and lower+upper would differ from the model's own forward.
So ``upper`` traces the model once more and follows the data flow
(:func:`~lpa_jax.perturb.dataflow.check_separates`):
an output that depends on the input other than through the point, or not on the point at all,
is refused with the reason; a Linen cut traces it a third time to tell which calls it skips.

Dead code with an effect is not removed.  A ``jax.debug.callback`` in a layer below the point
runs once per step (in ``lower``) with a Linen cut, but ``T + 2`` times per LPA step of ``T``
PGD steps with ``cut_nnx`` (in ``lower``, then in PGD's ``T`` passes and the final ``upper`` on
the placeholder), and keeps that layer alive in ``upper``.  ``cut_nnx`` cannot skip it: it
swaps the target for a stand-in function, and putting functions in place of the other
submodules too would break every model that hands a module holding them to an NNX transform
(``nnx.scan``, ``nnx.vmap``, ``nnx.remat`` split the module graph and refuse a function in
it).  An effect in an ancestor's own body below the point runs ``T + 2`` times with either cut.

A cut is stateless: the placeholder's per-example shape and dtype are the constructor's
``input_shape`` / ``input_dtype`` (required: ``upper`` cannot infer the input from ``act``), its
batch size that of ``act``; ``lower`` checks its input against them.  The dtype matters: a model
that computes in its input's dtype must see a placeholder of that dtype.  ``act`` takes the
dtype the target returns in the model's own forward (the target's own code still runs on the
placeholder, as dead code, to tell), so a bf16 model stays bf16 above the point even if a
method hands ``upper`` an f32 activation.

Train-mode BatchNorm state (the dead-code subtlety): a BatchNorm below the point that ``upper``
does not skip runs on the placeholder and would return statistics of zeros, which are *not*
dead if returned.  So each half returns the full mutable collections, but only the entries it
owns are new: ``lower`` owns the variables written before the target was called plus the
target's own subtree; ``upper`` owns the rest, and passes the others through from the
variables it was given.  ``{**variables, **lower_state}`` fed to ``upper`` therefore yields
state in which every BatchNorm is updated exactly once, from the real data, and the
placeholder's statistics are dead.  A module that writes state *both* before and after the
target (weight sharing across the point) keeps only the ``lower`` update.

Randomness: see :mod:`lpa_jax.perturb.hooks` for Linen (one key for both halves; Flax folds in
the module path).  An NNX model keeps its own ``nnx.Rngs`` streams in ``variables``; with
``rng=None`` they are used and advanced like the BatchNorm statistics (``nnx.Dropout`` forks a
stream per layer, so the halves draw the model's own masks); with ``rng`` every stream except
``params`` is reseeded from it for that call (:func:`reseed_nnx`) and the stored streams pass
through unchanged.  One stream drawn from both below and above the point keeps only
``lower``'s advance, like shared BatchNorm state, so later steps would redraw numbers ``upper``
used: give such a model ``rng``.
"""
from __future__ import annotations

import collections
import functools
import inspect
import zlib
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import tracers as flax_tracers

from lpa_jax.perturb.dataflow import check_separates, skippable
from lpa_jax.perturb.hooks import Cut, apply_linen, linen_rngs

PathLike = str | Sequence[str | int]
NNX_OTHER = "nnx_state"  # non-param, non-BatchStat NNX variables (e.g. dropout RNG streams)
TRAIN_KWS = ("train", "training", "is_training")  # what train_kw="auto" looks for


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


def _missed(target, target_method: str, seen) -> ValueError:
  """Why a Linen target was never called: only through other methods, or no such path."""
  methods = sorted({name for p, name in seen if p == target})
  if methods:
    return ValueError(f"Module {_fmt(target)!r} is called through {', '.join(methods)}, never "
                      f"{target_method}: pass target_method={methods[0]!r} to cut_linen to cut "
                      "at that method's output")
  return _unknown_path(target, [p for p, _ in seen])


def _own(new: dict, old: dict, owned: Callable[[tuple], bool]) -> dict:
  """Leaves whose path is ``owned`` come from ``new``, the others from ``old`` (pass-through)."""
  fn, fo = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
  return traverse_util.unflatten_dict({k: (v if owned(k) or k not in fo else fo[k])
                                       for k, v in fn.items()})


def _input_spec(input_shape, input_dtype, who: str):
  if input_shape is None:
    raise ValueError(f"{who} needs the model's per-example input shape for upper's placeholder: "
                     "pass input_shape=x.shape[1:] (and input_dtype=x.dtype if not float32)")
  return tuple(int(d) for d in input_shape), jnp.dtype(input_dtype)


def _check_input(x, shape, dtype, point):
  if tuple(x.shape[1:]) != shape or x.dtype != dtype:
    raise ValueError(f"The cut at {point!r} was built for inputs of per-example shape {shape} "
                     f"and dtype {dtype}, got {tuple(x.shape[1:])} {x.dtype}: pass "
                     "input_shape=x.shape[1:], input_dtype=x.dtype to the cut constructor")


def _placeholder(act, shape, dtype):
  return jnp.zeros((jax.tree.leaves(act)[0].shape[0],) + shape, dtype)


def _one_array(out, point: str):
  """``out`` if it is one array; a pytree (``(h, mask)``) is refused, naming its structure:
  every method adds ``δ`` to one array, and the rest of the pytree could not be handed to
  ``upper`` without computing it below the point."""
  if isinstance(out, jax.Array):
    return out
  leaves = jax.tree.map(lambda a: f"{getattr(a, 'dtype', type(a).__name__)}"
                        f"{list(getattr(a, 'shape', ()))}", out)
  raise ValueError(f"{point!r} returns a {type(out).__name__} of {len(jax.tree.leaves(out))} "
                   f"arrays, {leaves}, not one array: the perturbation methods add δ to one "
                   "array. Cut at a submodule that returns one (the one computing the array you "
                   "mean to perturb)")


def _stand_in(act, out, point):
  """``act`` in place of the target's output ``out``: same shapes, cast to ``out``'s dtypes."""
  shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
  if jax.tree.structure(act) != jax.tree.structure(out) or shapes(act) != shapes(out):
    raise ValueError(f"upper got an activation of shape {shapes(act)}, but {point!r} returns "
                     f"{shapes(out)} for this batch")
  return jax.tree.map(lambda a, o: a.astype(o.dtype), act, out)


def _no_extra(extra, point):
  if extra:
    raise ValueError(f"extra points {list(extra)} above {point!r} are supported for lpa_jax's "
                     "staged models only; cut a foreign model at one point")


# --------------------------------------------------------------------------------------- Linen


def _train_kw(model: nn.Module, method, train_kw: str | None) -> str | None:
  """Resolves ``train_kw`` against the signature of the method ``apply`` will call."""
  fn = model.__call__ if method is None else (
      getattr(model, method) if isinstance(method, str) else method)
  name = getattr(fn, "__qualname__", repr(fn))
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # uninspectable: trust the caller
    return None if train_kw == "auto" else train_kw
  named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  if train_kw == "auto":
    return next((k for k in TRAIN_KWS if k in named), None)
  any_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
  if train_kw is None or train_kw in named or any_kw:
    return train_kw
  raise ValueError(f"{name} takes no keyword {train_kw!r} (its parameters: {', '.join(params)});"
                   " pass train_kw=None for a model without a training flag, or a method= "
                   "wrapper, e.g. lambda m, x, train: m(x, deterministic=not train)")


def _spec(out):
  """``out``'s shapes and dtypes if it is a pytree of plain arrays (a call ``upper`` could
  skip, handing on zeros), else ``None``."""
  leaves = jax.tree.leaves(out)
  if not all(isinstance(a, jax.Array) and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended)
             for a in leaves):
    return None
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out)


def _linen_run(model, method, kw, target, target_method, mutable, rng_names,
               variables, x, train, rng, act=None, record=None, skip=None):
  """One pass of ``model`` with the target intercepted: returns ``(out, target_out, state,
  below)``, ``below(path)`` telling the state leaves the part below the point wrote.

  Module calls are keyed ``(path, method, n)`` (the ``n``-th call of that method).  ``record``
  (a list) receives ``(key, output spec)`` of the outermost calls made before the point, on
  modules other than the target's ancestors; a call keyed in ``skip`` is not run, its value
  is returned instead (see :func:`~lpa_jax.perturb.dataflow.skippable`)."""
  mut = [c for c in mutable if c in variables] if train else []
  before = traverse_util.flatten_dict({c: variables[c] for c in mut})
  seen, hits, written = [], [], set()
  calls = collections.Counter()

  def not_target(next_fun, args, kwargs, path_, name):
    key = (path_, name, calls[path_, name])
    calls[path_, name] += 1
    if skip and key in skip:
      return skip[key]
    start = len(record) if record is not None else 0
    out = next_fun(*args, **kwargs)
    # Only calls in the forward's own trace: zeros handed into a lifted transform's (nn.scan,
    # nn.remat) would cross it; the lifted module's own call is outside and can be skipped.
    if (record is not None and not hits and path_ != target[:len(path_)]
        and flax_tracers.current_trace() == outer):
      del record[start:]  # the calls made inside this one are skipped with it
      spec = _spec(out)
      if spec is not None:
        record.append((key, spec))
    return out

  def interceptor(next_fun, args, kwargs, ctx):
    path_ = tuple(ctx.module.path)
    seen.append((path_, ctx.method_name))
    if path_ != target or ctx.method_name != target_method:
      return not_target(next_fun, args, kwargs, path_, ctx.method_name)
    if hits:
      raise ValueError(f"Module {_fmt(target)!r} is called more than once; cut at a module "
                       "called once per forward pass")
    if flax_tracers.current_trace() != outer:
      raise ValueError(f"Module {_fmt(target)!r} runs inside a lifted transform (nn.remat, "
                       "nn.scan, nn.vmap, nn.jit, ...), whose output cannot be handed across "
                       "it; cut at the transformed module's parent, or at a module outside it")
    root = ctx.module
    while isinstance(root.parent, nn.Module):
      root = root.parent
    now = traverse_util.flatten_dict({c: root.variables.get(c, {}) for c in mut})
    # Identity, not value: a BatchNorm that already ran holds a new array object.
    written.update(k for k, v in now.items() if v is not before.get(k))
    # In upper: dead code, it only tells act's shape and dtype.
    out = _one_array(next_fun(*args, **kwargs), _fmt(target))
    hits.append(out if act is None else _stand_in(act, out, _fmt(target)))
    return hits[-1]

  train_kwargs = {kw: train} if kw else {}
  outer = flax_tracers.current_trace()
  with nn.intercept_methods(interceptor):
    # mutable=False, never []: Flax returns (out, state) for any list, even an empty one.
    out = apply_linen(model, variables, x, method=method, mutable=mut or False,
                      rngs=linen_rngs(rng, train, rng_names), **train_kwargs)
  if not hits:
    raise _missed(target, target_method, seen)
  logits, state = out if mut else (out, {})
  below = lambda k: k in written or k[1:1 + len(target)] == target
  return logits, hits[0], dict(state), below


def cut_linen(model: nn.Module, path: PathLike, *,
              input_shape: Sequence[int] | None = None, input_dtype=jnp.float32,
              method: Callable | str | None = None, train_kw: str | None = "auto",
              target_method: str = "__call__", mutable: Sequence[str] = ("batch_stats",),
              rng_names: Sequence[str] = ("dropout",),
              check: bool = True) -> Cut:
  """Cuts any Linen model at the output of the submodule at ``path``, without editing it.

  Args:
    model: the (unbound) Linen module; ``model.apply(variables, x, **{train_kw: train})`` is
      its forward pass (``method`` picks another method or a ``fn(module, x, ...)``).
    path: module path, e.g. ``"encoder/block2"`` or ``("encoder", "block2")``; names are
      Linen's (explicit ``name=`` or automatic ``Dense_0``).
    input_shape, input_dtype: the model's per-example input shape and dtype (required).
    train_kw: the keyword that switches training mode.  ``"auto"`` passes the first of
      ``train, training, is_training`` the applied method's signature names, or none; a name
      forces that keyword (``ValueError`` if the method cannot take it); ``None`` passes none.
    target_method: the target's method whose output is the activation, e.g. ``"encode"``
      for a point the model reaches as ``self.block.encode(x)``.
    mutable: collections a training pass updates (those present in ``variables``).
    rng_names: random streams seeded from the halves' ``rng`` in training mode (``dropout``).
    check: every trace of ``upper`` traces the model twice more (no FLOPs: trace time only,
      paid when a step compiles) and raises if its output depends on the input by a path that
      bypasses the point (a skip connection over it) or does not depend on the point at all
      (:func:`~lpa_jax.perturb.dataflow.check_separates`); the second trace lets ``upper``
      skip the module calls below the point (see the module docstring).  ``False`` skips
      both: the layers below then run on the placeholder as dead code, and an effect there
      (``jax.debug.callback``) runs in every ``upper`` call, ``T + 2`` times per LPA step.

  >>> class TheirNet(nn.Module):             # a model you did not write: no named points
  ...   @nn.compact
  ...   def __call__(self, x, train=False):
  ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
  ...     x = nn.relu(nn.Dense(8, name="layer3")(x))
  ...     return nn.Dense(3)(x)
  >>> x, key = jnp.ones((8, 4)), jax.random.key(0)
  >>> variables = TheirNet().init(key, x)
  >>> cut = cut_linen(TheirNet(), "layer3", input_shape=x.shape[1:])
  >>> act, st = cut.lower(variables, x, True, rng=key)
  >>> logits, st2 = cut.upper({**variables, **st}, act, True, rng=key)
  >>> act.shape, logits.shape, list(st)
  ((8, 8), (8, 3), ['batch_stats'])
  """
  target = _parse_path(path)
  shape, dtype = _input_spec(input_shape, input_dtype, "cut_linen")
  kw = _train_kw(model, method, train_kw)  # at construction: a wrong keyword fails here
  run = functools.partial(_linen_run, model, method, kw, target, target_method,
                          tuple(mutable), tuple(rng_names))

  def lower(variables, x, train, rng=None):
    _check_input(x, shape, dtype, _fmt(target))
    _, act, state, below = run(variables, x, train, rng)
    return act, _own(state, {c: variables[c] for c in state}, below)

  def upper(variables, act, train, extra=None, rng=None):
    _no_extra(extra, _fmt(target))
    x = _placeholder(act, shape, dtype)
    skip = None
    if check:
      before = []  # the check's trace lists the calls made before the point
      check_separates(lambda x, a: run(variables, x, train, rng, a, record=before)[0], x, act,
                      _fmt(target), type(model).__name__)
      skip = skippable(lambda x, a, z: run(variables, x, train, rng, a, skip=z)[0], x, act,
                        before)
    logits, _, state, below = run(variables, x, train, rng, act, skip=skip)
    return logits, _own(state, {c: variables[c] for c in state}, lambda k: not below(k))

  return Cut(lower, upper, _fmt(target), tuple(mutable))


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


def reseed_nnx(model: nnx.Module, rng) -> None:
  """Reseeds every RNG stream of ``model`` but ``params`` from ``rng``, in place: the streams
  of tag ``t`` as ``nnx.reseed`` does from ``fold_in(rng, crc32(t))`` (distinct tags never
  share a key; the streams of one tag get successive keys), counts reset to zero.

  >>> model = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
  >>> key, step = jax.random.key(0), 3
  >>> reseed_nnx(model, jax.random.fold_in(key, step))
  >>> mask = model(jnp.ones(8))
  >>> reseed_nnx(model, jax.random.fold_in(key, step))
  >>> bool((model(jnp.ones(8)) == mask).all())   # the same key: the same dropout masks
  True
  """
  tags = sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)}
                - {"params"})
  nnx.reseed(model, **{t: jax.random.fold_in(rng, zlib.crc32(t.encode())) for t in tags})


def _state_vars(model: nnx.Module) -> dict:
  return {tuple(p): v for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)}


def _new_state(model: nnx.Module, variables: dict) -> dict:
  _, _, stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return {c: s for c, s in (("batch_stats", stats), (NNX_OTHER, other)) if c in variables}


def _prepare(graphdef, variables, train, rng):
  """Merges the model, reseeds it from ``rng`` if given; returns it, its state variables and
  their stored values (to restore the RNG streams a given ``rng`` stood in for)."""
  m = _merge(graphdef, variables, train)
  svars = _state_vars(m)
  stored = {k: v.get_raw_value() for k, v in svars.items()}
  if train and rng is not None:
    reseed_nnx(m, rng)
  return m, svars, stored


def _finish(ctx, variables, owned, rng):
  """The new state: owned entries from the pass, the others passed through from ``start``."""
  m, svars, stored, start = ctx
  for k, v in svars.items():
    if rng is not None and isinstance(v, nnx.RngState):
      v.set_raw_value(stored[k])  # the key stood in for the stored streams: leave them be
    elif not owned(k):  # pass through: the computed update becomes dead code
      v.set_raw_value(start[k])
  return _new_state(m, variables)


def nnx_functional(model: nnx.Module) -> tuple[Callable, dict]:
  """Turns an NNX model into ``apply_fn(variables, x, train=False, rng=None) -> (out,
  new_state)`` and a Linen-style ``variables`` dict (``params``; ``batch_stats`` and
  ``nnx_state`` — e.g. RNG streams — only if the model has them), so the train step can
  differentiate ``variables['params']``.  ``rng`` reseeds the model's streams for the call
  (:func:`reseed_nnx`); without it they advance and come back in ``new_state``.

  The model is split once here and merged *inside* each traced call, which avoids NNX's
  ``TraceContextError`` under ``jax.grad`` / ``lax.fori_loop``.  Write trained values back
  with ``nnx.update(model, params, *model_state.values())`` (any set of collections).

  >>> model, x = nnx.Linear(4, 8, rngs=nnx.Rngs(0)), jnp.ones((8, 4))
  >>> apply_fn, variables = nnx_functional(model)
  >>> logits, state = jax.jit(apply_fn, static_argnums=2)(variables, x, True)
  >>> logits.shape, list(variables)
  ((8, 8), ['params'])
  """
  graphdef, variables = _split(model)

  def apply_fn(variables, x, train=False, rng=None):
    m, svars, stored = _prepare(graphdef, variables, train, rng)
    out = m(x)
    if not train:
      return out, {}
    return out, _finish((m, svars, stored, stored), variables, lambda k: True, rng)

  return apply_fn, variables


def _in_nnx_transform(target) -> ValueError:
  return ValueError(f"Submodule {_fmt(target)!r} runs inside an NNX transform (nnx.scan, "
                    "nnx.remat, nnx.vmap, ...) or is handed to one, and its output cannot be "
                    "handed across it; cut at the module that applies the transform, or at a "
                    "submodule outside it")


def _forward_traces(graphdef, variables, train, x) -> bool:
  """Whether the model's own forward, without a stand-in, traces (no FLOPs)."""
  try:
    nnx.eval_shape(lambda m, x: m(x), _merge(graphdef, variables, train), x)
  except Exception:  # whatever it is, it is the model's own failure, not the cut's
    return False
  return True


def _nnx_run(graphdef, target, variables, x, train, rng, act=None):
  m, svars, stored = _prepare(graphdef, variables, train, rng)
  if target not in [tuple(p) for p, _ in nnx.iter_modules(m)]:
    raise _unknown_path(target, [tuple(p) for p, _ in nnx.iter_modules(m)])
  parent = m
  for part in target[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  key = target[-1]
  orig = parent[key] if isinstance(key, int) else getattr(parent, key)
  start = {k: v.get_raw_value() for k, v in svars.items()}
  hits, written, reached = [], set(), []
  outer = flax_tracers.current_trace()

  def stand_in(*args, **kwargs):
    reached.append(True)
    if hits:
      raise ValueError(f"Submodule {_fmt(target)!r} is called more than once; cut at a "
                       "submodule called once per forward pass")
    if flax_tracers.current_trace() != outer:
      raise _in_nnx_transform(target)
    written.update(k for k, v in svars.items() if v.get_raw_value() is not start[k])
    # In upper: dead code, it only tells act's shape and dtype.
    out = _one_array(orig(*args, **kwargs), _fmt(target))
    hits.append(out if act is None else _stand_in(act, out, _fmt(target)))
    return hits[-1]

  _set = lambda v: parent.__setitem__(key, v) if isinstance(key, int) else setattr(parent, key, v)
  _set(stand_in)
  try:
    out = m(x)
  except Exception as e:
    # A transform handed a module holding the stand-in refuses the function in it (with an
    # error about the function); the model's own forward tells whether the swap was the cause.
    if reached or not _forward_traces(graphdef, variables, train, x):
      raise
    raise _in_nnx_transform(target) from e
  finally:
    _set(orig)
  if not hits:
    raise ValueError(f"Submodule {_fmt(target)!r} was never called by the forward pass")
  below = lambda k: k in written or k[:len(target)] == target
  return out, hits[0], (m, svars, stored, start), below


def cut_nnx(model: nnx.Module | nnx.GraphDef, path: PathLike, *,
            input_shape: Sequence[int] | None = None, input_dtype=jnp.float32,
            check: bool = True) -> Cut:
  """Cuts any NNX model at the output of the submodule at attribute path ``path``.

  Inside each traced call the model is merged from ``variables`` (from
  :func:`nnx_functional`) and the target is swapped for a stand-in that records (``lower``) or
  replaces (``upper``) its output, then put back before the new state is split off.
  ``input_shape`` / ``input_dtype``: the model's per-example input (required).  ``rng``
  reseeds the model's RNG streams for the call; without it the stored streams are used.
  ``check``: as in :func:`cut_linen` (a skip connection over the point is refused).  Unlike
  :func:`cut_linen`, ``upper`` runs the layers below the point on the placeholder, as dead
  code: an effect there (``jax.debug.callback``) runs ``T + 2`` times per LPA step (see the
  module docstring for why).

  NNX's own ``Module.perturb`` / ``nnx.capture`` need a ``self.perturb`` call written into
  the model, and still run the layers below it, so they cannot cut a model you did not write.

  >>> from lpa_jax.perturb.hooks import full_apply
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.blocks = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
  ...     self.head = nnx.Linear(8, 3, rngs=rngs)
  ...   def __call__(self, x):
  ...     for block in self.blocks:
  ...       x = nnx.relu(block(x))
  ...     return self.head(x)
  >>> model, x = Net(nnx.Rngs(0)), jnp.ones((8, 4))
  >>> apply_fn, variables = nnx_functional(model)
  >>> cut = cut_nnx(model, "blocks/1", input_shape=x.shape[1:])
  >>> logits, st = full_apply(cut, variables, x, True)
  >>> bool(jnp.allclose(logits, model(x)))   # lower + upper: the model's forward
  True
  """
  target = _parse_path(path)
  shape, dtype = _input_spec(input_shape, input_dtype, "cut_nnx")
  if isinstance(model, nnx.Module):
    paths = [tuple(p) for p, _ in nnx.iter_modules(model)]
    if target not in paths:
      raise _unknown_path(target, paths)
    graphdef, _ = _split(model)
  else:
    graphdef = model

  def lower(variables, x, train, rng=None):
    _check_input(x, shape, dtype, _fmt(target))
    _, act, ctx, below = _nnx_run(graphdef, target, variables, x, train, rng)
    return act, (_finish(ctx, variables, below, rng) if train else {})

  def upper(variables, act, train, extra=None, rng=None):
    _no_extra(extra, _fmt(target))
    x = _placeholder(act, shape, dtype)
    if check:
      check_separates(lambda x, a: _nnx_run(graphdef, target, variables, x, train, rng, a)[0],
                      x, act, _fmt(target), "the NNX model")
    out, _, ctx, below = _nnx_run(graphdef, target, variables, x, train, rng, act)
    return out, (_finish(ctx, variables, lambda k: not below(k), rng)
                 if train else {})

  return Cut(lower, upper, _fmt(target), ("batch_stats",))
