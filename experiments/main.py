"""The one entry point: parse flags, log devices, call ``train_and_evaluate``.

  python -m experiments.main --config=experiments/configs/longtail.py:quick --workdir=runs/lt

Several hosts: run the same command on each, adding ``--distributed`` (TPU slices, SLURM) or
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I``.

A work dir belongs to one config: rerunning it with different values stops with the fields
that differ; ``--fresh`` deletes that run and starts afresh; a work dir another process is
training in is refused, naming it.  Ctrl-C, at any moment, says in one line what was saved and
exits with status 130; SIGTERM (a scheduler preempting the job) does the same with status 143.
During training either stops at the next step with a checkpoint; after the last step it leaves
``results.json`` unwritten (a rerun evaluates the saved checkpoint).  Errors the user can fix
(a bad value, a refusal, a full disk) print one message and exit 1; ``--traceback`` shows their
traceback too.
"""
from __future__ import annotations

from experiments import cli

# First of all: a Ctrl-C (SIGTERM) during the imports below already exits 130 (143) in one line.
cli.exit_on_interrupt(lambda: cli.saved_note(_workdir()))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config("experiments/configs/longtail.py:quick",
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
flags.DEFINE_bool("traceback", False, "Show the traceback of errors that otherwise print one "
                  "message (bad values, refusals, a full disk).")


def _workdir() -> str | None:
  return (FLAGS.workdir or "runs/default") if FLAGS.is_parsed() else None


def run(config, workdir: str, progress: bool, fresh: bool) -> int:
  import jax
  from experiments.configs.common import validate
  from experiments.report import results_table
  from experiments.train.loop import train_and_evaluate
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
  cli.one_line_warnings()
  if FLAGS.distributed or FLAGS.coordinator_address:  # before anything starts a JAX backend
    from experiments.train.distributed import initialize
    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  workdir = _workdir()
  return cli.run_guarded(lambda: run(FLAGS.config, workdir, FLAGS.progress, FLAGS.fresh),
                         FLAGS.traceback, lambda: cli.saved_note(workdir))

if __name__ == "__main__":
  app.run(main)
