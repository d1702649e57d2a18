"""The README's own-loop examples, executed from README.md itself (not a copy).

Code blocks tagged ```python readme-test:<name>``` are run in one namespace, in the order a
reader would: the Linen flow as written, the same LPA lines on other Linen models (without
BatchNorm, with Dropout, without a ``train`` argument, an MLP-Mixer-like model, a small
attention model with Dropout), and the NNX flow, also on an NNX CNN with BatchNorm and Dropout.
"""
import pathlib
import re

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> dict[str, str]:
  text = README.read_text()
  blocks = dict(re.findall(r"```python readme-test:([\w-]+)\n(.*?)```", text, flags=re.S))
  assert {"setup", "linen-model", "lpa", "cut-linen", "step", "loop", "nnx",
          "nnx-update"} <= set(blocks), sorted(blocks)
  return blocks


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
                          model_state=variables)
'''


def _run(names, extra_source=None) -> dict:
  blocks = readme_blocks()
  ns: dict = {}
  for name in names:
    source = extra_source if name == "model" else blocks[name]
    exec(compile(source, f"README.md[{name}]", "exec"), ns)  # noqa: S102
  return ns


def _check_trained(ns, params0):
  """Finite loss, parameters moved, and LPA perturbs every present class with a sign."""
  assert np.isfinite(float(ns["loss"]))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       ns["state"].params, params0)
  assert max(jax.tree.leaves(moved)) > 0
  lj = ns["lj"]
  x, y = ns["x_train"][:256], ns["y_train"][:256]
  out = jax.jit(lambda s, p: lj.perturbed_apply(
      ns["lpa"], ns["cut"], p, {"params": s.params, **s.model_state}, x, y,
      jax.random.PRNGKey(5)))(ns["state"], ns["pstate"])
  aux = jax.device_get(out.aux)
  lj.check_finite(aux, method="lpa", point="block2")
  live = (aux["present_C"] > 0) & (aux["sign_C"] != 0)
  assert live.sum() >= 5 and np.all(aux["delta_norm_C"][live] > 0)
  # The method's state came back with this batch's statistics accumulated.
  assert float(out.state.stats.count_C.sum()) == len(y)


def test_readme_linen_flow_runs_as_written():
  ns = _run(["setup", "linen-model", "lpa", "cut-linen"])
  params0 = jax.device_get(ns["state"].params)
  ns = _run_more(ns, ["step", "loop"])
  _check_trained(ns, params0)
  # refresh() at the epoch boundary reset the statistics it re-split from.
  assert float(ns["pstate"].stats.count_C.sum()) == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_readme_lpa_lines_work_on_other_linen_models(variant):
  ns = _run(["setup", "model", "lpa", "cut-linen"], VARIANTS[variant] + VARIANT_SETUP)
  params0 = jax.device_get(ns["state"].params)
  ns = _run_more(ns, ["step", "loop"])
  _check_trained(ns, params0)


def test_readme_nnx_flow_runs_as_written():
  ns = _run(["setup", "lpa", "nnx"])
  params0 = jax.device_get(ns["state"].params)
  ns = _run_more(ns, ["step", "loop", "nnx-update"])
  _check_trained(ns, params0)
  # The trained parameters are back in the NNX model.
  from flax import nnx
  model_params = nnx.state(ns["model"], nnx.Param)
  np.testing.assert_array_equal(np.asarray(model_params["head"]["kernel"][...]),
                                np.asarray(ns["state"].params["head"]["kernel"][...]))


# An NNX CNN with BatchNorm and Dropout (its own RNG streams), run through the README's NNX
# flow in place of the README's model.
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


def test_readme_nnx_flow_trains_a_cnn_with_batchnorm_and_dropout():
  blocks = readme_blocks()
  nnx_block = blocks["nnx"]
  start, end = nnx_block.index("class NnxCNN"), nnx_block.index("model = NnxCNN")
  source = nnx_block[:start] + NNX_DROPOUT.strip() + "\n\n" + nnx_block[end:]
  ns = _run(["setup", "lpa", "model"], source)
  params0 = jax.device_get(ns["state"].params)
  assert set(ns["state"].model_state) > {"batch_stats"} or len(ns["state"].model_state) > 1, \
      sorted(ns["state"].model_state)  # BatchNorm statistics and the dropout RNG state
  ns = _run_more(ns, ["step", "loop", "nnx-update"])
  _check_trained(ns, params0)


def _run_more(ns, names):
  blocks = readme_blocks()
  for name in names:
    exec(compile(blocks[name], f"README.md[{name}]", "exec"), ns)  # noqa: S102
  return ns
