"""Output records on disk and the process identity checks."""

from __future__ import annotations

import os
from pathlib import Path

from shared.model import Stream
from workernator_runner import linux, store


def test_a_batch_holds_a_bounded_number_of_records(tmp_path: Path) -> None:
    path = tmp_path / "output"
    with path.open("wb") as f:
        for i in range(10_000):
            f.write(store.encode_record(i, Stream.STDOUT, b"x\n"))
    with store.RecordReader(path) as reader:
        sizes = []
        while batch := reader.read_available():
            sizes.append(len(batch))
    assert sum(sizes) == 10_000
    assert max(sizes) == store.MAX_BATCH_CHUNKS


def test_a_record_still_being_written_is_not_returned(tmp_path: Path) -> None:
    path = tmp_path / "output"
    record = store.encode_record(1, Stream.STDERR, b"abc")
    path.write_bytes(record[:-1])
    with store.RecordReader(path) as reader:
        assert reader.read_available() == []
        with path.open("ab") as f:
            f.write(record[-1:])
        (chunk,) = reader.read_available()
    assert (chunk.offset, chunk.next_offset, chunk.data) == (0, len(record), b"abc")


def test_same_process_needs_pid_start_time_and_boot_to_match() -> None:
    me = os.getpid()
    start = linux.process_start_time(me)
    boot = linux.boot_id()
    assert linux.same_process(me, start, boot)
    assert not linux.same_process(me, start + 1, boot)
    assert not linux.same_process(me, start, "another-boot")
    assert not linux.same_process(me, 0, boot)
    assert not linux.same_process(0, start, boot)
    assert not linux.same_process(2**22 + 12345, start, boot)  # no such pid
