"""Data: TFDS loading (offline via manual dirs, cached as .npz), long-tail subsampling,
label noise, DomainBed-style domain splits, on-device batching and augmentation.

Importing this package never imports TensorFlow; only building a missing cache does.

Example (not run as a doctest: it loads Fashion-MNIST, the TFDS data):
  >>> from experiments.data import load_task_data                        # doctest: +SKIP
  >>> import ml_collections                                          # doctest: +SKIP
  >>> data = load_task_data(ml_collections.ConfigDict(dict(name="fashion_mnist")))  # doctest: +SKIP
  >>> data.name, data.x_train.shape                                  # doctest: +SKIP
  ('Fashion-MNIST', (60000, 28, 28, 1))
"""

from experiments.data.domains import (colored_mnist, leave_one_domain_out, rotate_images,
                                      rotated_mnist)
from experiments.data.longtail import longtail_counts, make_longtail, stratified_subset
from experiments.data.noise import asymmetric_noise, asymmetric_noise_cifar10, symmetric_noise
from experiments.data.pipeline import augment_batch, dataset_stats, epoch_permutation, normalize
from experiments.data.sources import (RawData, cached_file, load_raw, resolve_cache_dir,
                                  resolve_data_dir)
from experiments.data.task import NAMES, TaskData, load_task_data

__all__ = [
    "NAMES", "RawData", "TaskData", "asymmetric_noise", "asymmetric_noise_cifar10",
    "augment_batch", "cached_file",
    "colored_mnist", "dataset_stats", "epoch_permutation", "leave_one_domain_out",
    "load_raw", "load_task_data", "longtail_counts", "make_longtail", "normalize",
    "resolve_cache_dir", "resolve_data_dir", "rotate_images", "rotated_mnist",
    "stratified_subset", "symmetric_noise",
]
