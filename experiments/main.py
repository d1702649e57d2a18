"""The one entry point: parse flags, log devices, call ``train_and_evaluate``.

  python -m experiments.main --config=experiments/configs/longtail.py:quick --workdir=runs/lt
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/longtail.py:quick",
                                "Config file and variant, e.g. longtail.py:quick.")
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, metrics, results.json. Reruns resume.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
  import jax
  from experiments.configs.common import validate
  from experiments.report import results_table
  from lpa_jax.train.loop import train_and_evaluate
  config = validate(FLAGS.config)
  workdir = FLAGS.workdir or "runs/default"
  print(f"lpa_jax: {jax.device_count()} device(s): {jax.devices()}", flush=True)
  results = train_and_evaluate(config, workdir, progress=FLAGS.progress)
  print(results_table([results]))
  print(f"results: {workdir}/results.json")
  return 0


if __name__ == "__main__":
  app.run(main)
