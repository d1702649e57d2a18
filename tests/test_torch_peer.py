"""The PyTorch peer step of the benchmark computes lpa_jax's step: same loss and gradients
at the same parameters, plain and with LPA (skipped where torch is not installed)."""
import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

import lpa_jax as lj  # noqa: E402
from experiments.bench import torch_peer as tp  # noqa: E402
from experiments.data.longtail import longtail_counts  # noqa: E402
from lpa_jax.models import get_model  # noqa: E402
from lpa_jax.models.staged import depth_below_logits  # noqa: E402
from lpa_jax.perturb import classes  # noqa: E402
from lpa_jax.perturb.hooks import cut_staged  # noqa: E402

POINT = "stage3.block1"  # ResNet-20's default point: one block, pooling and the head above


def _setup(dtype=np.float32):
  # A numerical check of two implementations, not a dataset: fixed pseudo-random inputs.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 32, 32, 3)).astype(dtype)
  y = rng.permutation(np.arange(32) % 10).astype(np.int32)
  model = get_model("resnet20", 10, dtype=np.dtype(dtype).name)
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), x[:1].astype(np.float32)))
  variables = jax.tree.map(lambda a: np.asarray(a, dtype), variables)
  net = tp.TorchCifarResNet(depth=20).double()
  tp.load_flax_variables(net, variables)
  net = net.to(torch.float64 if dtype == np.float64 else torch.float32)
  xt, yt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()
  return model, variables, net, x, y, xt, yt


def _jax_loss(model, variables, x, y, method=None, cut=None):
  def loss(params):
    v = {**variables, "params": params}
    if method is None:
      logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    else:
      logits = lj.perturbed_apply(method, cut, method.init(), v, x, y,
                                  jax.random.PRNGKey(1)).logits_BxC
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


def _rel(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _grads(jgrads, net):
  """(torch, JAX) pairs for the head's and the stem's weight gradients, in torch's layout."""
  return [(net.head.weight.grad.numpy(), np.asarray(jgrads["logits_layer"]["kernel"]).T),
          (net.blocks[0][0].weight.grad.numpy(),
           np.asarray(jgrads["stem_layer"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1))]


def _compare(jloss, jgrads, net, tloss, loss_tol, head_tol, stem_tol):
  net.zero_grad()
  tloss.backward()
  np.testing.assert_allclose(float(tloss.detach()), float(jloss), rtol=loss_tol)
  (th, jh), (ts, js) = _grads(jgrads, net)
  assert _rel(th, jh) < head_tol
  assert _rel(ts, js) < stem_tol


def _lpa(model, net):
  counts = longtail_counts(5000, 10, 100)
  cut = cut_staged(model, POINT)
  method = lj.lpa(10, split="longtail", class_counts=counts, eps=0.1, delta_eps=0.1,
                  radius_mode="relative", depth=depth_below_logits(model.points, POINT))
  split = method.init().split
  rel = classes.class_radii(split, 0.1, 0.1, 0.7, depth_below_logits(model.points, POINT), True)
  dtype = net.head.weight.dtype
  lpa = tp.TorchLPA(net.block_index(POINT), torch.tensor(np.asarray(split.sign_C)),
                    torch.tensor(np.asarray(rel), dtype=dtype), steps=3)
  return method, cut, lpa


# The two sides compute the same maths, so in float64 they agree to rounding (measured: plain
# 1e-14 on the stem's gradient, LPA 2e-9, its three PGD steps each normalising a gradient).
# In float32 the stem's gradient (20 layers of training-mode BatchNorm below a batch of 32) is
# ill-conditioned: each side is 0.04-0.2 % from its own float64 value, and how far depends on
# the XLA and torch versions, so float32 is held only to what it can promise.
def test_plain_step_matches_jax_in_float64():
  with jax.enable_x64(True):
    model, variables, net, x, y, xt, yt = _setup(np.float64)
    jloss, jgrads = _jax_loss(model, variables, x, y)
    assert jgrads["stem_layer"]["Conv_0"]["kernel"].dtype == np.float64
    net.train()
    _compare(jloss, jgrads, net, tp.loss_of(net, xt, yt), 1e-12, 1e-11, 1e-11)


def test_lpa_step_matches_jax_in_float64():
  with jax.enable_x64(True):
    model, variables, net, x, y, xt, yt = _setup(np.float64)
    method, cut, lpa = _lpa(model, net)
    jloss, jgrads = _jax_loss(model, variables, x, y, method, cut)
    net.train()
    _compare(jloss, jgrads, net, tp.loss_of(net, xt, yt, lpa), 1e-9, 1e-7, 1e-7)
    # LPA changed the loss (the check above is not plain against plain).
    plain, _ = _jax_loss(model, variables, x, y)
    assert abs(float(jloss) - float(plain)) > 1e-3
    # PGD left BN's running statistics where they were; the training pass moved them once.
    bn = net.blocks[-1].bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize("perturbed", [False, True])
def test_float32_steps_agree_as_far_as_float32_can(perturbed):
  model, variables, net, x, y, xt, yt = _setup(np.float32)
  method, cut, lpa = _lpa(model, net) if perturbed else (None, None, None)
  jloss, jgrads = _jax_loss(model, variables, x, y, method, cut)
  net.train()
  _compare(jloss, jgrads, net, tp.loss_of(net, xt, yt, lpa), 1e-5, 1e-4, 1e-2)


def test_block_index_names_the_jax_points():
  net = tp.TorchCifarResNet(depth=32)
  assert [net.block_index(p) for p in ("stem", "stage1.block0", "stage1", "stage3.block3",
                                       "stage3")] == [0, 1, 5, 14, 15]
  assert len(net.blocks) == 16
