"""A finished run's record: ``results.json``'s contents, the per-sample predictions beside it,
and the code version every run records.

  Not run as a doctest: it needs a finished run (its data, state and history).

  >>> res = final_results(config, run, data, state, best, workdir, wall, history)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import warnings

import jax

from experiments.train import distributed
from experiments.train.build import Run
from experiments.train.evaluate import evaluate_task
from experiments.train.guards import floor_message, strength_summary
from experiments.train.workdir import PREDICTIONS_FILE, config_dict


def strength_limits(config) -> tuple[float | None, float | None]:
  """``(floor, ceiling)`` in nats for the epochs' ``loss_change_signed``: the config's
  ``train.min_loss_change`` (default 0.05, SPEC §1) and ``train.max_loss_change`` (default
  1.0); ``None`` (or an infinite ceiling) switches one off."""
  ceiling = train_option(config, "max_loss_change", 1.0)
  return (train_option(config, "min_loss_change", 0.05),
          None if ceiling is not None and math.isinf(ceiling) else ceiling)


def train_option(config, key, default):
  """``config.train.<key>``, or ``default`` where the config has no such field."""
  train = config.get("train", {}) if hasattr(config, "get") else {}
  return train.get(key, default) if hasattr(train, "get") else default



def final_results(config, run: Run, data, state, best, workdir, wall, history=()) -> dict:
  """The final evaluation as ``results.json`` holds it; also writes the per-sample test (and
  validation) predictions with their labels to ``predictions.npz`` beside it (paired tests
  between runs, e.g. McNemar's, need them).  ``history`` (the epoch rows' lines) gives the
  activation method's ``perturbation_strength``; one below the floor is warned about."""
  preds = {}
  res = evaluate_task(run.predict, state, data, full=True, predictions=preds)
  if distributed.is_main():
    write_predictions(os.path.join(workdir, PREDICTIONS_FILE), preds, data)
  if best is not None:
    res["selected_by_val"] = best
  strength = strength_summary([json.loads(x) for x in history], *strength_limits(config))
  if strength is not None:
    res["perturbation_strength"] = strength
    if strength["below_floor"]:
      warnings.warn(floor_message(strength, run.perturbation), stacklevel=2)
  clipping = clipping_summary(run.clip_norm, [json.loads(x) for x in history])
  if clipping is not None:
    res["gradient_clipping"] = clipping
    if not clipping["steps_clipped"]:
      warnings.warn(
          f"Gradient clipping at max_norm {run.clip_norm:g} never acted in this run: every "
          f"step's gradient norm stayed below it (largest epoch mean "
          f"{clipping['max_epoch_grad_norm']:.3g}), so the run equals plain training under "
          "the method's name. A smaller perturb.clip.max_norm clips.", stacklevel=2)
  res.update({
      "dataset": data.name, "num_train": int(data.num_train), "num_classes": int(data.num_classes),
      "class_names": list(data.class_names), "train_class_counts": data.class_counts().tolist(),
      "steps": int(jax.device_get(state.step)), "config": config_dict(config),
      "devices": [str(x) for x in run.mesh.devices.flat],
      "wall_time_s": wall, "workdir": os.path.abspath(workdir), "code": code_version(),
  })
  return res


def clipping_summary(clip_norm: float | None, rows: list[dict]) -> dict | None:
  """For a run with gradient clipping: the share of its steps clipped (the epoch rows'
  ``clipped``, weighted equally per epoch), whether any was, and the largest epoch-mean
  gradient norm; ``None`` without clipping.

  >>> s = clipping_summary(1.0, [{"clipped": 0.0, "grad_norm": 0.4},
  ...                             {"clipped": 0.5, "grad_norm": 1.2}])
  >>> s["steps_clipped_fraction"], s["steps_clipped"], s["max_epoch_grad_norm"]
  (0.25, True, 1.2)
  """
  if clip_norm is None:
    return None
  clipped = [r["clipped"] for r in rows if r.get("clipped") is not None]
  norms = [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]
  share = float(sum(clipped) / len(clipped)) if clipped else 0.0
  return {"max_norm": clip_norm, "steps_clipped_fraction": round(share, 6),
          "steps_clipped": share > 0, "max_epoch_grad_norm": max(norms, default=float("nan"))}


def write_predictions(path: str, preds: dict, data) -> None:
  """``path`` (``.npz``, written atomically): ``<split>_pred`` for each split in ``preds`` and
  the labels they are scored against (``test_label``, ``val_label``), as int16."""
  import numpy as np
  arrays = {f"{k}_pred": np.asarray(v, np.int16) for k, v in preds.items()}
  arrays["test_label"] = np.asarray(data.y_test, np.int16)
  if "val" in preds:
    arrays["val_label"] = np.asarray(data.y_val, np.int16)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def code_version() -> dict:
  """The git commit of the code that ran (``dirty`` when it had uncommitted changes; ``None``
  outside a git checkout), ``XLA_FLAGS`` and the host CPU (:func:`host_cpu`): every run
  records what produced it.  On XLA:CPU the thread count changes the floating-point sums, and
  XLA compiles for the host's vector instructions, so a rerun matches bit for bit only under
  the same flags on the same kind of CPU.  (Reruns of Fashion-MNIST-LT main-table runs on a
  later session's machine differed from the records in the last digits from the first epoch
  on; which CPU made the records was not recorded then.)"""
  import subprocess
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=here, capture_output=True, text=True, timeout=10,
                            check=True).stdout
  except (OSError, subprocess.SubprocessError):
    commit, status = None, None
  return {"commit": commit, "dirty": None if status is None else bool(status.strip()),
          "xla_flags": os.environ.get("XLA_FLAGS"), "cpu": host_cpu()}


def host_cpu() -> str:
  """The host CPU's model name and its vector extensions (``/proc/cpuinfo``; on other systems
  ``platform.processor()``), e.g. ``'AMD EPYC; avx2 avx512f fma'``."""
  import platform
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or "?"
  field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                            if line.startswith(key)), "")
  flags = sorted(f for f in field("flags").split()
                 if f.startswith(("avx", "fma", "amx")) or f in ("sse4_2", "f16c"))
  return "; ".join(x for x in (field("model name") or platform.processor() or "?",
                               " ".join(flags)) if x)
