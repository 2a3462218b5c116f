"""Metric sinks: metrics.jsonl (with resume truncation) and TensorBoard event files."""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from jaxnorm.training import metrics


def _crc32c_bitwise(data: bytes) -> int:
  # Independent, bit-at-a-time CRC-32C (Castagnoli polynomial 0x1EDC6F41, reflected).
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _read_varint(buf, i):
  shift = value = 0
  while True:
    b = buf[i]
    i += 1
    value |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return value, i


def _parse(buf):
  """Minimal protobuf wire-format reader: {field: [values]}."""
  out, i = {}, 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _read_varint(buf, i)
    elif wire == 1:
      value, i = struct.unpack('<d', buf[i:i + 8])[0], i + 8
    elif wire == 5:
      value, i = struct.unpack('<f', buf[i:i + 4])[0], i + 4
    else:
      n, i = _read_varint(buf, i)
      value, i = buf[i:i + n], i + n
    out.setdefault(field, []).append(value)
  return out


def _masked(crc):
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_file_is_valid_tfrecords_of_scalar_events(tmp_path):
  # Read back with an independent TFRecord + protobuf wire-format reader (TensorBoard's format).
  writer = metrics.EventWriter(str(tmp_path))
  writer.scalars(7, {'train_loss': 1.25, 'eval_accuracy': 0.5, 'grad_norm': None})
  writer.scalars(9, {'train_loss': 0.75})
  writer.close()
  (name,) = [n for n in os.listdir(tmp_path) if n.startswith('events.out.tfevents.')]
  buf = open(tmp_path / name, 'rb').read()
  records, i = [], 0
  while i < len(buf):
    header = buf[i:i + 8]
    (n,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', buf[i + 8:i + 12])[0] == _masked(_crc32c_bitwise(header))
    data = buf[i + 12:i + 12 + n]
    assert struct.unpack('<I', buf[i + 12 + n:i + 16 + n])[0] == _masked(_crc32c_bitwise(data))
    records.append(_parse(data))
    i += 16 + n
  assert records[0][3] == [b'brain.Event:2']  # file_version first.
  got = {}
  for event in records[1:]:
    for summary in event.get(5, []):
      for value in _parse(summary)[1]:
        v = _parse(value)
        got[(event[2][0], v[1][0].decode())] = v[2][0]
  assert got == {(7, 'train_loss'): 1.25, (7, 'eval_accuracy'): 0.5, (9, 'train_loss'): 0.75}


def test_jsonl_resume_drops_records_after_the_checkpoint(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  w = metrics.JsonlWriter(path)
  for step in (2, 4, 6):
    w.write({'step': step, 'train_loss': np.float32(step / 10)})
  with open(path, 'a') as f:
    f.write('{"step": 8, "train_lo')  # A line cut by a kill.
  w = metrics.JsonlWriter(path, resume_step=4)
  w.write({'step': 6, 'train_loss': float('nan')})
  records = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [2, 4, 6]
  assert records[0]['train_loss'] == float(np.float32(0.2))
  assert records[2]['train_loss'] is None  # JSON has no NaN.
  json.loads(open(path).read().splitlines()[-1])
  # A fresh run starts a new file.
  metrics.JsonlWriter(path)
  assert open(path).read() == ''
