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

from jaxnorm.training.checkpoint import Checkpointer
from jaxnorm.training.config import (
    ConfigError,
    default_config,
    factory_keywords,
    model_config,
    validate_config,
)
from jaxnorm.training.data import (
    DATASETS,
    BatchIterator,
    Dataset,
    DatasetNotFoundError,
    eval_batches,
    load_dataset,
)
from jaxnorm.training.loop import NonFiniteLossError, Preempted, build_model, evaluate, train
from jaxnorm.training.metrics import EventWriter, JsonlWriter, read_metrics
from jaxnorm.training.optim import make_optimizer, make_schedule
from jaxnorm.training.steps import (
    TrainState,
    create_train_state,
    cross_entropy,
    make_eval_step,
    make_mesh,
    make_train_step,
    shard_batch,
)
from jaxnorm.training.workdir import ConfigMismatchError, WorkdirError, WorkdirLockedError

__all__ = [
    'DATASETS', 'BatchIterator', 'Checkpointer', 'ConfigError', 'ConfigMismatchError', 'Dataset',
    'DatasetNotFoundError', 'EventWriter', 'JsonlWriter', 'NonFiniteLossError', 'Preempted',
    'TrainState', 'WorkdirError', 'WorkdirLockedError', 'build_model', 'create_train_state',
    'cross_entropy', 'default_config', 'eval_batches', 'evaluate',
    'factory_keywords', 'load_dataset', 'make_eval_step', 'make_mesh', 'make_optimizer',
    'make_schedule', 'make_train_step', 'model_config', 'read_metrics', 'shard_batch', 'train',
    'validate_config',
]
