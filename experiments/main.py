"""The one entry point: parse flags, log devices, call ``train_and_evaluate``.

  python -m experiments.main --config=experiments/configs/longtail.py:quick --workdir=runs/lt

Several hosts: run the same command on each, adding ``--distributed`` (TPU slices, SLURM) or
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I``.

A work dir belongs to one config: rerunning it with different values stops with the fields
that differ; ``--fresh`` deletes that run and starts afresh.  Ctrl-C saves a checkpoint, says
so in one line and exits with status 130.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/longtail.py:quick",
                                "Config file and variant, e.g. longtail.py:quick.")
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, metrics, results.json. Reruns resume.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("fresh", False, "Delete the run already in --workdir (checkpoints, metrics, "
                  "results) and start afresh, even if it was made with another config.")
flags.DEFINE_bool("distributed", False, "Join a multi-process run (jax.distributed): on a TPU "
                  "slice, under SLURM or Open MPI the processes are found automatically; "
                  "elsewhere give the three flags below (every process, same command).")
flags.DEFINE_string("coordinator_address", None, "Process 0's host:port (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a --distributed run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


def run(config, workdir: str, progress: bool, fresh: bool) -> int:
  import jax
  from experiments.configs.common import validate
  from experiments.report import results_table
  from lpa_jax.train.loop import train_and_evaluate
  config = validate(config)
  main_process = jax.process_index() == 0
  if main_process:
    print(f"lpa_jax: {jax.device_count()} device(s) over {jax.process_count()} process(es): "
          f"{jax.devices()}", flush=True)
  results = train_and_evaluate(config, workdir, progress=progress, fresh=fresh)
  if main_process:  # every process trained; process 0 wrote the files
    print(results_table([results]))
    print(f"results: {workdir}/results.json")
  return 0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
  if FLAGS.distributed or FLAGS.coordinator_address:  # before anything starts a JAX backend
    from lpa_jax.train.distributed import initialize
    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    return run(FLAGS.config, FLAGS.workdir or "runs/default", FLAGS.progress, FLAGS.fresh)
  except KeyboardInterrupt as e:
    print(f"\n{e or 'Interrupted before training started; nothing was saved.'}",
          file=sys.stderr, flush=True)
    sys.exit(130)
  except Exception as e:  # noqa: BLE001 - errors with their own message; the rest re-raise
    message = user_error(e)
    if message is None:
      raise
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def user_error(e: Exception) -> str | None:
  """The one message to show for an error whose cause the user can fix, else None."""
  from lpa_jax.train.checkpoint import CheckpointMismatch, NoUsableCheckpoint
  from lpa_jax.train.workdir import ConfigMismatch, disk_full
  cause = disk_full(e)
  if cause is not None:
    # A full disk fails deep inside orbax or the writers, under hundreds of lines of
    # traceback: say what happened, and only that.
    return (f"Error: no space left on device while writing the run ({cause}). Free space "
            "and rerun the same command: it resumes from the last checkpoint.")
  if isinstance(e, (ConfigMismatch, CheckpointMismatch, NoUsableCheckpoint)):
    return f"Error: {e}"  # says what differs and what to do; a traceback would bury it
  return None

if __name__ == "__main__":
  app.run(main)
