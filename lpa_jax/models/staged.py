"""Networks written as stages, each stage boundary a named intervention point.

Every model in :mod:`lpa_jax.models` is a Linen module whose ``__call__`` takes
``start`` and ``stop`` point names, so that one network can be cut at any point:

>>> from lpa_jax.models import get_model
>>> model = get_model("mlp", num_classes=3, widths=(8, 8))     # points hidden1, hidden2, logits
>>> x = jnp.ones((8, 2, 2, 1))
>>> variables = model.init(jax.random.key(0), x)
>>> act = model.apply(variables, x, train=True, stop="hidden1", mutable=["batch_stats"])[0]
>>> logits = model.apply(variables, act, train=True, start="hidden1", mutable=["batch_stats"])[0]
>>> act.shape, bool(jnp.allclose(logits, model.apply(variables, x)))
((8, 8), True)

Running from ``start`` never builds the layers below it, so it costs only the FLOPs above the
point.  At each point the activation is also routed through Linen's :meth:`Module.perturb`
(collection ``"perturbations"``), and sown into ``"intermediates"``, so the stock Flax
intervention tools work on these models unchanged.

Residual networks also name every block: ``stage3.block0`` … ``stage3.block{n-1}`` (0-based,
like the parameter paths ``stage3_layer/block0``), listed bottom to top just before their stage;
the stage name ``stage3`` stays valid and is the last block's output.  The head is ``linear`` or,
for LDAM (Cao et al. 2019), ``cosine``: ℓ2-normalised features and class weights.

Mixed precision: every model takes ``dtype``, the compute dtype of its convolutions, dense layers
and BatchNorms (:data:`DTYPES`; default float32).  Parameters, optimiser state and BatchNorm
statistics stay float32 (Flax's ``param_dtype``), so the parameter tree and checkpoints do not
change; activations at the points are in ``dtype``; the logits are float32 (float64 only for
``float64``):

>>> model = get_model("resnet32", 10, dtype="bfloat16")   # a string from a config is fine
>>> model.dtype
dtype(bfloat16)

``float64`` is for numerical checks on the CPU and needs ``jax_enable_x64`` (refused without
it, rather than silently computing in float32); each layer then casts its parameters to float64,
and for float64 gradients cast the variables too (``tests/test_torch_peer.py`` does).

A perturbation finer than the activation's resolution (8 mantissa bits in bfloat16) is rounded
away when it is added.  LPA's class tables stay float32, but at ResNet-20's ``stage3.block0``
its default absolute radius (``‖δ‖ ≈ 0.1 %`` of ``‖a‖``) keeps only cosine 0.65–0.77 of its
direction and 71–85 % of its norm in the bfloat16 sum, while relative radii of a few percent
keep cosine ≥ 0.99 (measured on Fashion-MNIST-LT).  With bfloat16, use
``radius_mode="relative"``; the diagnostics ``delta_norm_C`` (what got through) and
``delta_table_norm_C`` (the table's) show the loss.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Layer = tuple[str, Callable[..., jnp.ndarray]]
#: The compute dtypes a model takes by name (``dtype=``; parameters stay float32).
DTYPES = ("float32", "bfloat16", "float16", "float64")


def compute_dtype(value: Any, field: str = "dtype") -> jnp.dtype:
  """The compute dtype named by ``value`` (a dtype, or its name as a config gives it).

  ``field`` names the setting in the error raised for anything outside :data:`DTYPES`.

  >>> compute_dtype("bfloat16")
  dtype(bfloat16)
  """
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in DTYPES:
    raise ValueError(f"Invalid {field}={value!r}: the compute dtype must be one of "
                     f"{', '.join(DTYPES)}")
  if dtype.name == "float64" and not jax.config.jax_enable_x64:
    raise ValueError(f"Invalid {field}={value!r}: float64 needs 64-bit JAX, which is off "
                     "(set JAX_ENABLE_X64=1, or jax.config.update('jax_enable_x64', True), "
                     "before building the model); without it JAX computes in float32")
  return dtype


def check_point(name: str | None, points: Sequence[str], what: str = "point") -> None:
  """Raises a ValueError listing the valid names when ``name`` is not one of ``points``.

  >>> check_point("stage9", ("stage1", "logits"))
  Traceback (most recent call last):
  ...
  ValueError: Unknown intervention point 'stage9'; valid points are: stage1, logits
  """
  if name is not None and name not in points:
    raise ValueError(
        f"Unknown intervention {what} {name!r}; valid points are: {', '.join(points)}")


def intervene(module: nn.Module, name: str, act: jnp.ndarray) -> jnp.ndarray:
  """Named intervention point: sow the activation and add any Flax perturbation given for it.

  Unlike a bare ``Module.perturb``, a ``perturbations`` collection may name only some points,
  and ``init`` creates none (so variables hold no batch-shaped zeros); get a zero template with
  ``model.apply(variables, x, mutable=["perturbations"])[1]``.

  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     h = intervene(self, "hidden", nn.relu(nn.Dense(8)(x)))   # a point named hidden
  ...     return nn.Dense(3)(h)
  >>> x = jnp.ones((8, 4))
  >>> params = Net().init(jax.random.key(0), x)["params"]
  >>> _, state = Net().apply({"params": params}, x, mutable=["intermediates"])
  >>> state["intermediates"]["hidden"][0].shape
  (8, 8)
  """
  module.sow("intermediates", name, act)
  if module.is_initializing():
    return act
  if module.is_mutable_collection("perturbations") or module.has_variable("perturbations", name):
    act = module.perturb(name, act)
  return act


def run_stages(module: nn.Module, layers: Sequence[Layer], x, train: bool,
               start: str | None, stop: str | None):
  """Runs ``layers`` (name, fn(h, train)) from just above ``start`` up to and including ``stop``.

  >>> class Net(nn.Module):   # each layer named: from ``start`` up, only those above are built
  ...   @nn.compact
  ...   def __call__(self, x, train=False, start=None, stop=None):
  ...     layers = [("stage1", lambda h, train: nn.relu(nn.Dense(8, name="stage1_layer")(h))),
  ...               ("logits", lambda h, train: nn.Dense(3, name="logits_layer")(h))]
  ...     return run_stages(self, layers, x, train, start, stop)
  >>> x = jnp.ones((8, 4))
  >>> variables = {"params": Net().init(jax.random.key(0), x)["params"]}
  >>> act = Net().apply(variables, x, stop="stage1")          # the activation at stage1
  >>> logits = Net().apply(variables, act, start="stage1")    # the layers above it
  >>> act.shape, bool(jnp.allclose(logits, Net().apply(variables, x)))
  ((8, 8), True)
  """
  names = [n for n, _ in layers]
  check_point(start, names, "start")
  check_point(stop, names, "stop")
  lo = names.index(start) + 1 if start is not None else 0
  hi = names.index(stop) if stop is not None else len(names) - 1
  if lo > hi + 1:
    raise ValueError(f"start={start!r} lies above stop={stop!r}; points run {names}")
  # Each layer takes its input in the module's compute dtype: a method's float32 perturbation
  # (noise, mixup weights) would otherwise keep a residual stream in float32 above the point.
  dtype = getattr(module, "dtype", None)
  h = x
  for name, fn in layers[lo:hi + 1]:
    h = intervene(module, name, fn(h if dtype is None else h.astype(dtype), train))
  return h


def stage_level(points: Sequence[str]) -> tuple[str, ...]:
  """The points that are not inside a stage (no ``.block``): what stage-granular defaults use.

  >>> stage_level(("stem", "stage1.block0", "stage1", "features", "logits"))
  ('stem', 'stage1', 'features', 'logits')
  """
  return tuple(p for p in points if "." not in p)


def staged_points(num_stages: int, num_blocks: int) -> tuple[str, ...]:
  """``stem``, every stage's blocks and output, ``features``, ``logits``: a staged ResNet's points.

  >>> staged_points(2, 1)
  ('stem', 'stage1.block0', 'stage1', 'stage2.block0', 'stage2', 'features', 'logits')
  """
  stages = sum((block_points(f"stage{i + 1}", num_blocks) for i in range(num_stages)), ())
  return ("stem",) + stages + ("features", "logits")


def block_points(stage: str, num_blocks: int) -> tuple[str, ...]:
  """A stage's points, bottom to top: its blocks (0-based), then the stage output itself."""
  return tuple(f"{stage}.block{j}" for j in range(num_blocks)) + (stage,)


def depth_below_logits(points: Sequence[str], point: str) -> int | float:
  """``L - l`` of the SPEC: the number of stages between ``point`` and the logits.

  Stage-level points count whole stages (``features`` and ``logits`` count as one each), as
  they always have.  A block point counts the part of its stage still above it, in blocks:
  block ``j`` of ``n`` lies ``(n - 1 - j)/n`` of a stage below the stage output.  So the last
  block has the stage's depth, block ``-1`` would be the previous stage's output, and the radius
  factor ``β^(L−l)`` moves smoothly from one stage output to the next.

  >>> pts = ("stem",) + block_points("stage1", 4) + ("features", "logits")
  >>> depth_below_logits(pts, "stage1"), depth_below_logits(pts, "stage1.block1")
  (2, 2.5)
  """
  check_point(point, points)
  stages = list(stage_level(points))
  stage, _, block = point.partition(".block")
  depth = len(stages) - 1 - stages.index(stage)
  if not block:
    return depth
  n = sum(p.startswith(stage + ".block") for p in points)
  above = (n - 1 - int(block)) / n
  return depth + above if above else depth  # the last block: the stage's own (int) depth


class GlobalPool(nn.Module):
  """Optional BN-ReLU (pre-activation nets) then global average pooling to a feature vector."""
  bn_relu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.bn_relu:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
      x = nn.relu(x)
    return jnp.mean(x, axis=(1, 2))


#: The ``logits`` layers a model takes (``head=``): linear, or cosine for LDAM.
HEADS = ("linear", "cosine")


def unit_columns(key, shape, dtype=jnp.float32):
  """Class weights drawn uniformly in [-1, 1], then scaled to unit ℓ2 norm per class (the LDAM
  reference initialisation of its normalised linear layer)."""
  w = jax.random.uniform(key, shape, dtype, -1.0, 1.0)
  return w / jnp.linalg.norm(w, axis=0, keepdims=True)


def l2_normalize(x, axis=-1, eps=1e-12):
  """``x / max(‖x‖, eps)``, with a finite gradient at ``x = 0`` (an all-zero feature vector)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), eps * eps))


# The head's products accumulate and come out in float32 whatever the (lower) compute dtype: the
# loss (and LDAM's scale s ≈ 30 on cosines) would otherwise see logits rounded to 8 mantissa bits.
def _acc(dtype) -> jnp.dtype:
  """The accumulation and logit dtype for compute ``dtype``: float32, or float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _acc_dot(dtype):
  return functools.partial(jax.lax.dot_general, preferred_element_type=_acc(dtype))


class CosineHead(nn.Module):
  """Normalised classifier: ``z_c = cos(h, w_c) ∈ [-1, 1]``; no bias (LDAM, Cao et al. 2019).

  The norms are taken in float32 (a ``B×D`` and a ``D×C`` array: no cost worth saving), the
  product runs on ``dtype`` operands with float32 accumulation, and the cosines are float32.

  >>> h_BxD = jnp.ones((8, 8))
  >>> variables = CosineHead(3).init(jax.random.key(0), h_BxD)
  >>> z_BxC = CosineHead(3).apply(variables, h_BxD)
  >>> z_BxC.shape, bool((jnp.abs(z_BxC) <= 1.0).all())   # every entry in [-1, 1]
  ((8, 3), True)
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxD):
    w_DxC = self.param("kernel", unit_columns, (h_BxD.shape[-1], self.num_classes))
    acc = _acc(self.dtype)
    h_BxD = l2_normalize(h_BxD.astype(acc)).astype(self.dtype)
    w_DxC = l2_normalize(w_DxC.astype(acc), axis=0).astype(self.dtype)
    return _acc_dot(self.dtype)(h_BxD, w_DxC, (((1,), (0,)), ((), ())))


def make_head(num_classes: int, head: str = "linear", dtype: Any = jnp.float32):
  """The ``logits`` layer of every staged model (built lazily inside the parent's compact call):
  ``linear`` (default) or ``cosine`` (:class:`CosineHead`, for LDAM).

  Its operands are in the compute ``dtype``; the logits are float32 (accumulated in float32,
  then cast, so even a float16 product is safe for the loss; float64 stays float64).

  >>> class Head(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, h):
  ...     return make_head(3, "linear", "bfloat16")(h, True)
  >>> h_BxD = jnp.ones((8, 8))
  >>> Head().apply(Head().init(jax.random.key(0), h_BxD), h_BxD).dtype
  dtype('float32')
  """
  if head not in HEADS:
    raise ValueError(f"Unknown head {head!r}; valid heads are: {', '.join(HEADS)}")
  dtype = compute_dtype(dtype)
  if head == "cosine":
    return lambda h, train: CosineHead(num_classes, dtype, name="logits_layer")(h)
  return lambda h, train: nn.Dense(num_classes, dtype=dtype, dot_general=_acc_dot(dtype),
                                   name="logits_layer")(h).astype(_acc(dtype))
