"""Trains a model from an ml_collections config.

Usage::

  python experiments/train.py --config=experiments/configs/quickstart.py:smoke \
      --workdir=/tmp/jaxnorm/quickstart [--config.total_steps=60 ...]

Running again with the same ``--workdir`` resumes from its newest usable checkpoint. On several
hosts, start the same command on every host; it calls ``jax.distributed.initialize()`` first when
``--multihost`` is set (arguments come from the environment on Cloud TPU, or from
``--coordinator_address``, ``--num_processes`` and ``--process_id``).

A workdir belongs to one run: a relaunch with another config (``total_steps`` included) is
refused naming the differing fields, a second launch while one runs is refused (``<workdir>/lock``
names its host and pid; a lock left by a process that is gone is taken over), and relaunching a
finished run prints its summary and writes nothing.

SIGTERM or SIGINT (what Colab, preemptible TPU VMs and cluster schedulers send) finishes the
current step, saves a checkpoint of it and exits; the same command resumes there, and the resumed
run ends exactly as an uninterrupted one (``metrics.jsonl`` equal up to ``examples_per_second``).

Exit status (every error is one line on stderr, no traceback):

- 0: done, or the run had already finished;
- 1: an invalid flag or config value (a misspelt field gets a "did you mean"), a missing data set,
  a workdir that cannot be created or written, another run's workdir, or a workdir in use;
- 3: the loss became non-finite (the message names the step and the last good checkpoint; the
  divergence is recorded in ``metrics.jsonl``);
- 128 + the signal number (143 for SIGTERM, 130 for SIGINT): stopped by that signal after saving
  a checkpoint; run the same command again to resume.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (metrics, checkpoints).')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of hosts.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This host.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """Parses flags; a bad flag, config file or config field exits with one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    from jaxnorm.training.config import flag_error_line

    print(f'error: {flag_error_line(e)}', file=sys.stderr)
    sys.exit(1)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every save at INFO.
  import jax

  if _MULTIHOST.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  from jaxnorm.training import (
    ConfigError,
    ConfigMismatchError,
    DatasetNotFoundError,
    NonFiniteLossError,
    Preempted,
    WorkdirError,
    WorkdirLockedError,
    train,
  )

  try:
    summary = train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DatasetNotFoundError, WorkdirError, WorkdirLockedError,
          ConfigMismatchError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except NonFiniteLossError as e:
    print(f'stopped: {e}', file=sys.stderr)
    return 3
  except Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    return 128 + int(e.signum)
  keys = ('step', 'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy',
          'examples_per_second')
  print('final: ' + ', '.join(f'{k}={summary[k]:.4g}' if isinstance(summary.get(k), float)
                              else f'{k}={summary.get(k)}' for k in keys), flush=True)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
