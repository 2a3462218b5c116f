"""Data for training: sources, augmentation and resumable batching.

- :mod:`~jaxnorm.training.data.sources`: :class:`Dataset` and :func:`load_dataset` (TFDS sets read
  with ``tfds.data_source``, the embedded offline sets, a Gaussian source).
- :mod:`~jaxnorm.training.data.augment`: numpy preprocessing and augmentation per data set.
- :mod:`~jaxnorm.training.data.batching`: :class:`BatchIterator` (deterministic, resumable from one
  integer) and :func:`eval_batches`.
"""

from jaxnorm.training.data.augment import center_crop as center_crop
from jaxnorm.training.data.augment import random_crop_flip as random_crop_flip
from jaxnorm.training.data.augment import random_resized_crop as random_resized_crop
from jaxnorm.training.data.batching import BatchIterator as BatchIterator
from jaxnorm.training.data.batching import eval_batches as eval_batches
from jaxnorm.training.data.sources import DATASETS as DATASETS
from jaxnorm.training.data.sources import EMBEDDED_DATASETS as EMBEDDED_DATASETS
from jaxnorm.training.data.sources import TFDS_DATASETS as TFDS_DATASETS
from jaxnorm.training.data.sources import Dataset as Dataset
from jaxnorm.training.data.sources import DatasetNotFoundError as DatasetNotFoundError
from jaxnorm.training.data.sources import load_dataset as load_dataset
from jaxnorm.training.data.sources import tfds_instructions as tfds_instructions
