"""The README's own-loop examples, executed from README.md itself (not a copy), and the
README's shape: a front door of at most 200 lines whose links resolve.

Code blocks tagged ```python readme-test:<name>``` are run in one namespace, in the order a
reader would: the Linen flow as written, LPA + logit adjustment + LPL through the same step,
the same LPA lines on other Linen models (without BatchNorm, with Dropout, without a ``train``
argument, an MLP-Mixer-like model, a small attention model with Dropout).  The NNX flows (with
``nnx.Optimizer``, also on an NNX CNN with BatchNorm and Dropout, and through a Linen-style
TrainState) are tagged the same way in the own-loop guide, ``docs/guides/own_loop.md``, and run
from there on top of the README's setup blocks.  The lines each example adds to the plain loop
it extends are counted (issue 32: LPA alone in at most 10 added lines and 4 lpa_jax names,
LPA + LA + LPL in at most 12).
"""
import difflib
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OWN_LOOP = ROOT / "docs" / "guides" / "own_loop.md"
README_TAGS = {"setup", "linen-model", "lpa", "cut-linen", "step", "loop", "logit-chain"}
GUIDE_TAGS = {"nnx", "nnx-lpa"}


def _tagged(path: pathlib.Path) -> dict[str, str]:
  return dict(re.findall(r"```python readme-test:([\w-]+)\n(.*?)```", path.read_text(),
                         flags=re.S))


def readme_blocks() -> dict[str, str]:
  blocks = _tagged(README)
  assert README_TAGS <= set(blocks), sorted(blocks)
  return blocks


def guide_blocks() -> dict[str, str]:
  """The README's blocks and the own-loop guide's NNX ones.  A block both documents tag with
  one name must read the same in both, so the guide's copy is the one tested here."""
  if not OWN_LOOP.exists():
    pytest.skip(f"{OWN_LOOP.relative_to(ROOT)} (the NNX own-loop guide) is not in this checkout")
  readme, guide = readme_blocks(), _tagged(OWN_LOOP)
  assert GUIDE_TAGS <= set(guide), f"{OWN_LOOP}: tagged blocks {sorted(guide)}"
  differ = sorted(k for k in set(readme) & set(guide) if readme[k] != guide[k])
  assert not differ, f"README.md and {OWN_LOOP.name} tag different code as {differ}"
  return {**readme, **guide}


# Other Linen models a user might bring; each names a submodule "block2" like the README's.
VARIANTS = {
    "no-batchnorm-no-train-arg": '''
class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="block2")(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))
''',
    "dropout": '''
class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="block2")(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(10)(x.mean(axis=(1, 2)))
''',
    "batchnorm-no-train-arg": '''
class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.BatchNorm(use_running_average=False)(x)
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="block2")(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))
''',
    # An MLP-Mixer-like model (patch embedding, token and channel mixing, LayerNorm), cut at
    # its second mixer block: a tokens x channels activation.
    "mixer": '''
class MixerBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x).swapaxes(1, 2)
    x = x + nn.Dense(x.shape[1])(nn.gelu(nn.Dense(32)(y))).swapaxes(1, 2)
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(32, (4, 4), strides=4)(x)
    x = MixerBlock()(x.reshape(x.shape[0], -1, 32))
    x = MixerBlock(name="block2")(x)
    return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))
''',
    # A small ViT-like model: self-attention with attention and residual Dropout, a train flag.
    "attention-dropout": '''
class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.1,
                                            deterministic=not train)(nn.LayerNorm()(x))
    y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))
    return x + nn.Dropout(0.1, deterministic=not train)(y)

class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(32, (4, 4), strides=4)(x)
    x = x.reshape(x.shape[0], -1, 32) + self.param("pos", nn.initializers.normal(0.02),
                                                   (1, 49, 32))
    x = Block()(x, train)
    x = Block(name="block2")(x, train)
    return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))
''',
}
VARIANT_SETUP = '''
model = Net()
variables = dict(model.init(jax.random.PRNGKey(0), x_train[:1]))
params = variables.pop("params")
state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.05, 0.9),
                          model_state=variables, pstate=perturb.init())
'''
# Models with nn.Dropout draw random numbers: the step passes a key (the README says so).
WITH_RNG = ("dropout", "attention-dropout")


def _run(names, extra_source=None, ns=None, replace=None, blocks=None) -> dict:
  blocks = readme_blocks() if blocks is None else blocks
  ns = {} if ns is None else ns
  for name in names:
    source = extra_source if name == "model" else blocks[name]
    for old, new in (replace or {}).items():
      source = source.replace(old, new)
    exec(compile(source, f"README.md[{name}]", "exec"), ns)  # noqa: S102
  return ns


def _pstate(ns):
  p = ns.get("pstate")
  return p.get_value() if p is not None else ns["state"].pstate


def _check_trained(ns, params0, variables=None):
  """Finite loss, parameters moved, and LPA perturbs every present class with a sign."""
  assert np.isfinite(float(ns["loss"]))
  params = ns["state"].params if variables is None else variables["params"]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params, params0)
  assert max(jax.tree.leaves(moved)) > 0
  lj = ns["lj"]
  if variables is None:
    variables = {"params": params, **ns["state"].model_state}
  x, y = ns["x_train"][:256], ns["y_train"][:256]
  out = jax.jit(lambda v, p: lj.perturbed_apply(ns["perturb"], ns["cut"], p, v, x, y,
                                                jax.random.PRNGKey(5)))(variables, _pstate(ns))
  aux = jax.device_get(out.aux)
  lj.check_finite(aux, method="lpa", point="block2")
  live = (aux["present_C"] > 0) & (aux["sign_C"] != 0)
  assert live.sum() >= 5 and np.all(aux["delta_norm_C"][live] > 0)
  assert float(aux["invalid_labels"]) == 0 and np.isfinite(float(out.loss))
  return out


def _lpa_state(p):
  return p[0] if isinstance(p, tuple) else p


def test_readme_linen_flow_runs_as_written():
  ns = _run(["setup", "lpa", "linen-model", "cut-linen"])
  params0 = jax.device_get(ns["state"].params)
  ns = _run(["step", "loop"], ns=ns)
  out = _check_trained(ns, params0)
  # The method's state came back with this batch's statistics accumulated ...
  assert float(out.state.stats.count_C.sum()) == 256
  # ... and refresh() at the epoch boundary reset the statistics it re-split from.
  assert float(ns["state"].pstate.stats.count_C.sum()) == 0


def test_readme_logit_chain_runs_through_the_same_step():
  ns = _run(["setup", "lpa", "logit-chain", "linen-model", "cut-linen"])
  params0 = jax.device_get(ns["state"].params)
  assert ns["perturb"].level == "chain" and len(ns["perturb"].members) == 3
  ns = _run(["step", "loop"], ns=ns)
  out = _check_trained(ns, params0)
  lpa_state, _, lpl_state = out.state
  assert float(lpa_state.stats.count_C.sum()) == 256 == float(lpl_state.stats.count_C.sum())
  assert "lpl_delta_norm_C" in out.aux
  # PGD followed the chain's loss: LPA's δ differs from LPA's alone on the same state.
  alone = ns["lj"].perturbed_apply(ns["perturb"].members[0], ns["cut"], lpa_state,
                                   {"params": ns["state"].params, **ns["state"].model_state},
                                   ns["x_train"][:256], ns["y_train"][:256])
  assert not np.allclose(np.asarray(alone.aux["loss_change_C"]),
                         np.asarray(out.aux["loss_change_C"]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_readme_lpa_lines_work_on_other_linen_models(variant):
  ns = _run(["setup", "lpa", "model", "cut-linen"], VARIANTS[variant] + VARIANT_SETUP)
  params0 = jax.device_get(ns["state"].params)
  rng = {"x, y)\n": "x, y, jax.random.fold_in(jax.random.PRNGKey(1), state.step))\n"}
  ns = _run(["step", "loop"], ns=ns, replace=rng if variant in WITH_RNG else None)
  _check_trained(ns, params0)


def _nnx_variables(ns):
  from flax import nnx
  return {"params": nnx.state(ns["model"], nnx.Param)}


def test_guide_nnx_flow_with_nnx_optimizer_runs_as_written():
  from flax import nnx
  blocks = guide_blocks()
  ns = _run(["setup", "lpa", "nnx"], blocks=blocks)
  params0 = jax.device_get(nnx.state(ns["model"], nnx.Param))
  bn0 = np.asarray(ns["model"].bn.mean[...]).copy()
  ns = _run(["nnx-lpa"], ns=ns, blocks=blocks)
  _, variables = ns["lj"].nnx_functional(ns["model"])
  _check_trained(ns, params0, variables)
  assert np.abs(np.asarray(ns["model"].bn.mean[...]) - bn0).max() > 0  # BN ran in place
  assert float(ns["pstate"].get_value().stats.count_C.sum()) == 0       # refreshed


# An NNX CNN with BatchNorm and Dropout (its own RNG streams), run through the guide's NNX
# flow in place of the guide's model.
NNX_DROPOUT = '''
class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.block2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = self.drop(self.bn(nnx.relu(self.conv(x))))
    return self.head(self.drop(nnx.relu(self.block2(x))).mean(axis=(1, 2)))
'''


def test_guide_nnx_flow_trains_a_cnn_with_batchnorm_and_dropout():
  from flax import nnx
  blocks = guide_blocks()
  nnx_block = blocks["nnx"]
  start, end = nnx_block.index("class NnxCNN"), nnx_block.index("model = NnxCNN")
  source = nnx_block[:start] + NNX_DROPOUT.strip() + "\n\n" + nnx_block[end:]
  ns = _run(["setup", "lpa", "model"], source, blocks=blocks)
  params0 = jax.device_get(nnx.state(ns["model"], nnx.Param))
  ns = _run(["nnx-lpa"], ns=ns, blocks=blocks)
  _, variables = ns["lj"].nnx_functional(ns["model"])
  _check_trained(ns, params0, variables)


NNX_TRAIN_STATE = '''
_, variables = lj.nnx_functional(model)
cut = lj.cut_nnx(model, "block2", input_shape=x_train.shape[1:])
state = TrainState.create(apply_fn=None, params=variables.pop("params"), tx=optax.sgd(0.05, 0.9),
                          model_state=variables, pstate=perturb.init())
'''


def test_nnx_model_through_the_linen_style_train_state():
  from flax import nnx
  blocks = guide_blocks()
  ns = _run(["setup", "lpa", "nnx", "model"], NNX_TRAIN_STATE, blocks=blocks)
  params0 = jax.device_get(ns["state"].params)
  ns = _run(["step", "loop"], ns=ns, blocks=blocks)
  _check_trained(ns, params0)
  nnx.update(ns["model"], ns["state"].params, *ns["state"].model_state.values())
  kernel = nnx.state(ns["model"], nnx.Param)["head"]["kernel"][...]
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(ns["state"].params["head"]["kernel"][...]))


# --------------------------------------------------------------------------- line counts
# The plain loops the README's examples extend: the same data, model, optimiser and loop,
# trained with cross-entropy.  Only the lines the README changes or adds are counted.
PLAIN_LINEN = '''
class TrainState(train_state.TrainState):
  model_state: dict

state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.05, 0.9),
                          model_state=variables)

@jax.jit
def train_step(state, x, y):
  def loss_fn(params):
    variables = {"params": params, **state.model_state}
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, model_state={**state.model_state, **updates})
  return state, loss

for epoch in range(2):
  order = np.random.default_rng(epoch).permutation(len(x_train))
  for i in range(len(x_train) // 128):
    idx = order[i * 128:(i + 1) * 128]
    state, loss = train_step(state, x_train[idx], y_train[idx])
print(f"loss {float(loss):.3f}")
'''

PLAIN_NNX = '''
@nnx.jit
def nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss

for epoch in range(2):
  for i in range(len(x_train) // 128):
    loss = nnx_step(model, optimizer, x_train[i * 128:(i + 1) * 128],
                    y_train[i * 128:(i + 1) * 128])
print(f"loss {float(loss):.3f}")
'''


def _code_lines(source: str) -> list[str]:
  lines = [ln.split("  #")[0].rstrip() for ln in source.splitlines()]
  return [ln for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def added_lines(plain: str, extended: str) -> list[str]:
  """The lines of ``extended`` that ``plain`` does not have (added or changed)."""
  diff = difflib.ndiff(_code_lines(plain), _code_lines(extended))
  return [ln[2:] for ln in diff if ln.startswith("+ ")]


def _lj_names(lines) -> set[str]:
  return {m for ln in lines for m in re.findall(r"\blj\.(\w+)", ln)}


def _readme_linen(first: str) -> str:
  b = readme_blocks()
  model = b["linen-model"]
  return "\n".join([b["setup"][b["setup"].index("class TrainState"):], b[first],
                    model[model.index("state = TrainState"):], b["cut-linen"], b["step"],
                    b["loop"]])


def test_lpa_in_a_linen_loop_adds_at_most_ten_lines_and_four_names():
  added = added_lines(PLAIN_LINEN, _readme_linen("lpa"))
  assert len(added) <= 10, added
  assert len(_lj_names(added)) <= 4, _lj_names(added)
  assert len(added_lines(PLAIN_LINEN, _readme_linen("logit-chain"))) <= 12


def test_lpa_in_an_nnx_optimizer_loop_adds_at_most_ten_lines_and_four_names():
  b = guide_blocks()
  lpa_nnx = b["lpa"] + "\n" + b["nnx-lpa"]
  added = added_lines(PLAIN_NNX, lpa_nnx)
  assert len(added) <= 10, added
  assert len(_lj_names(added)) <= 4, _lj_names(added)
  assert len(added_lines(PLAIN_NNX, b["logit-chain"] + "\n" + b["nnx-lpa"])) <= 12


def test_the_plain_linen_loop_trains_as_it_stands():
  """The baseline the Linen counts are taken against is a real, running loop."""
  ns = _run(["setup", "lpa", "linen-model"])
  exec(compile(PLAIN_LINEN, "PLAIN_LINEN", "exec"), ns)  # noqa: S102
  assert np.isfinite(float(ns["loss"]))


def test_the_plain_nnx_loop_trains_as_it_stands():
  ns = _run(["setup", "nnx"], blocks=guide_blocks())
  exec(compile(PLAIN_NNX, "PLAIN_NNX", "exec"), ns)  # noqa: S102
  assert np.isfinite(float(ns["loss"]))


# --------------------------------------------------------------------------- the front door
# The documentation site's pages, which the README links to before this checkout may have
# them; every other relative link must point to a file that exists.
DOCS_PAGES = {"docs/index.md", "docs/api.md", "docs/evidence.md"} | {
    f"docs/guides/{name}.md" for name in ("own_loop", "cuts", "chain", "experiments", "hosts",
                                          "k_runs")}


def _prose(text: str) -> str:
  """The README less its code (fenced and inline), generated blocks and link targets."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  text = re.sub(r"<!-- BEGIN (\S+) -->.*?<!-- END \1 -->", "", text, flags=re.S)
  return re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", "", text))


def test_the_readme_is_at_most_200_lines():
  assert len(README.read_text().splitlines()) <= 200


def test_every_relative_link_in_the_readme_resolves():
  targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
  local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
  assert len(local) >= 10, local        # the links into the docs and the evidence are there
  broken = sorted({t for t in local if t.rstrip("/") not in DOCS_PAGES
                   and not (ROOT / t).exists()})
  assert not broken, f"README.md links to missing files: {broken}"


def test_the_readme_types_no_numbers_outside_code_and_generated_blocks():
  """Every result the README shows is a block ``python -m experiments.fill`` fills."""
  prose = _prose(README.read_text()).replace("Command 1", "").replace("Command 2", "")
  assert not re.findall(r".{0,30}\d.{0,30}", prose)
  assert "<!-- BEGIN summary:" in README.read_text()


def test_the_readme_keeps_the_command_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  command = 'pip install -e ".[test]" && ruff check . && python -m pytest -q'
  assert command in README.read_text()
  assert command.replace("install -e", "install -q -e") in ci
