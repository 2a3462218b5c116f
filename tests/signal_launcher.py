"""Runs experiments/train.py with a step callback that acts at one step, for the launcher tests.

``JAXNORM_TEST_AT_STEP=<step>:<action>`` with ``<action>`` one of

- a signal name (``SIGTERM``, ``SIGINT``, ``SIGKILL``): the process sends it to itself after that
  step's logging, evaluation and checkpointing, exactly as a scheduler's signal arriving then;
- ``wait:<path>``: the process waits (at most 120 s) until ``<path>`` exists, holding the workdir.

Usage: ``python tests/signal_launcher.py <experiments/train.py flags>``.
"""

import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'experiments', 'train.py')


def _callback(spec: str):
  at, action = spec.split(':', 1)
  at = int(at)

  def callback(step: int) -> None:
    if step != at:
      return
    if action.startswith('wait:'):
      path, deadline = action[len('wait:'):], time.time() + 120
      while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
    else:
      os.kill(os.getpid(), getattr(signal, action))

  return callback


def main():
  import jaxnorm.training

  spec = os.environ.get('JAXNORM_TEST_AT_STEP')
  if spec:
    train = jaxnorm.training.train
    callback = _callback(spec)
    jaxnorm.training.train = lambda config, workdir, **kw: train(
        config, workdir, step_callback=callback, **kw)
  sys.argv[0] = TRAIN
  runpy.run_path(TRAIN, run_name='__main__')


if __name__ == '__main__':
  main()
