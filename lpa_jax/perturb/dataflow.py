"""Data flow through a traced function: which outputs depend on which inputs.

What a cut uses to check that its point separates the model's input from its output
(:func:`check_separates`) and to tell which module calls below the point ``upper`` may skip
(:func:`skippable`), read off ``jax.make_jaxpr`` without running anything
(:mod:`lpa_jax.perturb.foreign`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin")


def _inner_jaxpr(eqn):
  """The jaxpr a call-like equation runs, when its inputs and outputs map one to one."""
  if eqn.primitive.name not in _CALLS:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
    if (sub is not None and hasattr(sub, "eqns") and len(sub.invars) == len(eqn.invars)
        and len(sub.outvars) == len(eqn.outvars)):
      return sub
  return None


def _flow(jaxpr, sources: list) -> list[frozenset]:
  """For each output of ``jaxpr``, the union of the ``sources`` (a set of labels per input) it
  depends on (data flow; inside calls it looks through, elsewhere every output of an equation
  depends on all its inputs)."""
  none = frozenset()
  got = {v: s for v, s in zip(jaxpr.invars, sources) if s}
  of = lambda v: none if isinstance(v, jex_core.Literal) else got.get(v, none)  # noqa: E731
  for eqn in jaxpr.eqns:
    ins = [of(v) for v in eqn.invars]
    if not any(ins):
      continue
    sub = _inner_jaxpr(eqn)
    outs = _flow(sub, ins) if sub is not None else [none.union(*ins)] * len(eqn.outvars)
    got.update((v, o) for v, o in zip(eqn.outvars, outs) if o)
  return [of(v) for v in jaxpr.outvars]


def _depends(jaxpr, flags) -> list[bool]:
  """Which outputs of ``jaxpr`` depend on the inputs flagged in ``flags`` (see :func:`_flow`)."""
  return [bool(s) for s in _flow(jaxpr, [frozenset([0]) if f else frozenset() for f in flags])]


def skippable(out_of, x, act, calls: list) -> dict:
  """Of ``calls`` (``[(key, output spec)]``, the module calls made before the point), those
  ``upper`` may skip, as ``{key: zeros}``: the calls whose value the output does not depend
  on, read off a trace of ``out_of(x, act, skip)`` with the zeros as its inputs.  A call whose
  value is used above the point (a table computed from parameters alone) must run: it is
  dropped and the trace repeated."""
  while calls:
    keys = [k for k, _ in calls]
    zeros = [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec) for _, spec in calls]
    closed = jax.make_jaxpr(lambda x, a, z, k=keys: out_of(x, a, dict(zip(k, z))))(x, act, zeros)
    sources = [frozenset()] * len(jax.tree.leaves((x, act))) + [
        frozenset([i]) for i, z in enumerate(zeros) for _ in jax.tree.leaves(z)]
    used = frozenset().union(*_flow(closed.jaxpr, sources))
    if not used:
      return dict(zip(keys, zeros))
    calls = [c for i, c in enumerate(calls) if i not in used]
  return {}


def check_separates(out_of, x, act, point: str, model: str = "the model") -> None:
  """Raises unless ``out_of(x, act)`` (``upper``'s run on the placeholder ``x`` with ``act``
  at the point) depends on ``act`` and not on ``x``, by tracing it once (no FLOPs).

  A dependence on ``x`` means a path from the input to the output bypasses the point (a skip
  connection over it, an input-derived mask): ``upper`` would compute it from the
  placeholder, and lower + upper would not be the model's forward pass.  No dependence on
  ``act`` means nothing above the point uses it: a perturbation there changes nothing.
  Calls it looks into (``jit``, ``remat``, ``custom_jvp``/``custom_vjp``) are followed
  exactly; any other higher-order primitive (``scan``, ``while``, ``cond``) counts as using
  all its inputs for all its outputs.  Cost: one more trace of the model (measured on a
  12-block Linen ResNet on CPU: +0.4 s on a 3.5 s compile of the LPA train step).

  >>> check_separates(lambda x, a: a.sum(1), jnp.zeros((2, 3)), jnp.ones((2, 4)), "block2")
  >>> check_separates(lambda x, a: (x + a).sum(1), jnp.zeros((2, 4)), jnp.ones((2, 4)), "b")
  Traceback (most recent call last):
  ...
  ValueError: The cut at 'b' does not separate the model: ...
  """
  closed = jax.make_jaxpr(out_of)(x, act)
  n_x, n_act = len(jax.tree.leaves(x)), len(jax.tree.leaves(act))
  from_x = _depends(closed.jaxpr, [True] * n_x + [False] * n_act)
  from_act = _depends(closed.jaxpr, [False] * n_x + [True] * n_act)
  if any(from_x):
    raise ValueError(
        f"The cut at {point!r} does not separate {model}: its output depends on the model's "
        f"input by a path that bypasses {point!r} (a skip connection over it, or a mask or "
        "value computed from the input above it), and upper would compute that path from a "
        f"placeholder. Cut at a module that every path from input to output passes through "
        "(a whole block or stage), or pass check=False to the cut if this reading is wrong")
  if not any(from_act):
    raise ValueError(
        f"The output of {model} does not depend on {point!r}'s output: a perturbation there "
        "changes nothing. Cut at a module on the path to the output")
