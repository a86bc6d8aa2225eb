"""Reading wandb's local run files (``run-<id>.wandb``) back: what an earlier attempt of a run logged.

A ``.wandb`` file is a LevelDB-style log (32 KiB blocks of records, each a 7-byte header: CRC32, length, kind) after
a 7-byte ``:W&B`` header, and each record is a ``wandb.proto.wandb_internal_pb2.Record``. wandb ships no reader for it
any more (the writer moved into its Go core), hence these few lines; they are used where wandb itself cannot help:
an offline run that continues knows nothing of what its earlier segments logged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # the file's ":W&B" + magic + version, and each record's CRC32 + length + kind
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes, resync: bool = False) -> Iterator[bytes]:
    """The records' payloads, reassembled where one spans blocks.

    ``data`` is the whole file, or (``resync``) its tail from a block boundary: then the pieces of a record that began
    before it are skipped.
    """
    pos, partial = (0, None) if resync else (HEADER, b"")
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + HEADER + length > len(data):  # still being written (or cut short by a crash)
            return
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE and partial is not None:
            partial += chunk
        elif kind == LAST and partial is not None:
            yield partial + chunk
            partial = b""


def _records(chunks: Iterator[bytes]):
    from wandb.proto import wandb_internal_pb2 as pb

    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        yield record


def history(path: str | Path) -> Iterator[dict]:
    """Each ``run.log`` row of one ``.wandb`` file, as ``{key: value}`` (wandb's ``_step``, ``_runtime`` included)."""
    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a wandb run file")
    for record in _records(_chunks(data)):
        if record.WhichOneof("record_type") == "history":
            yield {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}


def finished(path: str | Path) -> bool:
    """Whether the file ends with wandb's ``exit`` record: the run's last one (its tail blocks are enough to tell)."""
    path = Path(path)
    if not path.is_file():
        return False
    start = max(0, path.stat().st_size - 2 * BLOCK) // BLOCK * BLOCK
    with path.open("rb") as file:
        file.seek(start)
        tail = file.read()
    last = None
    for record in _records(_chunks(tail, resync=start > 0)):
        last = record.WhichOneof("record_type")
    return last == "exit"


def segments(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of run ``run_id`` under ``wandb_dir``, oldest first (one per attempt of the run)."""
    files = Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb")
    return sorted(files, key=lambda p: p.parent.name.split("run-", 1)[1])
