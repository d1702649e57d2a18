"""The prepared GPU command: every measurement of one GPU window, in one call of ~9 minutes.

    python -m experiments.gpu.run_all --budget_s=520 --out=$OUT
    python -m experiments.gpu.run_all --dry_run --data=tiny.npz --out=/tmp/out   # CPU, tiny

Beside the checkout it needs (made here; experiments/gpu/README.md, "The prepared GPU command"):

    .device_data/cifar10_lt100_jpeg75.npz   python -m experiments.gpu.longtail_paper export
    .device_deps/ (ml-collections)   pip install --no-deps --target .device_deps ml-collections
    .device_data/paper_lt_state.tar.gz      the previous call's state, if any (continued)

and all of it with the working tree within 64 MiB (``--check_carry`` adds it up, here).

It checks those first and refuses in one message, naming what is missing and the command that
makes it, before any phase starts.  Then three phases (:mod:`experiments.gpu.phases`), each
its own process with its share of the budget, so an error, a hang or a kill in one is recorded
and the next still runs:

1. ``throughput`` (35 %): whole-run throughput, ResNet-32 on CIFAR-10 (JPEG-75)-LT, K = 1, 2,
   4, 8 runs as one program, float32 and bfloat16, a whole epoch and the full test set.
2. ``peer`` (15 %): one ResNet-32 train step, plain and LPA (T = 3, the default point), JAX
   against PyTorch, round-robin (:mod:`experiments.gpu.peer`).
3. ``longtail`` (the rest, less :data:`MARGIN_S` for packing): a chunk of the paper table,
   methods CE, LPA, LA, LDAM-DRW, LPL, LA+LPL, LPA+LPL, continuing from the state.

Files in ``--out`` (:data:`OUT_FILES`, at most 8, each under 16 MiB): ``summary.json`` (device,
versions, each phase's wall time, status and error; rewritten after every phase),
``throughput.json``, ``peer.json``, ``longtail.json``, ``paper_lt_state.tar.gz`` (copy it to
``.device_data/`` for the next call), ``report.md`` (the three tables) and ``run_all.log``.
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_FILE = ".device_data/cifar10_lt100_jpeg75.npz"
STATE_FILE = ".device_data/paper_lt_state.tar.gz"
DEPS = ".device_deps"
SHARES = {"throughput": 0.35, "peer": 0.15}  # of the budget; the long tail gets the rest
MARGIN_S = 30.0  # the long tail stops training this long before the end: saving and packing
GRACE_S = 15.0  # past its share, a phase is stopped (its partial file kept)
DRY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what one device call brings back
OUT_FILES = ("summary.json", "throughput.json", "peer.json", "longtail.json",
             "paper_lt_state.tar.gz", "report.md", "run_all.log")
PHASE_FILES = {"throughput": "throughput.json", "peer": "peer.json", "longtail": "longtail.json"}
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections",
            "torch")
CARRY = (".device_data", DEPS)  # git-ignored: what the run call carries beside the checkout
MAX_CARRY = 64 * 2**20  # what one device call takes along: the working tree and CARRY
# Room for the long tail's packed state once a call has returned one (three ResNet-32 runs in
# progress measured 10.1-10.2 MiB on CPU) when it is not there yet.
STATE_ALLOWANCE = 11 * 2**20
# Likewise for the data file (the jpeg encoding measured 19.8 MiB) and ml-collections (0.4 MiB).
DATA_ALLOWANCE, DEPS_ALLOWANCE = 20.5 * 2**20, 1 * 2**20
NEEDED = {"ml_collections": f"pip install --no-deps --target {DEPS} ml-collections",
          "jax": "pip install jax (the GPU image has it)", "flax": "pip install flax",
          "optax": "pip install optax", "orbax.checkpoint": "pip install orbax-checkpoint"}


def _print(msg: str, log=None) -> None:
  print(msg, flush=True)
  if log is not None:
    log.write(msg + "\n")
    log.flush()


def write_json_atomic(path: str, obj) -> None:
  """Readers (and a kill) see the old file or the whole new one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def _deps_on_path() -> str | None:
  deps = os.path.join(REPO, DEPS)
  if os.path.isdir(deps) and deps not in sys.path:
    sys.path.insert(0, deps)
  return deps if os.path.isdir(deps) else None


def _encodings(path: str) -> set[str]:
  """The image encodings of a portable data file (``loco``, ``jpeg``); empty if unreadable.
  (``experiments.data.portable.read_header`` reads the same header, but importing lpa_jax imports
  JAX, and the preflight must report a missing JAX, not fail on it.)"""
  import numpy as np
  try:
    with np.load(path) as z:
      return set(json.loads(z["header"].tobytes().decode()).get("encoding", {}).values())
  except (OSError, ValueError, KeyError):
    return set()


def preflight(args) -> list[str]:
  """What is missing, each with the command that makes it; empty when everything is there."""
  problems = []
  if not os.path.isfile(args.data):
    problems.append(f"the data file {args.data} is missing: make it where the CIFAR-10 "
                    "(JPEG-75) cache is with `python -m experiments.gpu.longtail_paper export` "
                    "and carry .device_data/ beside the checkout")
  deps = _deps_on_path()
  needed = dict(NEEDED)
  if os.path.isfile(args.data) and "jpeg" in _encodings(args.data):
    needed["PIL"] = ("pip install pillow (the GPU image has it), or export the data with "
                     "--encoding=loco")
  for module, fix in needed.items():
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
      found = False
    if not found:
      where = f"{DEPS}/ is on the path" if deps else f"no {DEPS}/ beside the checkout"
      problems.append(f"{module} is not importable ({where}): make it with `{fix}`")
  if args.state and os.path.exists(args.state):
    import tarfile
    if not tarfile.is_tarfile(args.state):
      problems.append(f"the state {args.state} is not a tar file: remove it to start the "
                      "table afresh, or copy the paper_lt_state.tar.gz a call returned")
  return problems


def _tree_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def carry_size(repo: str = REPO) -> dict:
  """What a device call would take along (run here, before the call): the files git sees
  (tracked, and untracked ones it does not ignore) and the carried folders, in bytes, against
  :data:`MAX_CARRY`; allowances stand in for the data, deps and state not made yet, so the
  check also runs in a fresh clone (``tests/test_run_all.py`` does: the committed tree must
  leave room for them).

  >>> sorted(carry_size())   # "ok": whether the total fits the limit
  ['limit', 'ok', 'parts', 'total']
  """
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=repo, capture_output=True, check=True).stdout.decode()
  tree = sum(os.path.getsize(os.path.join(repo, f)) for f in listed.split("\0")
             if f and os.path.isfile(os.path.join(repo, f)))
  parts = {"working tree": tree}
  parts.update({c: _tree_bytes(os.path.join(repo, c)) for c in CARRY
                if os.path.exists(os.path.join(repo, c))})
  for path, name, allowance in ((DATA_FILE, "data to come", DATA_ALLOWANCE),
                                (DEPS, "deps to come", DEPS_ALLOWANCE),
                                (STATE_FILE, "state to come", STATE_ALLOWANCE)):
    if not os.path.exists(os.path.join(repo, path)):
      parts[name] = int(allowance)
  total = sum(parts.values())
  return dict(parts=parts, total=total, limit=MAX_CARRY, ok=total <= MAX_CARRY)


def versions() -> dict:
  """Installed versions (``None``: not installed), read without importing anything."""
  out = {}
  for name in VERSIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def gpu_info() -> str | None:
  """``nvidia-smi``'s one-line description of the GPUs, if there is one."""
  if shutil.which("nvidia-smi") is None:
    return None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def child_env(phase: str, dry_run: bool = False) -> dict:
  """The children's environment: the checkout and .device_deps importable, unbuffered output;
  in the peer phase JAX leaves GPU memory for torch; a dry run compiles without XLA's
  expensive optimisations (its times mean nothing; 2-3x faster compiles on 2 cores)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if dry_run:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DRY_XLA_FLAGS}".strip()
  deps = os.path.join(REPO, DEPS)
  paths = [REPO] + ([deps] if os.path.isdir(deps) else []) + [env.get("PYTHONPATH", "")]
  env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
  if phase == "peer":
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  return env


def _pump(stream, name: str, log, tail) -> None:
  for line in stream:
    line = line.rstrip("\n")
    tail.append(line)
    _print(f"[{name}] {line}", log)


def _stop(proc) -> None:
  """SIGTERM to the phase's own process group (it was started in a new session), then
  SIGKILL if it is still there after 5 s."""
  for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
    try:
      os.killpg(proc.pid, sig)
      proc.wait(timeout=wait)
      return
    except ProcessLookupError:
      return
    except subprocess.TimeoutExpired:
      continue


def run_phase(name: str, cmd: list[str], timeout_s: float, log=None, env=None) -> dict:
  """Runs one phase's process, its output streamed to stdout and ``log``; ``{status: ok /
  error / timeout, rc, wall_s, error, output_tail}``.

  >>> run_phase("x", [sys.executable, "-c", "raise SystemExit('no data')"], 30)["error"]
  [x] no data
  'no data'
  """
  t0, tail = time.time(), collections.deque(maxlen=30)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=REPO, start_new_session=True)
  pump = threading.Thread(target=_pump, args=(proc.stdout, name, log, tail), daemon=True)
  pump.start()
  try:
    rc, status, error = proc.wait(timeout=max(1.0, timeout_s)), None, None
  except subprocess.TimeoutExpired:
    _stop(proc)
    rc, status, error = proc.returncode, "timeout", f"stopped after {timeout_s:.0f} s"
  pump.join(timeout=10)
  if status is None:
    status = "ok" if rc == 0 else "error"
    lines = [ln for ln in tail if ln.strip()]
    error = None if rc == 0 else (lines[-1].strip() if lines else f"exit status {rc}")
  return dict(status=status, rc=rc, wall_s=time.time() - t0, error=error,
              output_tail=None if status == "ok" else list(tail)[-12:])


def outcome(record: dict, path: str, started: float | None = None) -> dict:
  """A phase's record completed from the file it wrote: its own ``phase`` status (``ok``,
  ``partial``, ``skipped``) when it exited cleanly, or when it was stopped at its limit after
  writing that file during this call (``started``: the phase's start time; then
  ``stopped_after_writing`` is set); an error if it wrote nothing."""
  result = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      record.update(status="error", error=f"{path} unreadable: {e}")
  if (record["status"] == "timeout" and result is not None and started is not None
      and os.path.getmtime(path) >= started
      and result.get("phase", {}).get("status") in ("ok", "skipped")
      and result.get("finished", True)):
    # It had finished its work; only its exit (interpreter teardown) ran over.
    record.update(status="ok", error=None, stopped_after_writing=True)
  record["file"] = os.path.basename(path) if result is not None else None
  if record["status"] == "ok":
    if result is None:
      record.update(status="error", error=record.get("error") or f"wrote no {path}")
    else:
      record.update(status=result["phase"]["status"], reason=result["phase"].get("reason"))
  return record


def phase_command(name: str, args, end_at: float) -> list[str]:
  """The child command of phase ``name``."""
  cmd = [sys.executable, "-m", "experiments.gpu.phases", name, "--out", args.out]
  cmd += ["--dry_run"] if args.dry_run else []
  if name == "longtail":
    cmd += ["--end_at", f"{end_at:.1f}", "--data", args.data, "--root", args.root]
    return cmd + (["--state", args.state] if args.state else [])
  cmd += ["--budget_s", f"{SHARES[name] * args.budget_s:.1f}"]
  return cmd + (["--data", args.data] if name == "throughput" else [])


def _device(summary: dict, out: str) -> None:
  """The device as the phases saw it (JAX's and torch's names), once one has said."""
  for name in ("throughput", "peer"):
    path = os.path.join(out, PHASE_FILES[name])
    if not os.path.exists(path):
      continue
    with open(path) as f:
      result = json.load(f)
    machine = result.get("machine") or result.get("jax") or {}
    summary["device"].update({k: machine[k] for k in ("devices", "device_kind", "backend")
                              if k in machine})
    if result.get("torch"):
      summary["device"]["torch"] = result["torch"]


def tidy(out: str) -> dict:
  """Removes temp files of killed writers; ``{files: {name: bytes}, ok, problems}``."""
  for name in os.listdir(out):
    if ".tmp" in name:
      os.remove(os.path.join(out, name))
  files = {n: os.path.getsize(os.path.join(out, n)) for n in sorted(os.listdir(out))}
  problems = [f"{n}: {b} bytes > {MAX_BYTES}" for n, b in files.items() if b > MAX_BYTES]
  if len(files) > MAX_FILES:
    problems.append(f"{len(files)} files > {MAX_FILES}")
  return dict(files=files, ok=not problems, problems=problems)


def write_report(out: str, summary: dict) -> None:
  """``report.md``: the phases' status and each phase's table, from the files they wrote."""
  d = summary["device"]
  torch = d.get("torch") or {}
  lines = ["# GPU window: experiments.gpu.run_all", "",
           f"Device: {d.get('device_kind')} {d.get('devices')} (nvidia-smi: {d.get('nvidia_smi')})"
           f"; jax {summary['versions'].get('jax')}, torch {torch.get('torch')} on "
           f"{torch.get('device_name')}", "",
           "| phase | status | wall s | error / reason |", "|---|---|---|---|"]
  for name, p in summary["phases"].items():
    lines.append(f"| {name} | {p['status']} | {p.get('wall_s', 0):.0f} | "
                 f"{p.get('error') or p.get('reason') or ''} |")
  for name, path in PHASE_FILES.items():
    if os.path.exists(os.path.join(out, path)):
      with open(os.path.join(out, path)) as f:
        lines += ["", f"## {name}", "", json.load(f).get("markdown", "")]
  with open(os.path.join(out, "report.md.tmp"), "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(os.path.join(out, "report.md.tmp"), os.path.join(out, "report.md"))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.gpu.run_all",
                              description=__doc__.splitlines()[0])
  p.add_argument("--budget_s", type=float, default=520.0, help="the whole call, in seconds")
  p.add_argument("--out", help="where the files go (the folder that comes back; required)")
  p.add_argument("--data", default=DATA_FILE, help="the portable data file")
  p.add_argument("--state", default=STATE_FILE, help="the long tail's state, if it exists")
  p.add_argument("--root", default="/tmp/paper_longtail_cifar10",
                 help="the long tail's runs during the call (replaced; never under --out)")
  p.add_argument("--phases", default="throughput,peer,longtail",
                 help="comma list of throughput, peer, longtail, run in that order")
  p.add_argument("--dry_run", action="store_true",
                 help="CPU: tiny sizes (experiments.gpu.phases.DRY), same phases and files")
  p.add_argument("--check_carry", action="store_true",
                 help="here, before the device call: what it would carry (working tree, "
                      f"{', '.join(CARRY)}) against the {MAX_CARRY // 2**20} MiB limit; no run")
  args = p.parse_args(argv)
  unknown = set(args.phases.split(",")) - set(PHASE_FILES)
  if unknown:
    p.error(f"--phases: unknown {sorted(unknown)}; known: {', '.join(PHASE_FILES)}")
  if not args.out and not args.check_carry:
    p.error("--out is required (the folder that comes back)")
  return args


def check_carry() -> int:
  """Prints :func:`carry_size`; 0 when it fits, 2 when the call would be refused."""
  size = carry_size()
  mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
  print("carry: " + ", ".join(f"{k} {mib(v)}" for k, v in size["parts"].items())
        + f"; total {mib(size['total'])} of {mib(size['limit'])}")
  missing = [c for c in CARRY if c not in size["parts"]]
  if missing:
    print(f"carry: missing {', '.join(missing)} (see the module docstring for the commands)")
  if not size["ok"]:
    print("carry: too large for one device call: remove untracked files or a stale state in "
          ".device_data/, export the data with --encoding=jpeg, or commit fewer bytes")
  return 0 if size["ok"] and not missing else 2


def main(argv=None) -> int:
  t0, args = time.time(), parse_args(argv)
  if args.check_carry:
    return check_carry()
  os.makedirs(args.out, exist_ok=True)
  summary = dict(command=["python -m experiments.gpu.run_all"] + list(argv or sys.argv[1:]),
                 dry_run=args.dry_run, budget_s=args.budget_s, started=time.ctime(t0),
                 device=dict(nvidia_smi=gpu_info()), versions=versions(), phases={},
                 inputs=dict(data=args.data, state=args.state if args.state and
                             os.path.exists(args.state) else None), status="running")
  problems = preflight(args)
  summary["versions"] = versions()  # again: .device_deps is on the path now
  path = os.path.join(args.out, "summary.json")
  if problems:
    summary.update(status="refused", problems=problems, wall_s=time.time() - t0)
    write_json_atomic(path, summary)
    print("run_all: cannot start, nothing was run:\n  " + "\n  ".join(problems), flush=True)
    return 2
  with open(os.path.join(args.out, "run_all.log"), "a") as log:
    _print(f"run_all: budget {args.budget_s:.0f} s, out {args.out}, versions "
           f"{summary['versions']}, gpu {summary['device']['nvidia_smi']}", log)
    end_at = t0 + args.budget_s - MARGIN_S
    for name in args.phases.split(","):
      share = (SHARES[name] * args.budget_s + GRACE_S if name in SHARES
               else t0 + args.budget_s - 3.0 - time.time())
      _print(f"run_all: phase {name} (up to {share:.0f} s; {time.time() - t0:.0f} s elapsed)",
             log)
      started = time.time()
      record = run_phase(name, phase_command(name, args, end_at), share, log,
                         child_env(name, args.dry_run))
      record["limit_s"] = share
      summary["phases"][name] = outcome(record, os.path.join(args.out, PHASE_FILES[name]),
                                        started)
      _device(summary, args.out)
      summary["wall_s"] = time.time() - t0
      write_json_atomic(path, summary)
      _print(f"run_all: phase {name}: {record['status']} in {record['wall_s']:.0f} s"
             + (f" ({record.get('error') or record.get('reason')})"
                if record['status'] != "ok" else ""), log)
  write_report(args.out, summary)
  summary.update(outputs=tidy(args.out), status="done", wall_s=time.time() - t0)
  write_json_atomic(path, summary)
  summary["outputs"] = tidy(args.out)  # summary.json's own final size
  write_json_atomic(path, summary)
  _print(f"run_all: done in {summary['wall_s']:.0f} s; files {summary['outputs']['files']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
