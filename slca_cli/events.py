"""TensorBoard scalars in a run folder's events/, written without TensorBoard or TensorFlow installed.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, payload, masked CRC-32C of the
payload); each payload is an ``Event`` protocol buffer, encoded here by hand: wall_time (field 1, double),
step (2, varint), file_version (3, string) or summary (5, message of ``Value``: tag 1, simple_value 2 float).
`tensorboard --logdir runs/` reads the files; tests read them back with TensorBoard's own loader.
"""
from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

EVENTS_DIR = "events"


def _crc32c_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf stores it
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def encode_event(wall_time: float, step: int, *, scalars: Dict[str, float] = None, file_version: str = None) -> bytes:
    """One ``Event`` message: either the file header (``file_version``) or a summary of scalars."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    for tag, value in (scalars or {}).items():
        summary_value = _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
        out += _field(5, 2, _field(1, 2, summary_value))
    return out


def frame(record: bytes) -> bytes:
    """A TFRecord: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record))


class ScalarWriter:
    """Appends scalars to one event file under ``run_dir/events/`` (a new file per process start, as TensorBoard
    expects; a resumed run adds a file and TensorBoard merges them by step)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = None
        if not enabled:
            return
        folder = Path(run_dir) / EVENTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname() or 'host'}.slca"
        self._append([frame(encode_event(now, 0, file_version="brain.Event:2"))])

    def add(self, step: int, scalars: Dict[str, float]) -> None:
        if self.path is not None and scalars:
            self._append([frame(encode_event(time.time(), step, scalars=scalars))])

    def add_series(self, tag: str, points: Iterable[Tuple[int, float]]) -> None:
        if self.path is not None:
            now = time.time()
            self._append([frame(encode_event(now, step, scalars={tag: value})) for step, value in points])

    def _append(self, records: List[bytes]) -> None:
        with open(self.path, "ab") as handle:
            handle.write(b"".join(records))
