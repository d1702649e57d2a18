"""The PyTorch peer step of the benchmark computes lpa_jax's step: same loss and gradients
at the same parameters, plain and with LPA (skipped where torch is not installed)."""
import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

import lpa_jax as lj  # noqa: E402
from experiments.bench import torch_peer as tp  # noqa: E402
from lpa_jax.data.longtail import longtail_counts  # noqa: E402
from lpa_jax.models import get_model  # noqa: E402
from lpa_jax.perturb import classes  # noqa: E402
from lpa_jax.perturb.hooks import cut_staged  # noqa: E402

POINT = "stage3.block1"  # ResNet-20's default point: one block, pooling and the head above


def _setup():
  # A numerical check of two implementations, not a dataset: fixed pseudo-random inputs.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 32, 32, 3)).astype(np.float32)
  y = rng.permutation(np.arange(32) % 10).astype(np.int32)
  model = get_model("resnet20", 10)
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), x[:1]))
  net = tp.TorchCifarResNet(depth=20).double()
  tp.load_flax_variables(net, variables)
  net = net.float()
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


def _compare(jloss, jgrads, net, tloss, stem_tol):
  net.zero_grad()
  tloss.backward()
  np.testing.assert_allclose(float(tloss.detach()), float(jloss), rtol=1e-5)
  g_head = np.asarray(jgrads["logits_layer"]["kernel"]).T
  assert _rel(net.head.weight.grad.numpy(), g_head) < 1e-4
  g_stem = np.asarray(jgrads["stem_layer"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
  assert _rel(net.blocks[0][0].weight.grad.numpy(), g_stem) < stem_tol


def test_plain_step_matches_jax():
  model, variables, net, x, y, xt, yt = _setup()
  jloss, jgrads = _jax_loss(model, variables, x, y)
  net.train()
  _compare(jloss, jgrads, net, tp.loss_of(net, xt, yt), stem_tol=1e-4)  # measured 3.5e-6


def test_lpa_step_matches_jax():
  model, variables, net, x, y, xt, yt = _setup()
  counts = longtail_counts(5000, 10, 100)
  cut = cut_staged(model, POINT)
  method = lj.lpa(10, split="longtail", class_counts=counts, eps=0.1, delta_eps=0.1,
                  radius_mode="relative", depth=cut.depth)
  jloss, jgrads = _jax_loss(model, variables, x, y, method, cut)
  split = method.init().split
  rel = classes.class_radii(split, 0.1, 0.1, 0.7, cut.depth, True)
  lpa = tp.TorchLPA(net.block_index(POINT), torch.tensor(np.asarray(split.sign_C)),
                    torch.tensor(np.asarray(rel, np.float32)), steps=3)
  net.train()
  tloss = tp.loss_of(net, xt, yt, lpa)
  # With δ added, the stem's gradient is ill-conditioned in float32: each side is 0.1-0.2 %
  # from its own float64 value (measured), so the two agree only that closely.
  _compare(jloss, jgrads, net, tloss, stem_tol=1e-2)
  # LPA changed the loss (the check above is not plain against plain).
  plain, _ = _jax_loss(model, variables, x, y)
  assert abs(float(jloss) - float(plain)) > 1e-3
  # PGD left BN's running statistics where they were; the training pass moved them once.
  bn = net.blocks[-1].bn1
  assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_block_index_names_the_jax_points():
  net = tp.TorchCifarResNet(depth=32)
  assert [net.block_index(p) for p in ("stem", "stage1.block0", "stage1", "stage3.block3",
                                       "stage3")] == [0, 1, 5, 14, 15]
  assert len(net.blocks) == 16
