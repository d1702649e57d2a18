"""Host-side evaluation metrics: overall, per-class, long-tail shots, per-domain, noisy labels."""
from __future__ import annotations

import numpy as np

SHOT_BOUNDS = (100, 20)  # many: > 100 training images, medium: 20-100, few: < 20


def accuracy(pred, labels) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(labels))) if len(labels) else float("nan")


def per_class_accuracy(pred, labels, num_classes: int) -> list[float]:
  pred, labels = np.asarray(pred), np.asarray(labels)
  return [accuracy(pred[labels == c], labels[labels == c]) for c in range(num_classes)]


def shot_accuracy(per_class, train_counts) -> dict[str, float]:
  """Mean per-class accuracy over many- / medium- / few-shot classes (balanced test set)."""
  acc, counts = np.asarray(per_class, float), np.asarray(train_counts)
  groups = {"many": counts > SHOT_BOUNDS[0],
            "medium": (counts <= SHOT_BOUNDS[0]) & (counts >= SHOT_BOUNDS[1]),
            "few": counts < SHOT_BOUNDS[1]}
  return {k: float(np.nanmean(acc[m])) if m.any() else float("nan") for k, m in groups.items()}


def noisy_label_metrics(pred_train, y_noisy, y_clean, noise_mask) -> dict[str, float]:
  """How the model treats its own (noisy) training set."""
  pred, mask = np.asarray(pred_train), np.asarray(noise_mask, bool)
  return {
      "train_clean_label_accuracy": accuracy(pred, y_clean),
      "train_noisy_subset_clean_accuracy": accuracy(pred[mask], np.asarray(y_clean)[mask]),
      "train_noisy_subset_memorised": accuracy(pred[mask], np.asarray(y_noisy)[mask]),
      "train_clean_subset_accuracy": accuracy(pred[~mask], np.asarray(y_clean)[~mask]),
      "observed_noise_rate": float(mask.mean()),
  }


def per_domain_accuracy(pred, labels, domains, names) -> dict[str, float]:
  """Accuracy per domain, keyed by the domain's name."""
  domains, labels = np.asarray(domains), np.asarray(labels)
  return {names[int(k)]: accuracy(pred[domains == k], labels[domains == k])
          for k in np.unique(domains)}


def evaluate_task(predict, state, data, full: bool = True, predictions: dict | None = None
                  ) -> dict:
  """Test accuracy, per-class accuracy and the task's breakdowns (long-tail shots, in-domain
  validation, per-domain, noisy-label memorisation); ``full=False`` skips the costly ones.
  ``predictions``, when given, receives the per-sample predicted labels (``test``, and
  ``val`` when the task has a validation split), e.g. for paired tests between runs.

  ``predict(state, uint8_images) -> labels`` (see :func:`experiments.train.build.make_predict`).

  Not run as a doctest: it needs a trained run and its data.

  >>> evaluate_task(run.predict, state, data)["test_accuracy"]   # doctest: +SKIP
  0.71
  """
  pred = predict(state, data.x_test)
  out = {"test_accuracy": accuracy(pred, data.y_test),
         "per_class_accuracy": per_class_accuracy(pred, data.y_test, data.num_classes)}
  counts = data.class_counts()
  if counts.max() > 2 * max(counts.min(), 1):
    out["shot_accuracy"] = shot_accuracy(out["per_class_accuracy"], counts)
  pred_val = predict(state, data.x_val) if data.x_val is not None else None
  if pred_val is not None:
    out["val_accuracy"] = accuracy(pred_val, data.y_val)
  if predictions is not None:
    predictions.update(test=np.asarray(pred), **({} if pred_val is None else
                                                 {"val": np.asarray(pred_val)}))
  extras = data.extras
  if full and "noise_mask" in extras:
    out.update(noisy_label_metrics(predict(state, data.x_train), data.y_train,
                                   extras["y_train_clean"], extras["noise_mask"]))
  if full and "train_domain" in extras and pred_val is not None:
    out["val_domain_accuracy"] = per_domain_accuracy(
        pred_val, data.y_val, extras["val_domain"], extras["domain_names"])
  return out
