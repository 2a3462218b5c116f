"""Metric sinks of a training run: ``metrics.jsonl``, TensorBoard event files, a progress bar.

TensorBoard: ``flax.metrics.tensorboard`` and ``tensorboardX``/``torch`` writers need TensorFlow or
extra packages, so :class:`EventWriter` writes the event file format itself: TFRecord framing
(``uint64 length | masked crc32c(length) | Event proto | masked crc32c(data)``) around hand-encoded
``Event{wall_time, step, summary{value{tag, simple_value}}}`` protocol buffers. TensorBoard reads
these files like any other.

References:
  TensorFlow ``core/util/event.proto`` and ``core/framework/summary.proto``; TFRecord format
  (tensorflow.org/tutorials/load_data/tfrecord); CRC-32C (Castagnoli), RFC 3720.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any

# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def _json_value(v: Any):
  v = float(v) if hasattr(v, 'dtype') or isinstance(v, float) else v
  if isinstance(v, float) and not math.isfinite(v):
    return None  # JSON has no NaN/Inf; a `diverged` record says what happened.
  return v


class JsonlWriter:
  """Appends one JSON object per logged step to ``<workdir>/metrics.jsonl``.

  Args:
    path: file path.
    resume_step: when resuming from a checkpoint at this step, records of later steps (written
      after that checkpoint by the interrupted run) are dropped, so the file ends up exactly as an
      uninterrupted run would have written it. ``None`` starts a new file.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    keep = []
    self.records: list[dict[str, Any]] = []  # The records kept from the interrupted run.
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # A line cut by a kill.
          if record.get('step', 0) <= resume_step:
            keep.append(line if line.endswith('\n') else line + '\n')
            self.records.append(record)
    with open(path, 'w') as f:
      f.writelines(keep)

  def write(self, record: dict[str, Any]) -> None:
    clean = {k: _json_value(v) for k, v in record.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(clean) + '\n')


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# TensorBoard event files.


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli polynomial, reflected 0x82F63B78)."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """Serializes a TensorFlow ``Event`` proto with scalar summaries (protobuf wire format)."""
  out = _field(1, 1) + struct.pack('<d', wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b''
    for tag, value in scalars.items():
      v = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack('<f', value)
      summary += _bytes_field(1, v)  # Summary.value (repeated Value).
    out += _bytes_field(5, summary)  # Event.summary.
  return out


def tfrecord(data: bytes) -> bytes:
  """Frames ``data`` as one TFRecord."""
  header = struct.pack('<Q', len(data))
  return header + struct.pack('<I', _masked_crc(header)) + data + struct.pack(
      '<I', _masked_crc(data))


class EventWriter:
  """Writes scalar summaries to a TensorBoard event file in ``logdir``.

  Args:
    logdir: directory (created if needed).
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.jaxnorm'
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'ab')  # noqa: SIM115 -- closed in close().
    self._file.write(tfrecord(encode_event(now, 0, file_version='brain.Event:2')))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    finite = {k: float(v) for k, v in values.items() if v is not None}
    self._file.write(tfrecord(encode_event(time.time(), step, scalars=finite)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# ----------------------------------------------------------------------------------------------
# Progress bar.


class Progress:
  """A tqdm bar over the steps with loss, accuracy and examples/second.

  Args:
    total: total steps.
    initial: first step (when resuming).
    enabled: show it (off for tests and non-interactive runs if wished).
  """

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, initial=initial, unit='step', file=sys.stderr,
                      dynamic_ncols=True)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
