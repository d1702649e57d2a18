"""The benchmark's rows, target checks and Markdown tables (also read by ``experiments.fill``).
Not run as a doctest: it needs a benchmark's timings.

>>> rows = make_rows(configs, timed, frac)            # doctest: +SKIP
>>> print(markdown(rows))                             # doctest: +SKIP
| method | level | point | T | ms/step | ratio | cost model | F_up/F | XLA GFLOP/step | note |
"""
from __future__ import annotations

import os
import platform
import statistics

import jax

from experiments.bench.flops import cost_model, flop_check

TARGET_LAST_STAGE = 1.10
TARGET_MODEL_TOL = 0.15


def make_rows(configs, timed, frac) -> list[dict]:
  """Table rows; ``ratio`` is the median over rounds of (row time / plain time that round)."""
  plain = timed[0]["times_ms"]
  rows = []
  for c, t in zip(configs, timed):
    ms = t["times_ms"]
    ratios = [a / b for a, b in zip(ms, plain)] if ms and plain else []
    f_up = frac.get(c.point) if c.method == "lpa" else None
    rows.append(dict(
        method=c.method, level=c.level, point=c.point, T=c.T,
        ms=statistics.median(ms) if ms else None,
        ratio=statistics.median(ratios) if ratios else None,
        model_ratio=cost_model(c.T, f_up) if f_up is not None else None,
        flop_fraction_above=f_up, step_gflops=t["gflops"], timed_model=None, times_ms=ms,
        compile_s=t["compile_s"], note=t["note"]))
  return rows


def markdown(rows) -> str:
  """The results table; a ``timed model`` column appears when a row carries one."""
  f = lambda v, fmt: "" if v is None else format(v, fmt)
  timed = any(r.get("timed_model") for r in rows)
  out = ["| method | level | point | T | ms/step | ratio | cost model | F_up/F | XLA GFLOP/step | "
         + ("timed model | " if timed else "") + "note |",
         "|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else "") + "---|"]
  for r in rows:
    out.append(f"| {r['method']} | {r['level']} | {r['point'] or ''} | {r['T'] or ''} | "
               f"{f(r['ms'], '.1f')} | {f(r['ratio'], '.3f')} | {f(r['model_ratio'], '.3f')} | "
               f"{f(r['flop_fraction_above'], '.4f')} | {f(r['step_gflops'], '.1f')} | "
               + (f"{f(r.get('timed_model'), '.3f')} | " if timed else "") + f"{r['note'] or ''} |")
  return "\n".join(out)


def _within(lpa_rows, key: str, target: str) -> dict:
  """A check that every row's measured ratio lies within ``TARGET_MODEL_TOL`` of ``row[key]``."""
  bad = [r for r in lpa_rows if abs(r["ratio"] / r[key] - 1) > TARGET_MODEL_TOL]
  return dict(target=target, ok=not bad if lpa_rows else None,
              detail="; ".join(f"{r['point']} T={r['T']}: {r['ratio']:.2f} vs {r[key]:.2f}"
                               for r in bad) or f"{len(lpa_rows)} rows")


def check(rows, last_stage: str, gflops_forward: float | None = None) -> list[dict]:
  """The benchmark's targets, as ``[{target, ok, detail}]`` (``ok`` None: not run).

  LPA T=3 at the last stage within ``TARGET_LAST_STAGE`` of plain; every LPA row within
  ``TARGET_MODEL_TOL`` of the cost model; and, with ``gflops_forward`` (F per device, in
  GFLOP) and counted step FLOPs, the FLOP check of :func:`experiments.bench.flops.flop_check`.

  >>> lpa_row_stage3_T3 = dict(method="lpa", point="stage3", T=3, ratio=1.08, model_ratio=1.10)
  >>> [c["ok"] for c in check([lpa_row_stage3_T3], "stage3")]   # measured vs plain, vs model
  [True, True]
  """
  lpa = [r for r in rows if r["method"] == "lpa" and r["ratio"] is not None]
  last = [r for r in lpa if r["point"] == last_stage and r["T"] == 3]
  out = [
      dict(target=f"LPA T=3 at {last_stage} <= {TARGET_LAST_STAGE:.2f}x plain",
           ok=last[0]["ratio"] <= TARGET_LAST_STAGE if last else None,
           detail=f"{last[0]['ratio']:.3f}x" if last else "row not run"),
      _within(lpa, "model_ratio", f"every LPA row within {TARGET_MODEL_TOL:.0%} of the cost model")]
  flop = flop_check(rows, gflops_forward)
  return out + ([flop] if flop else [])


def add_timed_model(result: dict) -> None:
  """With a decomposition, each LPA row gets ``timed_model = 1 + T·t_PGD(point)/t_plain``:
  the cost model with the pieces' measured times in place of their FLOPs, and a check of the
  rows against it -- LPA costs what its pieces cost, whatever their time per FLOP."""
  pieces = {r["piece"]: r["ms"] for r in result.get("decomposition") or []}
  plain = pieces.get("plain train step")
  if not plain:
    return
  for r in result["rows"]:
    if r["method"] == "lpa":
      t_pgd = pieces.get(f"PGD step at {r['point']}", 0.0)
      r["timed_model"] = 1.0 + r["T"] * t_pgd / plain
  lpa = [r for r in result["rows"] if r["method"] == "lpa" and r["ratio"] is not None
         and r.get("timed_model")]
  result["checks"] = [c for c in result["checks"] if "timed pieces" not in c["target"]] + [
      _within(lpa, "timed_model", f"every LPA row within {TARGET_MODEL_TOL:.0%} of the cost "
              "model with timed pieces (1 + T*t_PGD/t_plain, --decompose)")]


def decomposition_markdown(rows) -> str:
  out = ["| piece | cost-model FLOPs | GFLOP | ms | ms per GFLOP |", "|---|---|---|---|---|"]
  out += [f"| {r['piece']} | {r['model_flops']} | {r['gflops']:.2f} | {r['ms']:.2f} | "
          f"{r['ms_per_gflop']:.3f} |" for r in rows]
  return "\n".join(out)


def fractions_markdown(fractions: dict, target: float) -> str:
  """F_up/F of every point the run counted, and the inner (block) point closest to ``target``.

  >>> print(fractions_markdown({"stage3.block3": 0.067, "stage3": 0.0}, 0.09))
  | point | F_up/F | cost model T=3 |
  |---|---|---|
  | stage3.block3 | 0.0670 | 1.134 |
  | stage3 | 0.0000 | 1.000 |
  <BLANKLINE>
  Closest to F_up/F = 0.09 (the published +18 % at T = 3): stage3.block3.
  """
  out = ["| point | F_up/F | cost model T=3 |", "|---|---|---|"]
  out += [f"| {p} | {f:.4f} | {cost_model(3, f):.3f} |" for p, f in fractions.items()]
  inner = [p for p in fractions if "." in p]
  if not inner:
    return "\n".join(out)
  best = min(inner, key=lambda p: abs(fractions[p] - target))
  return "\n".join(out) + (f"\n\nClosest to F_up/F = {target:g} (the published +18 % at T = 3): "
                           f"{best}.")


def cpu_name() -> str:
  lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
  names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
  return names[0] if names else platform.processor()


def machine_info(mesh) -> dict:
  import flax
  import optax
  return dict(platform=platform.platform(), processor=cpu_name(),
              python=platform.python_version(), cpu_count=os.cpu_count(),
              cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else None, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind, mesh_devices=int(mesh.devices.size),
              jax=jax.__version__, flax=flax.__version__, optax=optax.__version__)
