"""Per-class statistics, positive/negative class splits and per-class radii (SPEC §1).

The split decides the *direction* of each class's perturbation: sign ``+1`` (positive set P,
expansive, loss-increasing) or ``-1`` (negative set N, contractive).  Every class-level
method (LPA, LPL, LPG) keeps its split and the epoch's running statistics in its own state, a
:class:`SplitState`: its ``apply`` adds each batch's clean logits to the statistics, and its
``refresh`` re-splits from them (balanced rules) and starts the next epoch's.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SPLITS = ("balanced", "balanced_accuracy", "longtail", "all_positive", "all_negative", "signs")
REFRESHED = ("balanced", "balanced_accuracy")  # rules re-split each epoch from statistics


class ClassStats(NamedTuple):
  """Running per-class sums over one epoch of training batches."""
  count_C: jax.Array
  prob_sum_C: jax.Array      # predicted probability of the true class
  correct_sum_C: jax.Array
  loss_sum_C: jax.Array

  @classmethod
  def zeros(cls, num_classes: int) -> "ClassStats":
    # Four distinct buffers: the state is donated, and one buffer may not be donated twice.
    return cls(*(jnp.zeros((num_classes,), jnp.float32) for _ in range(4)))

  def add(self, logits_BxC, labels_B, loss_B) -> "ClassStats":
    onehot_BxC = jax.nn.one_hot(labels_B, logits_BxC.shape[-1])
    prob_B = jnp.sum(jax.nn.softmax(logits_BxC) * onehot_BxC, -1)
    correct_B = (jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32)
    col = lambda v_B: v_B @ onehot_BxC
    return ClassStats(self.count_C + onehot_BxC.sum(0), self.prob_sum_C + col(prob_B),
                      self.correct_sum_C + col(correct_B), self.loss_sum_C + col(loss_B))

  def mean(self, field: str) -> jax.Array:
    return getattr(self, field) / jnp.maximum(self.count_C, 1.0)


class Split(NamedTuple):
  """Direction and statistic for each class: ``sign_C`` in {-1, 0, +1}, ``q_C`` and ``tau``."""
  sign_C: jax.Array
  q_C: jax.Array
  tau: jax.Array


# The fields are declared with real types (not this module's postponed annotations), so API
# documentation tools can resolve them.
_SplitStateFields = NamedTuple("_SplitStateFields", [("split", Split), ("stats", ClassStats)])


class SplitState(_SplitStateFields):
  """A class-level method's state: its class ``split`` and this epoch's running ``stats``."""
  __slots__ = ()

  @property
  def sign_C(self) -> jax.Array:
    return self.split.sign_C

  @property
  def split_ready(self) -> jax.Array:
    """Whether any class has a direction yet: ``False`` for the balanced rules until the first
    ``refresh`` (every sign 0, so the method perturbs nothing); reported per step as
    ``aux['split_ready']`` by LPA."""
    return jnp.any(self.split.sign_C != 0)

  def observe(self, clean_logits_BxC, labels_B, loss_B=None) -> "SplitState":
    """The state with a batch's clean logits added to the statistics (stop-gradient).
    ``loss_B`` defaults to the clean cross-entropy; no split rule reads it."""
    clean_logits_BxC = jax.lax.stop_gradient(clean_logits_BxC)
    if loss_B is None:
      loss_B = optax.softmax_cross_entropy(
          clean_logits_BxC, jax.nn.one_hot(labels_B, clean_logits_BxC.shape[-1]))
    return self._replace(stats=self.stats.add(clean_logits_BxC, labels_B,
                                              jax.lax.stop_gradient(loss_B)))

  def refreshed(self, rule: str, stats: ClassStats | None = None) -> "SplitState":
    """A new split by ``rule`` from ``stats`` (default: the state's own) and fresh statistics."""
    stats = self.stats if stats is None else stats
    # _replace keeps any further fields of a state built on these two (LPA's loss-mode radii).
    return self._replace(split=refresh_split(rule, self.split, stats),
                         stats=ClassStats.zeros(self.stats.count_C.shape[-1]))


def split_state(split: Split) -> SplitState:
  """``split`` with empty statistics."""
  return SplitState(split, ClassStats.zeros(split.sign_C.shape[-1]))


def validate_split(rule: str, signs=None, num_classes: int | None = None) -> None:
  if rule not in SPLITS:
    raise ValueError(f"Unknown split rule {rule!r}; valid rules: {', '.join(SPLITS)}")
  if rule == "signs":
    if signs is None or (num_classes is not None and len(signs) != num_classes):
      raise ValueError(f"split='signs' needs a sign vector of length num_classes={num_classes}, "
                       f"got {signs!r}")
    if not all(s in (-1, 0, 1) for s in signs):
      raise ValueError(f"split signs must be -1, 0 or +1, got {signs!r}")
    if not any(signs):
      warnings.warn(f"split signs are all 0 ({signs!r}): no class is perturbed; give +1 "
                    "(expansive) or -1 (contractive) to at least one class", UserWarning,
                    stacklevel=4)


def default_num_head(num_classes: int) -> int:
  """The head size of every long-tail split in a config run (LPA, LPL, LPG share it) and LPL's
  and LPG's own default: ``round(0.4·C)``, the LPL paper's 4 head classes of CIFAR-10-LT,
  generalised to ``C`` classes **(ours)**.

  >>> default_num_head(10)
  4
  """
  return max(1, int(round(0.4 * num_classes)))


def median_num_head(class_counts) -> int:
  """LPA's own default head size (SPEC §1): the classes whose count is at least the median are
  the head (N), those with a below-median count the tail (P).

  >>> median_num_head([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])   # CIFAR-10-LT
  5
  """
  counts = np.asarray(class_counts, np.float64)
  return int(np.sum(counts >= np.median(counts))) if counts.size else 0


def run_num_head(num_head: int | None, num_classes: int) -> int:
  """A config run's head size: ``num_head`` when set, else :func:`default_num_head`, the one
  rule every class-level method of the run shares."""
  return default_num_head(num_classes) if num_head is None else int(num_head)


def frequency_split(class_counts, num_head: int | None = None) -> Split:
  """Long-tail split: the ``num_head`` most frequent classes are N, the rest P.

  Default ``num_head``: :func:`default_num_head` (LPA passes :func:`median_num_head`).
  ``q_c`` is the class's frequency rank scaled to [0, 1] (0 = most frequent) and ``tau`` the
  rank threshold, so ``|tau - q_c|`` grows towards both ends of the distribution.
  """
  counts = np.asarray(class_counts, np.float64)
  c = len(counts)
  order = np.argsort(-counts, kind="stable")
  rank = np.empty(c, np.int64)
  rank[order] = np.arange(c)
  if num_head is None:
    num_head = default_num_head(c)
  if not 0 <= num_head <= c:
    raise ValueError(f"num_head must lie in [0, {c}], got {num_head}")
  sign = np.where(rank < num_head, -1.0, 1.0)
  q = rank / max(c - 1, 1)
  tau = (num_head - 0.5) / max(c - 1, 1)
  return Split(jnp.asarray(sign, jnp.float32), jnp.asarray(q, jnp.float32),
               jnp.asarray(tau, jnp.float32))


def constant_split(sign_C) -> Split:
  sign_C = jnp.asarray(sign_C, jnp.float32)
  return Split(sign_C, jnp.zeros_like(sign_C), jnp.zeros((), jnp.float32))


def initial_split(rule: str, num_classes: int, class_counts=None, signs=None,
                  num_head: int | None = None) -> Split:
  """The split used before any epoch statistics exist.

  Balanced rules start with every sign 0 (no perturbation during the first epoch) **(ours)**:
  there is nothing yet to tell hard classes from easy ones.  ``class_counts``, when given, must
  hold one training count per class.
  """
  validate_split(rule, signs, num_classes)
  if class_counts is not None and np.shape(class_counts) != (num_classes,):
    raise ValueError(f"class_counts must hold one training count per class: got shape "
                     f"{np.shape(class_counts)} for num_classes={num_classes}")
  if rule == "longtail":
    if class_counts is None:
      raise ValueError("split='longtail' needs the training class counts")
    return frequency_split(class_counts, num_head)
  if rule == "all_positive":
    return constant_split(np.ones(num_classes))
  if rule == "all_negative":
    return constant_split(-np.ones(num_classes))
  if rule == "signs":
    return constant_split(np.asarray(signs))
  return constant_split(np.zeros(num_classes))


def method_split(who: str, rule: str, num_classes: int, class_counts=None, signs=None,
                 num_head: int | None = None) -> Split:
  """:func:`initial_split` whose errors name the method (``lpl: Unknown split rule ...``)."""
  try:
    return initial_split(rule, num_classes, class_counts, signs, num_head)
  except ValueError as e:
    raise ValueError(f"{who}: {e}") from None


def refresh_split(rule: str, split: Split, stats: ClassStats) -> Split:
  """Epoch-end refresh: balanced rules re-split by ``q_c < mean_c q_c`` (jittable)."""
  if rule not in ("balanced", "balanced_accuracy"):
    return split
  field = "prob_sum_C" if rule == "balanced" else "correct_sum_C"
  seen_C = stats.count_C > 0
  q_C = stats.mean(field)
  tau = jnp.sum(jnp.where(seen_C, q_C, 0.0)) / jnp.maximum(seen_C.sum(), 1)
  sign_C = jnp.where(seen_C, jnp.where(q_C < tau, 1.0, -1.0), split.sign_C)
  return Split(sign_C, jnp.where(seen_C, q_C, split.q_C), tau)


def class_radii(split: Split, eps: float, delta_eps: float = 0.0, beta: float = 0.7,
                depth: int = 0, varied: bool = True) -> jax.Array:
  """``eps_c = beta**(L-l) * (eps + delta_eps * |tau - q_c|)`` (varied) or ``beta**(L-l)*eps``."""
  base = eps + (delta_eps * jnp.abs(split.tau - split.q_C) if varied else 0.0)
  return (beta ** depth) * base * jnp.ones_like(split.sign_C)
