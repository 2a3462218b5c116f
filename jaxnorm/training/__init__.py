"""Training: data pipelines, jitted data-parallel steps, checkpoints, metrics, the loop.

- ``data``: TFDS (cifar10/100, mnist, imagenet2012) and embedded offline data sets, resumable
  deterministic batch iterators.
- ``optim``: optax optimizers (SGD/Nesterov, AdamW), decay masks, schedules.
- ``steps``: ``TrainState``, the jitted train/eval steps over a ``'data'`` mesh.
- ``checkpoint``: Orbax checkpoints with fallback past a damaged latest one.
- ``metrics``: ``metrics.jsonl``, TensorBoard event files, progress bar.
- ``config``: default config, the model section derived from the factory signatures, validation.
- ``workdir``: one run per workdir (lock file, config check, finished runs).
- ``loop``: ``train(config, workdir)``, with checkpoint-and-stop on SIGTERM / SIGINT.
"""

from jaxnorm.training.checkpoint import Checkpointer as Checkpointer
from jaxnorm.training.config import ConfigError as ConfigError
from jaxnorm.training.config import default_config as default_config
from jaxnorm.training.config import factory_keywords as factory_keywords
from jaxnorm.training.config import model_config as model_config
from jaxnorm.training.config import validate_config as validate_config
from jaxnorm.training.data import DATASETS as DATASETS
from jaxnorm.training.data import BatchIterator as BatchIterator
from jaxnorm.training.data import Dataset as Dataset
from jaxnorm.training.data import DatasetNotFoundError as DatasetNotFoundError
from jaxnorm.training.data import eval_batches as eval_batches
from jaxnorm.training.data import load_dataset as load_dataset
from jaxnorm.training.loop import NonFiniteLossError as NonFiniteLossError
from jaxnorm.training.loop import Preempted as Preempted
from jaxnorm.training.loop import build_model as build_model
from jaxnorm.training.loop import evaluate as evaluate
from jaxnorm.training.loop import train as train
from jaxnorm.training.metrics import EventWriter as EventWriter
from jaxnorm.training.metrics import JsonlWriter as JsonlWriter
from jaxnorm.training.metrics import read_metrics as read_metrics
from jaxnorm.training.optim import make_optimizer as make_optimizer
from jaxnorm.training.optim import make_schedule as make_schedule
from jaxnorm.training.steps import TrainState as TrainState
from jaxnorm.training.steps import create_train_state as create_train_state
from jaxnorm.training.steps import cross_entropy as cross_entropy
from jaxnorm.training.steps import make_eval_step as make_eval_step
from jaxnorm.training.steps import make_mesh as make_mesh
from jaxnorm.training.steps import make_train_step as make_train_step
from jaxnorm.training.steps import shard_batch as shard_batch
from jaxnorm.training.workdir import ConfigMismatchError as ConfigMismatchError
from jaxnorm.training.workdir import WorkdirError as WorkdirError
from jaxnorm.training.workdir import WorkdirLockedError as WorkdirLockedError
