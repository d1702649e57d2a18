"""Results tables (Markdown) from ``results.json`` dicts."""
from __future__ import annotations


def method_name(config: dict) -> str:
  """``activation+logit+gradient``, leaving out the levels that are off."""
  p = config.get("perturb", {})
  parts = [p.get(k, "none") for k in ("activation", "logit", "gradient")]
  parts = [x for x in parts if x != "none"]
  return "+".join(parts) if parts else "ce"


def _pct(x) -> str:
  return "—" if x is None or x != x else f"{100 * x:.2f}"


def results_table(results: list[dict]) -> str:
  """One row per run: method, dataset, overall accuracy and the task's breakdown."""
  rows = ["| method | dataset | train imgs | test acc % | breakdown | wall s |",
          "|---|---|---|---|---|---|"]
  for r in results:
    extra = []
    if "shot_accuracy" in r:
      extra.append("many/med/few " + "/".join(_pct(r["shot_accuracy"][k])
                                             for k in ("many", "medium", "few")))
    if "val_accuracy" in r:
      extra.append(f"val {_pct(r['val_accuracy'])}")
    if "train_clean_label_accuracy" in r:
      extra.append(f"train clean-label {_pct(r['train_clean_label_accuracy'])}")
    rows.append(f"| {method_name(r.get('config', {}))} | {r.get('dataset', '?')} | "
                f"{r.get('num_train', '?')} | {_pct(r.get('test_accuracy'))} | "
                f"{'; '.join(extra) or '—'} | {r.get('wall_time_s', 0):.0f} |")
  return "\n".join(rows)
