"""The reproduction harness: resumable study parts, training runs, claims and their table.

A *study* reproduces one paper's claims. It is a config (``experiments/configs/<paper>.py``, with
``get_config('smoke' | 'cpu' | 'full')``) plus a study function ``run(config, study)`` in
``jaxnorm.studies.<paper>`` that measures through :class:`StudyDir` and returns a list of
:class:`Claim`. :func:`run_study` runs it and writes ``claims.json`` and the printed table.

Everything a study computes is kept in its working directory, so a killed study resumes where it
stopped:

- ``parts/<name>.json``: the result of each :meth:`StudyDir.part` (a measurement); a part whose file
  exists is read back, not recomputed.
- ``runs/<name>/``: each :meth:`StudyDir.train` run is a :func:`jaxnorm.training.train` workdir
  (checkpoints, ``metrics.jsonl``), resumed from its last checkpoint; a finished run is read back.
- ``*.png``: the figures; ``claims.json``: the claims.

A claim records the paper's value beside the measured one, with a ``verdict``:
``'reproduced'`` (the measurement shows the claim), ``'partly'`` (it shows part of it, or shows it
only at this scale's precision), ``'not'`` (it contradicts it) or ``'not_run'`` (the measurement
needs a larger scale than the one run).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxnorm.functional._checks import check_choice, fail

_LAYER = 'jaxnorm.studies'
SCALES = ('smoke', 'cpu', 'full')
VERDICTS = ('reproduced', 'partly', 'not', 'not_run')


@dataclasses.dataclass
class Claim:
  """One claim of a paper, the paper's number, jaxnorm's measurement and the verdict.

  Attributes:
    claim: the claim, in one sentence.
    paper_value: the paper's number or statement (and its source in the paper).
    measured: jaxnorm's number (None when not run).
    unit: unit or kind of ``measured`` (e.g. ``'ratio'``, ``'% test accuracy'``).
    scale: the study scale that produced ``measured``.
    verdict: one of ``VERDICTS``.
    note: how it was measured, and why it differs from the paper where it does.
  """
  claim: str
  paper_value: Any
  measured: Any
  unit: str
  scale: str
  verdict: str
  note: str = ''

  def __post_init__(self):
    check_choice('Claim', 'verdict', self.verdict, VERDICTS)
    check_choice('Claim', 'scale', self.scale, SCALES)
    if isinstance(self.measured, float) and not math.isfinite(self.measured):
      self.measured = str(self.measured)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def verdict_from(checks: Sequence[bool], *, run: bool = True) -> str:
  """``'reproduced'`` when every check holds, ``'partly'`` when some do, ``'not'`` when none do.

  Args:
    checks: the claim's conditions, each True when the measurement shows it.
    run: False gives ``'not_run'``.
  """
  if not run:
    return 'not_run'
  checks = [bool(c) for c in checks]
  if checks and all(checks):
    return 'reproduced'
  return 'partly' if any(checks) else 'not'


def _jsonable(value):
  """``value`` with non-finite floats as strings and numpy scalars / arrays as Python values."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, 'tolist'):
    return _jsonable(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _write_json(path: str, value) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(_jsonable(value), f, indent=1, allow_nan=False)
  os.replace(tmp, path)


class StudyDir:
  """A study's working directory: cached parts, resumable training runs, figures, progress.

  Args:
    workdir: the directory (created).
    scale: the study scale (``'smoke'``, ``'cpu'`` or ``'full'``).
    log: where progress lines go (default ``print`` with flush).
  """

  def __init__(self, workdir: str, scale: str, *, log: Callable[[str], None] | None = None):
    check_choice(_LAYER, 'scale', scale, SCALES)
    self.workdir = os.path.abspath(workdir)
    self.scale = scale
    self._log = log or (lambda s: print(s, flush=True))
    self._t0 = time.time()
    try:
      os.makedirs(os.path.join(self.workdir, 'parts'), exist_ok=True)
    except OSError as e:
      fail(_LAYER, 'workdir', 'a directory that can be created',
           f'{workdir!r} ({e.strerror or e})')
    self._check_scale()

  def _check_scale(self) -> None:
    """A workdir holds one scale: mixing cached numbers of two scales would be silently wrong."""
    path = os.path.join(self.workdir, 'scale.json')
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f).get('scale')
      if old != self.scale:
        fail(_LAYER, 'workdir', f'a new directory or one of a scale={self.scale!r} study',
             f'{self.workdir!r}, which holds a scale={old!r} study')
    else:
      _write_json(path, {'scale': self.scale})

  def log(self, message: str) -> None:
    """Prints ``[elapsed] message``."""
    self._log(f'[{time.time() - self._t0:7.1f}s] {message}')

  def path(self, *names: str) -> str:
    """A path inside the workdir (its directory is created)."""
    p = os.path.join(self.workdir, *names)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  def _part_path(self, name: str) -> str:
    if not name or name.startswith('/') or '..' in name.split('/'):
      fail(_LAYER, 'name', 'a relative part name', repr(name))
    return self.path('parts', f'{name}.json')

  def has_part(self, name: str) -> bool:
    return os.path.exists(self._part_path(name))

  def part(self, name: str, fn: Callable[[], Any], *, quiet: bool = False, key=None) -> Any:
    """The result of ``fn()`` (JSON-serializable), computed once and kept as ``parts/<name>.json``.

    A rerun reads the file back instead of calling ``fn`` (non-finite floats come back as the
    strings ``'nan'``, ``'inf'``; use :func:`as_float`).

    Args:
      name: the part's name (a relative path).
      fn: computes the part.
      quiet: no progress line.
      key: what the result depends on (JSON-serializable, e.g. the config section it reads). A
        stored part computed under another key is an error, not a silently stale result.
    """
    path = self._part_path(name)
    digest = None if key is None else _digest(key)
    key_path = path[:-len('.json')] + '.key'
    if os.path.exists(path):
      if digest is not None and os.path.exists(key_path):
        with open(key_path) as f:
          old = f.read().strip()
        if old != digest:
          fail(_LAYER, 'workdir', f'a new directory, or the config that computed part {name!r}',
               f'{self.workdir!r}, whose part {name!r} was computed under another config '
               '(delete the part or use a new workdir)')
      with open(path) as f:
        return json.load(f)
    t = time.time()
    value = _jsonable(fn())
    if digest is not None:
      with open(key_path, 'w') as f:
        f.write(digest)
    _write_json(path, value)
    if not quiet:
      self.log(f'{name}: done in {time.time() - t:.1f}s')
    return value

  def train(self, name: str, config) -> dict[str, Any]:
    """Trains ``config`` in ``runs/<name>`` (resumed if interrupted); returns its summary.

    A run whose loss becomes NaN/inf is a result, not an error: the summary then has
    ``diverged=True`` and the step it diverged at. SIGTERM / SIGINT propagate
    (:class:`jaxnorm.training.Preempted`): rerunning the study resumes this run. A config that
    an earlier run of this study already trained (another part asking for the same run) is not
    trained again: its summary is returned.

    Returns:
      ``{'diverged', 'step', 'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy',
      'seconds', 'workdir'}``.
    """
    from jaxnorm import training
    from jaxnorm.training.workdir import config_json

    config = copy.deepcopy(config)
    config.progress_bar = False
    digest = hashlib.sha256(config_json(config).encode()).hexdigest()[:16]
    index_path = self.path('runs', 'index.json')
    index = {}
    if os.path.exists(index_path):
      with open(index_path) as f:
        index = json.load(f)
    same = index.get(digest)
    if same is not None and same != name and self.has_part(f'runs/{same}'):
      return self.part(f'runs/{same}', lambda: None, key=config_json(config))

    def run():
      workdir = self.path('runs', name)
      t = time.time()
      try:
        s = training.train(config, workdir)
        out = {'diverged': False, **{k: s.get(k) for k in (
            'step', 'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy')}}
      except training.NonFiniteLossError as e:
        out = {'diverged': True, 'step': e.step, 'train_loss': float('nan'),
               'train_accuracy': None, 'eval_loss': float('nan'), 'eval_accuracy': None}
      out.update(seconds=time.time() - t, workdir=os.path.relpath(workdir, self.workdir))
      return out

    cached = self.has_part(f'runs/{name}')
    if cached:
      self._adopt_run(name, config)
    if not cached:
      self.log(f'{name}: training ({config.total_steps} steps)')
    result = self.part(f'runs/{name}', run, quiet=True, key=config_json(config))
    if not cached:
      acc = result.get('eval_accuracy')
      self.log(f'{name}: ' + ('diverged at step {}'.format(result['step']) if result['diverged']
                              else f'step {result["step"]}, test accuracy {acc:.3f}')
               + f' ({result["seconds"]:.1f}s)')
    if index.get(digest) != name:
      index[digest] = name
      _write_json(index_path, index)
    return result

  def _adopt_run(self, name: str, config) -> None:
    """Keeps a finished run's result when only config fields added since it ran differ.

    A jaxnorm release that adds a config field (at a default that reproduces the old behaviour)
    changes every run's config digest. The run's own workdir decides, as it does when a run is
    resumed (:func:`jaxnorm.training.workdir.check_config`: a field the stored config lacks
    matches at its default): if it accepts ``config``, the part's key is updated; otherwise the
    part stays as it is and :meth:`part` reports the mismatch.
    """
    from jaxnorm.training import workdir as workdir_lib

    key_path = self._part_path(f'runs/{name}')[:-len('.json')] + '.key'
    digest = _digest(workdir_lib.config_json(config))
    if not os.path.exists(key_path):
      return
    with open(key_path) as f:
      if f.read().strip() == digest:
        return
    run_dir = self.path('runs', name)
    if not (os.path.exists(os.path.join(run_dir, 'config.json'))
            and workdir_lib.has_progress(run_dir)):
      return
    try:
      workdir_lib.check_config(run_dir, config)
    except workdir_lib.ConfigMismatchError:
      return
    with open(key_path, 'w') as f:
      f.write(digest)

  def run_dir(self, summary: dict[str, Any]) -> str:
    """The workdir of the run whose :meth:`train` summary is ``summary``."""
    return self.path(summary['workdir'])

  def run_states(self, config, summary: dict[str, Any]):
    """The model, and ``(step, state)`` of a :meth:`train` run at initialization (step 0) and at
    every checkpoint it saved (a run that diverged: those before the non-finite step).

    Returns:
      ``(model, [(step, TrainState), ...])`` (see :func:`load_states`).
    """
    every = config.checkpoint_every
    step = summary['step']
    last = step if not summary['diverged'] else (step - 1) // every * every
    steps = [None, *range(every, last + 1, every)]
    model, states = load_states(config, self.run_dir(summary), steps)
    return model, [(0 if s is None else s, state) for s, state in zip(steps, states, strict=True)]

  def figure(self, name: str) -> str:
    """The path of figure ``name`` (a PNG in the workdir)."""
    return self.path(f'{name}.png')


@functools.cache
def fixed_batch(dataset: str, data_dir: str | None, size: int, seed: int) -> dict[str, Any]:
  """A fixed batch of ``min(size, len)`` training examples of ``dataset`` (the first batch of an
  evaluation-order :class:`~jaxnorm.training.BatchIterator` with ``seed``), on which a study
  measures every checkpoint of its runs. Loaded once per process; do not modify it."""
  from jaxnorm.training import BatchIterator, load_dataset

  ds = load_dataset(dataset, 'train', data_dir=data_dir)
  return BatchIterator(ds, min(int(size), len(ds)), seed=int(seed), train=False).batch(0)


def _digest(key) -> str:
  return hashlib.sha256(json.dumps(_jsonable(key), sort_keys=True).encode()).hexdigest()[:16]


def load_states(config, workdir: str, steps: Sequence[int | None]):
  """The model and the :class:`~jaxnorm.training.TrainState` of a training run at each step.

  Args:
    config: the run's training config.
    workdir: the run's workdir (as written by :func:`jaxnorm.training.train`); not read when
      every step is None.
    steps: checkpointed steps; None stands for the state at initialization (the run's own seed
      and first batch, so it equals the state the run started from).

  Returns:
    ``(model, [state per step])``.
  """
  from jaxnorm.training import checkpoint, data, loop, optim
  from jaxnorm.training import steps as steps_lib

  ds = data.load_dataset(config.dataset, 'train', data_dir=config.data_dir or None,
                         image_size=config.image_size)
  model = loop.build_model(config.model, ds.num_classes)
  tx = optim.optimizer_from_config(config.optimizer, optim.schedule_from_config(config))
  mesh = steps_lib.make_mesh()
  batch = data.BatchIterator(ds, config.batch_size, seed=config.seed, train=config.augment)
  init = steps_lib.create_train_state(
      model, tx, steps_lib.shard_batch(batch.batch(0), mesh)['image'], config.seed, mesh)
  if all(step is None for step in steps):
    return model, [init for _ in steps]
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=config.keep_checkpoints)
  try:
    return model, [init if step is None else ckpt.restore(step, init)[0] for step in steps]
  finally:
    ckpt.close()


# Training-set sizes of the data sets whose size a config needs before any data is read.
TRAIN_SIZES = {'digits': 1500, 'mnist_subset': 4000, 'mnist': 60_000, 'cifar10': 50_000,
               'cifar100': 50_000, 'imagenet2012': 1_281_167}
IMAGE_SHAPES = {'digits': (8, 8, 1), 'mnist_subset': (28, 28, 1), 'mnist': (28, 28, 1),
                'cifar10': (32, 32, 3), 'cifar100': (32, 32, 3)}


def train_size(config) -> int:
  """The number of training examples of ``config.dataset`` (read from the data when unknown)."""
  if config.dataset in TRAIN_SIZES:
    return TRAIN_SIZES[config.dataset]
  if config.dataset == 'synthetic':
    return int(config.synthetic.num_examples)
  from jaxnorm.training import load_dataset

  return len(load_dataset(config.dataset, 'train', data_dir=config.data_dir or None))


def check_scale(paper: str, scale) -> None:
  """Raises ValueError, naming ``<paper>.get_config``, unless ``scale`` is one of ``SCALES``."""
  if scale not in SCALES:
    raise ValueError(f"{paper}.get_config: argument `scale` expected 'smoke', 'cpu' or 'full', "
                     f'got {scale!r}.')


def training_base(scale: str):
  """The training config the studies' runs start from: SGD + momentum 0.9, cosine, L2 5e-4.

  ``cpu`` and ``smoke``: the embedded digits set (batch 64, the 297 test images in one batch);
  ``full``: CIFAR-10 with augmentation. Evaluation only at the end, no progress bar.
  """
  from jaxnorm.training.config import default_config

  t = default_config()
  t.dataset = 'digits'
  t.augment = False
  t.batch_size = 64
  t.eval_batch_size = 304  # the 297 test digits in one batch
  t.optimizer.name = 'sgd'
  t.optimizer.momentum = 0.9
  t.optimizer.weight_decay = 5e-4
  t.schedule.name = 'cosine'
  t.schedule.warmup_steps = 0
  t.log_every = 50
  t.eval_every = 0
  t.progress_bar = False
  if scale == 'full':
    t.dataset = 'cifar10'
    t.augment = True
    t.eval_batch_size = 1000
    t.log_every = 100
  return t


def at_smoke_size(config, *, steps: int = 2, batch_size: int = 8, image_size: int = 32):
  """A copy of a (``full``-scale) run config that takes ``steps`` steps on Gaussian images.

  The data set is replaced by the ``synthetic`` source with the same image shape (ImageNet at
  ``image_size``) and as many classes, so a run config meant for an accelerator and a TFDS data
  set can be exercised anywhere: same model, optimizer and schedule, tiny batch, few steps.
  """
  import copy

  c = copy.deepcopy(config)
  classes = {'cifar100': 100, 'imagenet2012': 1000}.get(c.dataset, 10)
  shape = IMAGE_SHAPES.get(c.dataset, (image_size, image_size, 3))
  c.dataset = 'synthetic'
  c.synthetic.shape = tuple(shape)
  c.synthetic.num_classes = classes
  c.synthetic.num_examples = 2 * batch_size
  c.augment = False
  c.batch_size = c.eval_batch_size = batch_size
  c.total_steps = steps
  c.schedule.warmup_steps = min(c.schedule.warmup_steps, steps - 1)
  c.log_every = c.checkpoint_every = steps
  return c


def as_float(value) -> float:
  """A part's number back as a float (``'nan'`` / ``'inf'`` strings and None as floats)."""
  if value is None:
    return float('nan')
  return float(value)


def format_claims(claims: Sequence[Claim]) -> str:
  """The claims as a fixed-width text table."""
  def fmt(v):
    if isinstance(v, float):
      return f'{v:.3g}'
    return str(v)

  rows = [(c.verdict, fmt(c.measured), c.unit, fmt(c.paper_value), c.claim) for c in claims]
  head = ('verdict', 'measured', 'unit', 'paper', 'claim')
  widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
  widths = [min(w, 28) for w in widths]
  lines = []
  for r in [head, *rows]:
    cells = [r[i][:widths[i]].ljust(widths[i]) for i in range(4)]
    lines.append('  '.join(cells) + '  ' + r[4])
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def claims_markdown(claims: Sequence[Claim | dict]) -> str:
  """The claims as a Markdown table (claim, paper, measured, verdict), e.g. for a report."""
  def cell(v):
    if isinstance(v, float):
      v = f'{v:.3g}'
    elif isinstance(v, (list, tuple)):
      v = ' / '.join('-' if x is None else str(x) for x in v)
    return str(v).replace('|', '\\|').replace('\n', ' ')

  rows = ['| claim | paper | measured | verdict |', '| --- | --- | --- | --- |']
  for c in claims:
    c = c.to_dict() if isinstance(c, Claim) else c
    rows.append(f'| {cell(c["claim"])} | {cell(c["paper_value"])} | {cell(c["measured"])} '
                f'({cell(c["unit"])}) | **{c["verdict"]}** |')
  return '\n'.join(rows)


def write_claims(path: str, paper: str, scale: str, claims: Sequence[Claim]) -> None:
  """Writes ``claims`` to ``path`` as a JSON list of claim objects."""
  _write_json(path, [dict(c.to_dict(), paper=paper) for c in claims])


def read_claims(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return json.load(f)


def run_study(config, workdir: str, *, log: Callable[[str], None] | None = None) -> list[Claim]:
  """Runs the study of ``config`` in ``workdir``; writes ``claims.json`` and prints the table.

  Args:
    config: a study config with fields ``paper``, ``scale`` and ``study`` (the module whose
      ``run(config, study_dir)`` returns the claims), plus the study's own fields.
    workdir: the study's working directory (rerun the same command to resume).
    log: progress sink (default: print).

  Returns:
    The claims.
  """
  study = StudyDir(workdir, config.scale, log=log)
  module = importlib.import_module(config.study)
  study.log(f'{config.paper} at scale {config.scale!r} in {study.workdir}')
  claims = list(module.run(config, study))
  for c in claims:
    if not isinstance(c, Claim):
      fail(_LAYER, 'run', 'a list of Claim', type(c).__name__)
  write_claims(os.path.join(study.workdir, 'claims.json'), config.paper, config.scale, claims)
  study.log(f'wrote {len(claims)} claims to {os.path.join(study.workdir, "claims.json")}')
  (log or print)(format_claims(claims))
  return claims
