"""The library installs and imports with jax, flax, optax and numpy alone (issue 32, §1)."""
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLICATION = ("tensorflow", "tensorflow_datasets", "orbax", "ml_collections", "matplotlib",
               "scipy", "chex", "tensorboardX", "experiments", "PIL")


def test_core_dependencies_are_the_four():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = {d.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip()
           for d in project["dependencies"]}
  assert names == {"jax", "flax", "optax", "numpy"}
  assert "experiments" in project["optional-dependencies"]
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
  assert find["include"] == ["lpa_jax*"]  # the application is not installed as a package


def test_the_transform_path_imports_no_application_module():
  # A child process from outside the repository: the repository root is not on sys.path, so
  # `experiments` cannot be imported by accident, and sys.modules is fresh.
  code = """
import sys
import jax, jax.numpy as jnp, flax.linen as nn, numpy as np
import lpa_jax as lj
import lpa_jax.models, lpa_jax.perturb, lpa_jax.train.step

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="hidden")(x))
    return nn.Dense(3, name="head")(h)

model = Net()
x = jnp.ones((6, 4)); y = jnp.array([0, 1, 2, 0, 1, 2])
variables = model.init(jax.random.PRNGKey(0), x)
cut = lj.cut_linen(model, "hidden", input_shape=(4,))
method = lj.lpa(3, split="all_positive", eps=0.5)
out = lj.perturbed_apply(method, cut, method.init(), variables, x, y, jax.random.PRNGKey(1))
assert np.all(np.isfinite(np.asarray(out.logits_BxC)))
bad = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print("APPLICATION-MODULES", bad)
""" % (APPLICATION,)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  res = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "APPLICATION-MODULES []" in res.stdout, res.stdout


def test_packaging_files_and_one_version_source():
  for name in ("LICENSE", "CITATION.cff", "CHANGELOG.md", "lpa_jax/py.typed"):
    assert os.path.isfile(os.path.join(ROOT, name)), name
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    toml = tomllib.load(f)
  assert "version" not in toml["project"] and "version" in toml["project"]["dynamic"]
  assert toml["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lpa_jax.__version__"}
  assert "Apache" in open(os.path.join(ROOT, "LICENSE")).read(200)
