"""A PyTorch peer of lpa_jax's CIFAR ResNet train step, plain and with LPA, for timing.

The same network as :class:`lpa_jax.models.resnet.CifarResNet` (stem conv-BN-ReLU, three
stages of basic blocks with 1x1-conv shortcuts, global mean pooling, a linear head; BN
momentum 0.9 in Flax's convention, ε 1e-5), the same SGD step (momentum, decoupled-from-loss
weight decay added to the gradient, as ``optax.add_decayed_weights`` before ``sgd``), and the
same LPA (SPEC §1, lpa_jax's defaults): PGD on a class table through the blocks above the
point only, normalised steps ``κ_c = 2ε_c/T``, per-class ℓ2 projection, relative radius
``ε_c = r_c · mean_{i∈S_c} ‖a_i‖``, classes absent from the batch or unsigned kept at zero,
BN in training mode during PGD with its running statistics frozen.  Written for the
benchmark's peer comparison (``python -m experiments.gpu.run_all``); torch is imported only
here (``pip install -e ".[bench]"``).  Not run as a doctest: it needs torch and a Flax
model's variables (``tests/test_torch_peer.py`` runs it).

>>> net = TorchCifarResNet(depth=20)                                   # doctest: +SKIP
>>> load_flax_variables(net, variables)     # the JAX model's parameters  # doctest: +SKIP
>>> lpa = TorchLPA(net.block_index("stage3.block1"), sign_C, r_C)      # doctest: +SKIP
>>> step = TorchStep(net, lr=0.1, lpa=lpa)                             # doctest: +SKIP
>>> loss = step(x_BxCxHxW, y_B)                                        # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12  # lpa_jax.perturb.pgd.EPS


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # Flax momentum 0.9 == torch 0.1


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = _bn(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = _bn(cout)
    self.shortcut = None
    if cin != cout or stride != 1:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), _bn(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class TorchCifarResNet(nn.Module):
  """ResNet-(6n+2), widths 16-32-64; ``blocks`` is [stem, stage1.block0, …, stage3.block{n-1}]
  so the network can be cut after any of them (:meth:`lower` / :meth:`upper`)."""

  def __init__(self, depth: int = 32, num_classes: int = 10, widths=(16, 32, 64)):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got depth={depth}")
    self.n = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), _bn(widths[0]),
                         nn.ReLU())
    blocks, cin = [stem], widths[0]
    for s, w in enumerate(widths):
      for j in range(self.n):
        blocks.append(BasicBlock(cin, w, 2 if (s > 0 and j == 0) else 1))
        cin = w
    self.blocks = nn.ModuleList(blocks)
    self.head = nn.Linear(cin, num_classes)

  def block_index(self, point: str) -> int:
    """Index in :attr:`blocks` whose output is ``point`` (``stem``, ``stageS.blockJ``,
    ``stageS``)."""
    if point == "stem":
      return 0
    stage, _, block = point.partition(".")
    s = int(stage.removeprefix("stage")) - 1
    j = int(block.removeprefix("block")) if block else self.n - 1
    return 1 + s * self.n + j

  def lower(self, x, upto: int):
    for b in self.blocks[:upto + 1]:
      x = b(x)
    return x

  def upper(self, a, upto: int):
    for b in self.blocks[upto + 1:]:
      a = b(a)
    return self.head(a.mean(dim=(2, 3)))

  def forward(self, x):
    return self.upper(self.lower(x, 0), 0)


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, np.float32))


def _load_bn(bn: nn.BatchNorm2d, params: dict, stats: dict) -> None:
  bn.weight.data.copy_(_t(params["scale"]))
  bn.bias.data.copy_(_t(params["bias"]))
  bn.running_mean.copy_(_t(stats["mean"]))
  bn.running_var.copy_(_t(stats["var"]))


def _load_conv(conv: nn.Conv2d, params: dict) -> None:
  conv.weight.data.copy_(_t(params["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW


def load_flax_variables(net: TorchCifarResNet, variables: dict) -> None:
  """Copies a ``CifarResNet`` (linear head) Flax variable tree into ``net``, exactly."""
  p, s = variables["params"], variables["batch_stats"]
  _load_conv(net.blocks[0][0], p["stem_layer"]["Conv_0"])
  _load_bn(net.blocks[0][1], p["stem_layer"]["BatchNorm_0"], s["stem_layer"]["BatchNorm_0"])
  for stage in range(3):
    for j in range(net.n):
      blk = net.blocks[1 + stage * net.n + j]
      bp, bs = (v[f"stage{stage + 1}_layer"][f"block{j}"] for v in (p, s))
      _load_conv(blk.conv1, bp["conv1"])
      _load_conv(blk.conv2, bp["conv2"])
      _load_bn(blk.bn1, bp["BatchNorm_0"], bs["BatchNorm_0"])
      _load_bn(blk.bn2, bp["BatchNorm_1"], bs["BatchNorm_1"])
      if blk.shortcut is not None:
        _load_conv(blk.shortcut[0], bp["shortcut"])
        _load_bn(blk.shortcut[1], bp["shortcut_bn"], bs["shortcut_bn"])
  net.head.weight.data.copy_(_t(p["logits_layer"]["kernel"]).T)
  net.head.bias.data.copy_(_t(p["logits_layer"]["bias"]))


@dataclasses.dataclass
class TorchLPA:
  """LPA at the output of ``net.blocks[index]``: ``sign_C`` (+1 expansive, −1 contractive,
  0 none) and ``rel_radius_C`` (``β^(L−l)(ε + Δε|τ − q_c|)``, a fraction of ``‖a‖``)."""
  index: int
  sign_C: torch.Tensor
  rel_radius_C: torch.Tensor
  steps: int = 3


class _FrozenBN:
  """BN in training mode (batch statistics) whose running statistics do not move: PGD's
  passes, as lpa_jax runs them (frozen variables, their new state discarded)."""

  def __init__(self, modules):
    self.bns = [m for m in modules if isinstance(m, nn.BatchNorm2d)]

  def __enter__(self):
    self.saved = [m.momentum for m in self.bns]
    for m in self.bns:
      m.momentum = 0.0
    return self

  def __exit__(self, *exc):
    for m, mom in zip(self.bns, self.saved):
      m.momentum = mom


def lpa_delta(net: TorchCifarResNet, lpa: TorchLPA, act, labels) -> torch.Tensor:
  """The class table ``δ_CxCxHxW`` by T normalised PGD steps through ``net.upper`` only."""
  num_classes = lpa.sign_C.shape[0]
  a = act.detach()
  onehot = F.one_hot(labels, num_classes).to(a.dtype)                 # B x C
  count_C = onehot.sum(0)
  present_C = (count_C > 0) & (lpa.sign_C != 0)
  norm_B = a.flatten(1).norm(dim=1)
  radius_C = lpa.rel_radius_C * (onehot.T @ norm_B) / count_C.clamp(min=1.0)
  kappa_C = 2.0 * radius_C / lpa.steps
  delta = torch.zeros((num_classes,) + tuple(a.shape[1:]), device=a.device, dtype=a.dtype)
  col = (-1,) + (1,) * (a.dim() - 1)
  with _FrozenBN(net.blocks[lpa.index + 1:].modules()):
    for _ in range(lpa.steps):
      delta.requires_grad_(True)
      loss = F.cross_entropy(net.upper(a + delta[labels], lpa.index), labels, reduction="sum")
      (g,) = torch.autograd.grad(loss, delta)
      with torch.no_grad():
        g = g / count_C.clamp(min=1.0).view(col)
        g = g / (g.flatten(1).norm(dim=1) + EPS).view(col)
        delta = delta.detach() + (lpa.sign_C * kappa_C).view(col) * g
        norm_C = delta.flatten(1).norm(dim=1)
        scale_C = torch.where(norm_C > radius_C, radius_C / norm_C.clamp(min=EPS), 1.0)
        delta = torch.where(present_C.view(col), delta * scale_C.view(col), 0.0)
  return delta.detach()


def loss_of(net: TorchCifarResNet, x, labels, lpa: TorchLPA | None = None):
  """The training loss of one forward pass (train mode), LPA's δ added at its point."""
  if lpa is None:
    return F.cross_entropy(net(x), labels)
  act = net.lower(x, lpa.index)
  delta = lpa_delta(net, lpa, act, labels)
  return F.cross_entropy(net.upper(act + delta[labels], lpa.index), labels)


class TorchStep:
  """One SGD train step (``loss, backward, step``); ``lpa`` adds LPA."""

  def __init__(self, net: TorchCifarResNet, lr: float = 0.1, momentum: float = 0.9,
               weight_decay: float = 5e-4, lpa: TorchLPA | None = None):
    self.net, self.lpa = net, lpa
    self.opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)

  def __call__(self, x, labels) -> torch.Tensor:
    self.net.train()
    self.opt.zero_grad(set_to_none=True)
    loss = loss_of(self.net, x, labels, self.lpa)
    loss.backward()
    self.opt.step()
    return loss.detach()
