"""Figures for :mod:`experiments.report` (matplotlib, Agg backend: no display needed).  Not run
as a doctest: it rewrites a committed suite's figures.

  >>> from experiments.report import load_runs, summarise              # doctest: +SKIP
  >>> runs = load_runs("experiments/results/ablation_fmnist")          # doctest: +SKIP
  >>> write_figures("experiments/results/ablation_fmnist", runs, summarise(runs))  # doctest: +SKIP
  {'accuracy': '.../accuracy.png', 'curves': '.../curves.png', ...}
"""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.train.workdir import replaced_atomically  # noqa: E402

PER_CLASS = ("delta_norm_C", "expansive_share_C")


def _save(fig, root: str, name: str) -> str:
  """Writes ``root/<name>.png`` as a 256-colour palette PNG: a third of matplotlib's RGBA file
  for these line and bar plots, so the committed reports leave room in a device call's carry
  (``experiments.gpu.run_all.carry_size``)."""
  from PIL import Image  # matplotlib's own dependency
  path = os.path.join(root, f"{name}.png")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format="png")
  plt.close(fig)
  buf.seek(0)
  image = Image.open(buf).convert("RGB").quantize(256)
  with replaced_atomically(path) as tmp:  # a kill mid-write must not leave a cut-short PNG
    image.save(tmp, format="PNG", optimize=True)
  return path


def accuracy_bars(root: str, rows: list[dict]) -> str:
  """Mean test accuracy per method with ± std error bars (none for a single seed)."""
  fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.6))
  means = [100 * r["test acc"][0] for r in rows]
  stds = [100 * r["test acc"][1] if r["test acc"][1] == r["test acc"][1] else 0 for r in rows]
  ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
  ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=40, ha="right")
  ax.set_ylabel("test accuracy %")
  lo = min(m - s for m, s in zip(means, stds))
  ax.set_ylim(max(0, lo - 5), min(100, max(m + s for m, s in zip(means, stds)) + 2))
  ax.set_title(f"Test accuracy (mean ± std over {max(r['n'] for r in rows)} seed(s))")
  return _save(fig, root, "accuracy")


def _mean_curve(runs: list[dict], name: str, key: str):
  """``(epochs, mean over seeds)`` of ``key`` per epoch for method ``name`` (None if absent)."""
  curves = [[(h["epoch"], h[key]) for h in r["history"] if h.get(key) is not None]
            for r in runs if r["name"] == name]
  n = min(len(c) for c in curves)
  if n == 0:
    return None
  return [e for e, _ in curves[0][:n]], np.mean([[v for _, v in c[:n]] for c in curves], axis=0)


def learning_curves(root: str, runs: list[dict]) -> str:
  """Training loss (the epoch's mean over its steps: where it flattens, the schedule has
  converged) and test accuracy per epoch, mean over seeds, one line per method."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  for name in dict.fromkeys(r["name"] for r in runs):
    for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "test_accuracy", 100.0)):
      curve = _mean_curve(runs, name, key)
      if curve is not None:
        ax.plot(curve[0], scale * curve[1], marker="o", ms=2, label=name)
  ax_loss.set_ylabel("training loss (epoch mean)")
  ax_loss.set_yscale("log")
  ax_acc.set_ylabel("test accuracy %")
  for ax in (ax_loss, ax_acc):
    ax.set_xlabel("epoch")
  ax_loss.set_title("Training loss (mean over seeds)")
  ax_acc.set_title("Test accuracy (mean over seeds)")
  ax_acc.legend(fontsize=7, ncol=2)
  return _save(fig, root, "curves")


def last_row_per_class(runs: list[dict], name: str) -> dict[str, np.ndarray]:
  """Seed-mean of each per-class diagnostic in the last epoch row of ``metrics.jsonl``."""
  out = {}
  for key in PER_CLASS + ("sign_C",):
    vals = [r["history"][-1][key] for r in runs
            if r["name"] == name and r["history"] and key in r["history"][-1]]
    if vals:
      out[key] = np.mean(np.asarray(vals, float), axis=0)
  return out


def per_class_methods(runs: list[dict]) -> list[str]:
  """Methods whose last epoch logged per-class perturbation diagnostics."""
  return [n for n in dict.fromkeys(r["name"] for r in runs)
          if set(PER_CLASS) <= set(last_row_per_class(runs, n))]


def per_class_plot(root: str, runs: list[dict]) -> str | None:
  """‖δ_c‖ (log scale) and the expansive share per class, last epoch, for each
  activation-level method; classes in training-count order (0 = head for long tail)."""
  names = per_class_methods(runs)
  if not names:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for name in names:
    d = last_row_per_class(runs, name)
    cls = np.arange(len(d["delta_norm_C"]))
    axes[0].plot(cls, np.maximum(d["delta_norm_C"], 1e-8), marker="o", ms=3, label=name)
    axes[1].plot(cls, d["expansive_share_C"], marker="o", ms=3, label=name)
  axes[0].set_yscale("log")
  axes[0].set_title("‖δ_c‖ per class (last epoch)")
  axes[1].set_title("share of samples with ‖a+δ‖ > ‖a‖")
  axes[1].set_ylim(-0.05, 1.05)
  for ax in axes:
    ax.set_xlabel("class")
    ax.set_xticks(cls)
  axes[1].legend(fontsize=7)
  return _save(fig, root, "per_class")


def sensitivity_methods(runs: list[dict]) -> list[str]:
  """Methods whose epoch rows log ``grad_norm_C`` (LPA's class-mean activation gradient)."""
  return [n for n in dict.fromkeys(r["name"] for r in runs)
          if any(h.get("grad_norm_C") is not None for r in runs if r["name"] == n
                 for h in r["history"])]


def sensitivity_plot(root: str, runs: list[dict], max_methods: int = 8) -> str | None:
  """The mechanism over training, one panel per method that logs it (the first
  ``max_methods``): each class's ‖g_c‖ — the norm of the class-mean gradient of the loss at
  the point, the sensitivity LPA's δ acts on — per epoch, mean over seeds, log scale;
  contractive classes (the last epoch's ``sign_C`` −1, first seed) blue, expansive red,
  unsigned grey.  A network that learns a shortcut for its contractive δ shows those classes'
  ‖g_c‖ growing by orders of magnitude."""
  names = sensitivity_methods(runs)[:max_methods]
  if not names:
    return None
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False,
                           sharey=True)
  colour = {-1.0: "tab:blue", 1.0: "tab:red", 0.0: "tab:grey"}
  for ax, name in zip(axes.flat, names):
    epochs, g_ExC = _mean_curve(runs, name, "grad_norm_C")
    first = next(r for r in runs if r["name"] == name)
    sign_C = np.asarray(first["history"][-1].get("sign_C") or np.zeros(g_ExC.shape[1]))
    for c in range(g_ExC.shape[1]):
      ax.plot(epochs, np.maximum(g_ExC[:, c], 1e-6), lw=1,
              color=colour.get(float(sign_C[c]), "tab:grey"))
    ax.set_yscale("log")
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("epoch")
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  axes[0, 0].set_ylabel("‖g_c‖ (blue contractive, red expansive)", fontsize=7)
  return _save(fig, root, "sensitivity")


def point_plot(root: str, rows: list[dict]) -> str | None:
  """Test accuracy vs perturbation point for the methods that carry a ``point``."""
  pts = [r for r in rows if r.get("point")]
  if not pts:
    return None
  fig, ax = plt.subplots(figsize=(5, 3.4))
  means = [100 * r["test acc"][0] for r in pts]
  stds = [100 * r["test acc"][1] if r["test acc"][1] == r["test acc"][1] else 0 for r in pts]
  ax.errorbar(range(len(pts)), means, yerr=stds, marker="o", capsize=3)
  ax.set_xticks(range(len(pts)), [r["point"] for r in pts])
  ax.set_xlabel("perturbation point (shallow → deep)")
  ax.set_ylabel("test accuracy %")
  ax.set_title("Accuracy vs perturbation point")
  return _save(fig, root, "points")


def write_figures(root: str, runs: list[dict], rows: list[dict]) -> dict[str, str]:
  paths = {"accuracy": accuracy_bars(root, rows), "curves": learning_curves(root, runs)}
  for key, path in (("per_class", per_class_plot(root, runs)), ("points", point_plot(root, rows)),
                    ("sensitivity", sensitivity_plot(root, runs))):
    if path is not None:
      paths[key] = path
  return paths


def per_class_table(runs: list[dict]) -> str:
  """Markdown: per class, training count, then sign / ‖δ_c‖ / expansive share of each
  activation-level method (last epoch, seed mean)."""
  names = per_class_methods(runs)
  if not names:
    return ""
  counts = runs[0]["results"].get("train_class_counts", [])
  head = ["class", "train n"] + [f"{n}: sign / ‖δ‖ / exp." for n in names]
  out = ["## Per-class perturbation (last epoch, mean over seeds)", "",
         "Sign +1 = expansive target (positive set), −1 = contractive, 0 = class-agnostic; "
         "‖δ‖ = mean per-sample norm; exp. = share of samples with ‖a+δ‖ > ‖a‖.", "",
         "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  data = {n: last_row_per_class(runs, n) for n in names}
  for c in range(len(data[names[0]]["delta_norm_C"])):
    cells = [str(c), str(counts[c]) if c < len(counts) else "?"]
    for n in names:
      d = data[n]
      sign = f"{d['sign_C'][c]:+.1f}" if "sign_C" in d else "—"
      cells.append(f"{sign} / {d['delta_norm_C'][c]:.3g} / {d['expansive_share_C'][c]:.2f}")
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)
