import os

# Eight fake CPU devices, set before anything initialises a JAX backend: the data-parallel
# tests compare the 8-device step with the 1-device one.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


def small_config(variant: str = "quick", **overrides):
  """A tiny real-data config: Fashion-MNIST-LT, 100 images at the head, MLP, 2 epochs."""
  from experiments.configs import longtail
  c = longtail.get_config(variant)
  c.data.update(dict(n_max=100, test_subset=500))
  c.model.name = "mlp"
  c.model.kwargs = {"widths": (64, 32)}
  c.optim.update(dict(batch_size=64, num_epochs=2, warmup_epochs=0.0))
  c.train.eval_every = 1
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture(scope="session")
def fmnist_lt():
  """Fashion-MNIST-LT (IR 100, 100 images at the head) as a TaskData, loaded once."""
  from lpa_jax.data import load_task_data
  return load_task_data(small_config().data)
