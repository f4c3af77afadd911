"""Unit tests of :class:`asyncwsgi.filewrapper.FileWrapper` (``wsgi.file_wrapper``)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncwsgi.filewrapper import FileWrapper

CONTENT = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(CONTENT)
    return path


@pytest.fixture
def opened(data_file: Path) -> Iterator[io.BufferedReader]:
    with data_file.open("rb") as f:
        yield f


def test_iteration_reads_block_size_blocks() -> None:
    wrapper = FileWrapper(io.BytesIO(CONTENT), 4096)
    blocks = list(wrapper)
    assert [len(block) for block in blocks] == [4096, 4096, 2048]
    assert b"".join(blocks) == CONTENT


def test_default_block_size_is_64_kib() -> None:
    wrapper = FileWrapper(io.BytesIO(b"x" * (200 * 1024)))
    assert wrapper.block_size == 64 * 1024
    assert [len(block) for block in wrapper] == [65536, 65536, 65536, 8192]


def test_iteration_starts_at_the_current_position() -> None:
    buffer = io.BytesIO(b"0123456789")
    buffer.seek(4)
    assert b"".join(FileWrapper(buffer, 3)) == b"456789"


def test_iteration_stops_at_the_first_empty_read() -> None:
    class Reader:
        def __init__(self) -> None:
            self.reads: list[int] = []
            self.parts = [b"ab", b"c", b"", b"never"]

        def read(self, size: int) -> bytes:
            self.reads.append(size)
            return self.parts.pop(0)

    reader = Reader()
    assert list(FileWrapper(reader, 2)) == [b"ab", b"c"]
    assert reader.reads == [2, 2, 2]


def test_empty_file_gives_no_blocks() -> None:
    assert list(FileWrapper(io.BytesIO(b""))) == []


def test_close_closes_the_file_like_object() -> None:
    buffer = io.BytesIO(b"data")
    FileWrapper(buffer).close()
    assert buffer.closed


def test_close_calls_the_wrapped_close() -> None:
    class Closable:
        closes = 0

        def read(self, size: int) -> bytes:
            return b""

        def close(self) -> None:
            self.closes += 1

    obj = Closable()
    FileWrapper(obj).close()
    assert obj.closes == 1


def test_close_without_a_close_method() -> None:
    class ReadOnly:
        def read(self, size: int) -> bytes:
            return b""

    FileWrapper(ReadOnly()).close()  # nothing to close, no error


def test_sendfile_range_of_a_real_file(opened: io.BufferedReader) -> None:
    assert FileWrapper(opened).sendfile_range() == (opened.fileno(), 0, len(CONTENT))


def test_sendfile_range_after_seek(opened: io.BufferedReader) -> None:
    opened.seek(1000)
    assert FileWrapper(opened).sendfile_range() == (opened.fileno(), 1000, len(CONTENT) - 1000)


def test_sendfile_range_after_a_buffered_read(opened: io.BufferedReader) -> None:
    """``tell()`` is the logical position, not where the buffered reader's fd has got to."""
    assert opened.read(10) == CONTENT[:10]
    assert FileWrapper(opened).sendfile_range() == (opened.fileno(), 10, len(CONTENT) - 10)


def test_sendfile_range_past_the_end(opened: io.BufferedReader) -> None:
    opened.seek(len(CONTENT) + 500)
    assert FileWrapper(opened).sendfile_range() == (opened.fileno(), len(CONTENT) + 500, 0)


def test_sendfile_range_of_an_unbuffered_file(data_file: Path) -> None:
    with data_file.open("rb", buffering=0) as raw:
        raw.seek(7)
        assert FileWrapper(raw).sendfile_range() == (raw.fileno(), 7, len(CONTENT) - 7)


def test_no_sendfile_for_bytesio() -> None:
    assert FileWrapper(io.BytesIO(CONTENT)).sendfile_range() is None


def test_no_sendfile_without_fileno() -> None:
    class Reader:
        def read(self, size: int) -> bytes:
            return b""

    assert FileWrapper(Reader()).sendfile_range() is None


def test_no_sendfile_for_a_closed_file(data_file: Path) -> None:
    f = data_file.open("rb")
    f.close()
    assert FileWrapper(f).sendfile_range() is None


def test_no_sendfile_for_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb"):
        assert FileWrapper(reader).sendfile_range() is None


def test_no_sendfile_for_a_character_device() -> None:
    with open(os.devnull, "rb") as device:  # seekable, tell() works, but not a regular file
        assert device.tell() == 0
        assert FileWrapper(device).sendfile_range() is None


@pytest.mark.parametrize("fileno", [-1, "3", None])
def test_no_sendfile_for_a_bad_fileno(fileno: object) -> None:
    class Fake:
        def fileno(self) -> object:
            return fileno

        def read(self, size: int) -> bytes:
            return b""

    assert FileWrapper(Fake()).sendfile_range() is None


def test_no_sendfile_when_tell_fails(opened: io.BufferedReader) -> None:
    class Untellable:
        def fileno(self) -> int:
            return opened.fileno()

        def tell(self) -> int:
            raise OSError("not seekable")

        def read(self, size: int) -> bytes:
            return opened.read(size)

    assert FileWrapper(Untellable()).sendfile_range() is None


def test_sendfile_from_the_start_without_tell(opened: io.BufferedReader) -> None:
    class NoTell:
        def fileno(self) -> int:
            return opened.fileno()

        def read(self, size: int) -> bytes:
            return opened.read(size)

    assert FileWrapper(NoTell()).sendfile_range() == (opened.fileno(), 0, len(CONTENT))
