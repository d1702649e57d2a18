"""A work dir belongs to one config: recorded in ``config.json``, checked on every rerun.

Also the atomic JSON writer every "finished" file goes through (temp file + rename, no NaN).

  >>> import tempfile
  >>> workdir = tempfile.mkdtemp()                   # e.g. "runs/lt"
  >>> config, other_config = {"optim": {"lr": 0.1}}, {"optim": {"lr": 0.05}}
  >>> claim(workdir, config)            # first run: records the config
  >>> claim(workdir, other_config)      # ConfigMismatch naming the fields
  Traceback (most recent call last):
  experiments.train.workdir.ConfigMismatch: Work dir ... holds a run of a different config:
    optim.lr: 0.1 (recorded) -> 0.05 (now)
  Use another --workdir, or pass --fresh to delete that run and start afresh here.
  >>> claim(workdir, other_config, fresh=True)   # old run deleted
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil

CONFIG_FILE = "config.json"
PREDICTIONS_FILE = "predictions.npz"
STOPPED_FILE = "stopped.json"  # a sweep's record of a run one of the trainer's guards stopped
# Files and dirs a run writes (and STOPPED_FILE); ``fresh`` deletes exactly these (a sweep's
# method.json, which labels the run dir, stays).
RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "results.json", PREDICTIONS_FILE,
             STOPPED_FILE, CONFIG_FILE)
# Fields that change where things are kept or how often, never what is trained.
IGNORED_FIELDS = ("data.cache_dir", "train.checkpoint_every")


class ConfigMismatch(ValueError):
  """A work dir holds a run of a different config; ``detail`` lists the differing fields (empty
  when the work dir has checkpoints but no recorded config)."""

  def __init__(self, message: str, workdir: str = "", detail: str = ""):
    super().__init__(message)
    self.workdir, self.detail = workdir, detail


def finite_json(obj):
  """``obj`` with every NaN / inf float replaced by ``None`` (JSON has no NaN).

  >>> finite_json({"a": [1.0, float("nan")]})
  {'a': [1.0, None]}
  """
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def write_json_atomic(path: str, obj, indent: int | None = 1) -> None:
  """Writes ``obj`` as JSON to ``path`` so readers see the old file or the whole new one,
  never half of it; non-finite floats become ``null``."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(finite_json(obj), f, indent=indent, allow_nan=False, default=list)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def replaced_atomically(path: str):
  """Yields a temporary name beside ``path`` to write the new file to, which then replaces
  ``path`` in one rename: a reader, or a kill mid-write, sees the old file or the whole new
  one, never one cut short.  The name is one :func:`remove_leftovers` cleans up after a kill;
  a writer that picks the format by the extension must be told it (``format="png"``).

  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "report.md")   # e.g. "runs/lt/report.md"
  >>> with replaced_atomically(path) as tmp:
  ...   _ = open(tmp, "w").write("# Report")
  >>> open(path).read(), os.listdir(os.path.dirname(path))
  ('# Report', ['report.md'])
  """
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_json(path: str):
  """The JSON in ``path``; ``ValueError`` naming the file when it is not valid JSON."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was probably cut short") from e


# Bumped whenever a default changes what an unchanged config trains (2: the default point is
# the highest with a non-linear f_up; one long-tail head round(0.4·C) for LPA, LPL and LPG;
# 3: the trainer's loss-change ceiling, and longtail.py:quick's validation-tuned radii).
DEFAULTS_VERSION = 3


def config_dict(config) -> dict:
  """A ConfigDict (or a dict) as plain JSON values.

  A ConfigDict also records ``resolved``: the library's defaults version and the point an
  ``auto`` activation method resolves to, so a run made under other defaults counts as made
  with another config (the work dir and the sweep then say which field differs).
  """
  if isinstance(config, dict):
    return json.loads(json.dumps(config, default=list))
  out = json.loads(config.to_json_best_effort())
  out["resolved"] = _resolved(config)
  return out


def _resolved(config) -> dict:
  from lpa_jax.models import get_model
  from experiments.registry import describe_activation
  try:
    points = get_model(config.model.name, 10, **dict(config.model.kwargs)).points
    _, point = describe_activation(config.perturb, points)
  except (AttributeError, KeyError, TypeError, ValueError):
    point = None  # not a full run config (a unit test's partial one): nothing to resolve
  return {"defaults_version": DEFAULTS_VERSION, "activation_point": point}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def _methods_on(flat: dict) -> set:
  """Names of the methods a flat config switches on (``perturb.logit`` may chain several)."""
  logit = flat.get("perturb.logit", "none")
  names = [n.strip() for n in logit.split(",")] if isinstance(logit, str) else list(logit)
  names += [flat.get("perturb.activation"), flat.get("perturb.gradient")]
  return {n for n in names if n not in (None, "", "none")}


def config_diff(recorded, planned) -> list[tuple[str, object, object]]:
  """``(field, recorded, planned)`` for every field that differs (``'<absent>'`` when a field
  exists on one side only), ignoring :data:`IGNORED_FIELDS` and the blocks of methods that
  neither config switches on (a method reads only its own ``perturb.<name>`` block).  A field
  on one side only whose value is ``None`` is no difference: fields are added unset (``None``
  = off, the behaviour before they existed), so a run recorded before a field existed is not
  stale for that alone; a field added with any other default still counts.

  >>> config_diff({"optim": {"lr": 0.1}}, {"optim": {"lr": 0.05}})
  [('optim.lr', 0.1, 0.05)]
  >>> config_diff({"optim": {"lr": 0.1}}, {"optim": {"lr": 0.1, "warmup": None, "nesterov": True}})
  [('optim.nesterov', '<absent>', True)]
  """
  a, b = _flat(config_dict(recorded)), _flat(config_dict(planned))
  on = _methods_on(a) | _methods_on(b)

  def matters(key):
    parts = key.split(".")
    off_block = len(parts) > 2 and parts[0] == "perturb" and parts[1] not in on
    return key not in IGNORED_FIELDS and not off_block
  def differs(k):
    x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
    return x != y and {x, y} != {"<absent>", None}
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
          if matters(k) and differs(k)]


def describe_diff(diff, limit: int = 12) -> str:
  lines = [f"  {k}: {old!r} (recorded) -> {new!r} (now)" for k, old, new in diff[:limit]]
  if len(diff) > limit:
    lines.append(f"  ... and {len(diff) - limit} more")
  return "\n".join(lines)


def recorded_config(workdir: str) -> dict | None:
  """The config a work dir belongs to: ``config.json``, else the one in ``results.json``."""
  for name, key in ((CONFIG_FILE, None), ("results.json", "config")):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      try:
        data = read_json(path)
      except ValueError:
        continue
      data = data.get(key) if key else data
      if isinstance(data, dict):
        return data
  return None


def clear_run(workdir: str) -> None:
  """Deletes a run's files (:data:`RUN_FILES`) from ``workdir``."""
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def claim(workdir: str, config, fresh: bool = False) -> None:
  """Makes ``workdir`` the home of ``config``'s run, or refuses with the differing fields.

  ``fresh`` deletes whatever run the work dir held first.  A work dir with checkpoints but no
  recorded config (made by an older version) is refused too: it cannot be checked.
  """
  if fresh:
    clear_run(workdir)
  recorded = recorded_config(workdir) if os.path.isdir(workdir) else None
  if recorded is not None:
    diff = config_diff(recorded, config)
    if diff:
      raise ConfigMismatch(
          f"Work dir {workdir} holds a run of a different config:\n{describe_diff(diff)}\n"
          "Use another --workdir, or pass --fresh to delete that run and start afresh here.",
          workdir, describe_diff(diff))
  elif os.path.isdir(ckpt := os.path.join(workdir, "checkpoints")) and os.listdir(ckpt):
    raise ConfigMismatch(
        f"Work dir {workdir} has checkpoints but no recorded config ({CONFIG_FILE}), so they "
        "cannot be checked against this run. Use another --workdir, or pass --fresh.", workdir)
  os.makedirs(workdir, exist_ok=True)
  remove_leftovers(workdir)
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), config_dict(config))


# What write_json_atomic and the other writers leave when killed mid-write: ``name.tmp<pid>``,
# or ``name.tmp<pid>.npz`` (numpy insists on the suffix).
_LEFTOVER = re.compile(r"^.+\.tmp(\d+)(\.npz)?$")


def pid_alive(pid: int) -> bool:
  """Whether process ``pid`` exists on this host.

  >>> pid_alive(os.getpid())
  True
  """
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def remove_leftovers(directory: str) -> list[str]:
  """Deletes the temporary files of writers that died mid-write in ``directory``; returns their
  names.  Those of another live process are kept (about to be renamed into place); call it
  where this process is not writing at the moment (its own pid may be a dead one's reused).

  >>> remove_leftovers("/tmp/no_such_dir")
  []
  """
  if not os.path.isdir(directory):
    return []
  gone = []
  for name in sorted(os.listdir(directory)):
    m = _LEFTOVER.match(name)
    if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
      try:
        os.remove(os.path.join(directory, name))
        gone.append(name)
      except (FileNotFoundError, IsADirectoryError):
        pass
  return gone


def disk_full(e: BaseException) -> str | None:
  """The first line of the error in ``e``'s chain (causes, contexts) that reports a full
  disk, else None.  Orbax and tensorstore wrap it in their own errors.

  >>> disk_full(RuntimeError("write failed: [Errno 28] No space left on device"))
  'write failed: [Errno 28] No space left on device'
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "No space left on device" in str(e):
      return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    e = e.__cause__ or e.__context__
  return None


def no_access(e: BaseException) -> str | None:
  """``'path (reason)'`` for the first error in ``e``'s chain that was refused access to a path
  (permissions, a read-only file system), else None: where the run cannot write.

  >>> no_access(OSError(errno.EROFS, "Read-only file system", "/ro/run"))
  '/ro/run (Read-only file system)'
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and \
        e.filename:
      return f"{e.filename} ({e.strerror})"
    e = e.__cause__ or e.__context__
  return None
