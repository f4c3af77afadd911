"""Unit tests of the thread seam, :class:`ResponseSink` and :class:`RequestBody`.

The event loop is a fake whose ``call_soon_threadsafe`` queues callbacks; the test thread plays
the loop and runs them. Worker threads are plain threads. Every hand-over between the two sides
is synchronised with events: the sink's and the body's own wait primitives are replaced by
subclasses that announce each wait before it starts, so a test knows a worker is blocked without
sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwsgi.bridge import EMPTY_BODY, RequestBody, ResponseSink
from asyncwsgi.errors import ClientDisconnected
from asyncwsgi.events import ResponseHead as Head
from asyncwsgi.filewrapper import FileWrapper
from asyncwsgi.pool import ThreadPool

from .logwatch import watch_errors

TIMEOUT = 10.0
#: The sink's and the body's own timeout: longer than a test waits, so that a lost wake-up fails
#: the test (the worker is still blocked) instead of ending in a timeout error that looks alike.
PATIENCE = 60.0
HEAD = Head(200, b"OK", [(b"Content-Type", b"text/plain")])


class FakeLoop:
    """Queues what worker threads ask of the loop; the test thread runs it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.threads: set[int] = set()

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            self.threads.add(threading.get_ident())
            self._pending.append((callback, args))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def wait_pending(self, count: int = 1) -> None:
        """Wait until at least ``count`` callbacks are queued."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self._pending) >= count, TIMEOUT)

    def run_pending(self) -> int:
        """Run the queued callbacks in this thread; return how many ran."""
        ran = 0
        while True:
            with self._cond:
                if not self._pending:
                    return ran
                callback, args = self._pending.popleft()
            callback(*args)
            ran += 1

    def wake(self) -> None:
        """Wake :meth:`run_until` without a callback (a worker has finished)."""
        with self._cond:
            self._cond.notify_all()

    def run_until(self, stop: Callable[[], bool]) -> None:
        """Run callbacks as they come, in this thread, until ``stop()`` is true."""
        while not stop():
            with self._cond:
                assert self._cond.wait_for(lambda: bool(self._pending) or stop(), TIMEOUT)
            self.run_pending()
        self.run_pending()


class SpyEvent(threading.Event):
    """A :class:`threading.Event` that announces each ``wait()`` before blocking."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.entered.release()
        return super().wait(timeout)

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=TIMEOUT), "the worker never waited"


class SpyCondition(threading.Condition):
    """A :class:`threading.Condition` that announces each ``wait()`` before blocking."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.entered = threading.Semaphore(0)
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.entered.release()
        return super().wait(timeout)

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=TIMEOUT), "the reader never waited"


class Worker:
    """Run ``fn`` in a plain thread and keep its result or exception."""

    def __init__(self, fn: Callable[[], Any], on_done: Callable[[], None] | None = None) -> None:
        self.fn = fn
        self.on_done = on_done
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()
            if self.on_done is not None:
                self.on_done()

    def join(self) -> Any:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the worker is still blocked"
        if self.error is not None:
            raise self.error
        return self.result


class Target:
    """The connection side of both objects: records what the loop is asked to do."""

    def __init__(self) -> None:
        self.data: list[tuple[ResponseSink, Head | None, list[bytes], bool]] = []
        #: The ``body_length`` of each delivery.
        self.lengths: list[int | None] = []
        self.files: list[tuple[ResponseSink, Head, FileWrapper, int, int]] = []
        self.aborts: list[ResponseSink] = []
        self.continues = 0
        self.resumes = 0
        self.threads: set[int] = set()

    def on_response_data(
        self,
        sink: ResponseSink,
        head: Head | None,
        chunks: list[bytes],
        end: bool,
        body_length: int | None,
    ) -> None:
        self.threads.add(threading.get_ident())
        self.data.append((sink, head, chunks, end))
        self.lengths.append(body_length)

    def on_response_file(
        self, sink: ResponseSink, head: Head, wrapper: FileWrapper, offset: int, count: int
    ) -> None:
        self.threads.add(threading.get_ident())
        self.files.append((sink, head, wrapper, offset, count))

    def on_response_abort(self, sink: ResponseSink) -> None:
        self.threads.add(threading.get_ident())
        self.aborts.append(sink)

    def send_continue(self) -> None:
        self.threads.add(threading.get_ident())
        self.continues += 1

    def resume_body(self) -> None:
        self.threads.add(threading.get_ident())
        self.resumes += 1


def make_sink(
    loop: FakeLoop, target: Target, high_water: int = 100, timeout: float = PATIENCE
) -> tuple[ResponseSink, SpyEvent]:
    sink = ResponseSink(loop.call_soon_threadsafe, target, high_water, timeout, True)
    spy = SpyEvent()
    sink._ready = spy  # see each wait of the worker
    return sink, spy


def make_body(
    loop: FakeLoop,
    target: Target,
    high_water: int = 1000,
    expect_continue: bool = False,
    timeout: float = PATIENCE,
) -> tuple[RequestBody, SpyCondition]:
    body = RequestBody(loop.call_soon_threadsafe, target, high_water, expect_continue, timeout)
    spy = SpyCondition()
    body._cond = spy  # see each wait of the reader
    return body, spy


@pytest.fixture
def loop() -> FakeLoop:
    return FakeLoop()


@pytest.fixture
def target() -> Target:
    return Target()


# -- ResponseSink -----------------------------------------------------------------------------


def test_send_below_high_water_does_not_wait(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=100)
    assert not sink.head_handed_over
    sink.send(HEAD, [b"x" * 60], 60, False)
    assert sink.head_handed_over
    sink.send(None, [b"y" * 40], 40, False)  # exactly at the mark: still no wait
    assert spy.waits == 0
    assert sink.handed == 100
    # One wake-up of the loop carries both blocks, in order.
    assert loop.run_pending() == 1
    assert [(s, head, chunks, end) for s, head, chunks, end in target.data] == [
        (sink, HEAD, [b"x" * 60, b"y" * 40], False),
    ]


def test_streamed_blocks_keep_streamed_framing(loop: FakeLoop, target: Target) -> None:
    """Blocks merged into one delivery carry no body length: no computed Content-Length."""
    sink, _ = make_sink(loop, target, high_water=100)
    sink.send(HEAD, [b"a"], 1, False)
    sink.send(None, [b"b"], 1, True)
    assert loop.run_pending() == 1
    assert target.data == [(sink, HEAD, [b"a", b"b"], True)]
    assert target.lengths == [None]


def test_block_after_a_delivery_schedules_another(loop: FakeLoop, target: Target) -> None:
    sink, _ = make_sink(loop, target, high_water=100)
    sink.send(HEAD, [b"a"], 1, False)
    assert loop.run_pending() == 1
    sink.send(None, [b"b"], 1, True)
    assert loop.run_pending() == 1
    assert target.data == [(sink, HEAD, [b"a"], False), (sink, None, [b"b"], True)]


def test_callbacks_run_on_the_loop_thread(loop: FakeLoop, target: Target) -> None:
    sink, _ = make_sink(loop, target)
    worker = Worker(lambda: sink.send(HEAD, [b"abc"], 3, True))
    worker.join()
    assert loop.threads == {worker.thread.ident}
    loop.run_pending()
    assert target.threads == {threading.get_ident()}
    assert target.data == [(sink, HEAD, [b"abc"], True)]
    assert target.lengths == [3]  # the whole body came with its head


def test_send_above_high_water_waits_until_written(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=100)
    worker = Worker(lambda: sink.send(HEAD, [b"x" * 300], 300, False))
    spy.wait_entered()
    assert not worker.done.is_set()
    assert loop.run_pending() == 1  # the chunk was handed over before the wait
    assert target.data[0][2] == [b"x" * 300]

    sink.written(100)  # 200 still unsent, above the mark: the worker waits again
    spy.wait_entered()
    assert not worker.done.is_set()
    sink.written(100)  # 100 unsent: at the mark, the worker goes on
    worker.join()
    assert sink.bytes_written == 200
    assert spy.waits == 2


def test_paused_transport_blocks_until_resume(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=100)
    sink.pause()
    worker = Worker(lambda: sink.send(HEAD, [b"small"], 5, False))
    spy.wait_entered()
    loop.run_pending()
    sink.written(5)  # written, but the transport is still over its own mark
    assert not spy.is_set()
    assert not worker.done.is_set()
    sink.resume()
    worker.join()
    assert not sink.paused


def test_send_with_end_never_waits(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=10)
    sink.pause()
    sink.send(HEAD, [b"x" * 1000], 1000, True)
    assert spy.waits == 0
    loop.run_pending()
    assert target.data == [(sink, HEAD, [b"x" * 1000], True)]


def test_send_after_disconnect_raises(loop: FakeLoop, target: Target) -> None:
    sink, _ = make_sink(loop, target)
    sink.disconnect()
    with pytest.raises(ClientDisconnected):
        sink.send(HEAD, [b"x"], 1, False)
    with pytest.raises(ClientDisconnected):
        sink.send(HEAD, [b"x"], 1, True)
    with pytest.raises(ClientDisconnected):
        sink.send_file(HEAD, FileWrapper(None), 0, 10)
    assert loop.pending == 0
    assert not sink.head_handed_over


def test_disconnect_wakes_a_blocked_worker(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=10)
    worker = Worker(lambda: sink.send(HEAD, [b"x" * 100], 100, False))
    spy.wait_entered()
    sink.disconnect()
    with pytest.raises(ClientDisconnected, match="client disconnected"):
        worker.join()


def test_disconnect_wakes_a_worker_blocked_by_pause(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=10)
    sink.pause()
    worker = Worker(lambda: sink.send(HEAD, [b"x"], 1, False))
    spy.wait_entered()
    sink.disconnect()
    with pytest.raises(ClientDisconnected, match="client disconnected"):
        worker.join()


def test_send_gives_up_after_the_timeout(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=10, timeout=0.01)
    with pytest.raises(ClientDisconnected, match="read nothing"):
        sink.send(HEAD, [b"x" * 100], 100, False)
    assert spy.waits == 1


def test_send_file_hands_over_without_waiting(loop: FakeLoop, target: Target) -> None:
    sink, spy = make_sink(loop, target, high_water=10)
    wrapper = FileWrapper(None)
    sink.send_file(HEAD, wrapper, 7, 1_000_000)
    assert sink.head_handed_over
    assert spy.waits == 0
    loop.run_pending()
    assert target.files == [(sink, HEAD, wrapper, 7, 1_000_000)]


def test_abort_asks_the_loop(loop: FakeLoop, target: Target) -> None:
    sink, _ = make_sink(loop, target)
    sink.abort()
    loop.run_pending()
    assert target.aborts == [sink]


def test_many_chunks_through_a_small_window(loop: FakeLoop) -> None:
    """Worker and loop race on every chunk; no wake-up may be lost (the timeout would fire)."""
    count = 2000
    done = threading.Event()
    received: list[bytes] = []

    class Writing(Target):
        """Writes each chunk at once, as a transport with room would."""

        def on_response_data(
            self,
            sink: ResponseSink,
            head: Head | None,
            chunks: list[bytes],
            end: bool,
            body_length: int | None,
        ) -> None:
            received.extend(chunks)
            sink.written(sum(map(len, chunks)))
            if end:
                done.set()

    sink = ResponseSink(loop.call_soon_threadsafe, Writing(), 128, PATIENCE, False)

    def produce() -> None:
        sink.send(HEAD, [b"%063d" % 0], 63, False)
        for i in range(1, count):
            sink.send(None, [b"%063d" % i], 63, False)
        sink.send(None, [], 0, True)

    worker = Worker(produce, on_done=loop.wake)
    loop.run_until(lambda: done.is_set() or worker.done.is_set())
    worker.join()
    assert len(received) == count
    assert received[-1] == b"%063d" % (count - 1)
    assert sink.handed == sink.bytes_written == 63 * count


# -- RequestBody ------------------------------------------------------------------------------


def test_read_everything(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    assert body.feed(b"hello ") is False
    body.feed(b"world")
    body.feed_eof()
    assert body.read() == b"hello world"
    assert body.read() == b""
    assert body.read(10) == b""
    assert spy.waits == 0


def test_read_none_reads_everything(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target)
    body.feed(b"abc")
    body.feed_eof()
    assert body.read(None) == b"abc"


def test_read_n_returns_once_n_bytes_are_there(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    body.feed(b"abcdef")
    assert body.read(3) == b"abc"  # no end of body yet: must not wait for it
    assert body.read(0) == b""
    assert body.read(3) == b"def"
    assert spy.waits == 0
    body.feed(b"gh")
    body.feed_eof()
    assert body.read(10) == b"gh"
    assert body.read(1) == b""


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"\n")), max_size=12),
    sizes=st.lists(st.integers(min_value=-1, max_value=50), min_size=1, max_size=30),
    lines=st.booleans(),
)
def test_reads_across_fed_chunks_give_back_the_body_in_order(
    pieces: list[bytes], sizes: list[int], lines: bool
) -> None:
    """Whatever the chunks fed (bytes or h11's bytearrays) and the read or readline sizes, the
    reads return ``bytes`` that add up to the body, each the size asked for, or one line."""
    body = RequestBody(FakeLoop().call_soon_threadsafe, Target(), 1 << 20, False, PATIENCE)
    whole = b"".join(pieces)
    for n, piece in enumerate(pieces):
        body.feed(bytearray(piece) if n % 2 else piece)
    body.feed_eof()
    out = []
    for size in sizes:
        data = body.readline(size) if lines else body.read(size)
        assert type(data) is bytes
        rest = whole[sum(map(len, out)) :]
        if lines:
            end = rest.find(b"\n")
            expected = rest if end < 0 else rest[: end + 1]
            assert data == (expected if size < 0 else expected[:size])
        else:
            assert data == (rest if size < 0 else rest[:size])
        out.append(data)
    out.append(body.read())
    assert b"".join(out) == whole


def test_readline(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    body.feed(b"line one\nline two\nrest")
    assert body.readline() == b"line one\n"  # a full line is there: no wait
    assert body.readline() == b"line two\n"
    assert spy.waits == 0
    body.feed_eof()
    assert body.readline() == b"rest"
    assert body.readline() == b""


def test_readline_with_size(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    body.feed(b"abcdef\ngh\n")
    assert body.readline(4) == b"abcd"
    assert body.readline(4) == b"ef\n"
    assert body.readline(1) == b"g"
    assert body.readline(-1) == b"h\n"
    assert spy.waits == 0  # every line or size was there: no wait for the end of the body


def test_readline_with_size_at_the_end(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target)
    body.feed(b"abcdef\ngh\n")
    body.feed_eof()
    assert body.readline(4) == b"abcd"
    assert body.readline(4) == b"ef\n"
    assert body.readline(1) == b"g"
    assert body.readline(None) == b"h\n"
    assert body.readline(5) == b""


def test_readlines(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target)
    body.feed(b"a\nbb\nccc\nlast")
    body.feed_eof()
    assert body.readlines() == [b"a\n", b"bb\n", b"ccc\n", b"last"]
    assert body.readlines() == []


def test_readlines_with_hint(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target)
    body.feed(b"a\nbb\nccc\nlast")
    body.feed_eof()
    assert body.readlines(3) == [b"a\n", b"bb\n"]  # stops once 3 bytes have been read
    assert body.readlines(0) == [b"ccc\n", b"last"]


def test_iteration_gives_lines(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target)
    body.feed(b"one\ntwo\nthree")
    body.feed_eof()
    assert list(body) == [b"one\n", b"two\n", b"three"]
    assert list(body) == []


def test_blocking_read_is_woken_by_feed(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    worker = Worker(lambda: body.read(5))
    spy.wait_entered()
    body.feed(b"ab")  # not enough: the reader waits again
    spy.wait_entered()
    assert not worker.done.is_set()
    body.feed(b"cdefg")
    assert worker.join() == b"abcde"
    assert body.read(2) == b"fg"


def test_blocking_read_all_is_woken_by_feed_eof(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    worker = Worker(body.read)
    spy.wait_entered()
    body.feed(b"partial ")
    spy.wait_entered()
    body.feed(b"body")
    spy.wait_entered()
    assert not worker.done.is_set()
    body.feed_eof()
    assert worker.join() == b"partial body"


def test_blocking_readline_is_woken_by_a_newline(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    worker = Worker(body.readline)
    spy.wait_entered()
    body.feed(b"no newline yet")
    spy.wait_entered()
    body.feed(b", now\nnext")
    assert worker.join() == b"no newline yet, now\n"


def test_100_continue_is_requested_once_on_the_first_read(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target, expect_continue=True)
    assert loop.pending == 0  # nothing before the app reads
    worker = Worker(lambda: body.read(6))
    spy.wait_entered()
    assert loop.run_pending() == 1
    assert target.continues == 1
    assert target.threads == {threading.get_ident()}
    body.feed(b"abc")
    spy.wait_entered()
    assert loop.pending == 0  # asked once only
    body.feed(b"def")
    assert worker.join() == b"abcdef"
    second = Worker(body.read)
    spy.wait_entered()
    body.feed_eof()
    assert second.join() == b""
    loop.run_pending()
    assert target.continues == 1


def test_no_100_continue_without_expect(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target, expect_continue=False)
    worker = Worker(body.read)
    spy.wait_entered()
    body.feed(b"data")
    body.feed_eof()
    assert worker.join() == b"data"
    loop.run_pending()
    assert target.continues == 0


def test_no_100_continue_once_the_body_is_complete(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target, expect_continue=True)
    body.feed(b"sent anyway")
    body.feed_eof()
    assert body.read() == b"sent anyway"
    loop.run_pending()
    assert target.continues == 0


def test_feed_reports_the_high_water_mark_and_draining_resumes(
    loop: FakeLoop, target: Target
) -> None:
    body, _ = make_body(loop, target, high_water=10)
    assert body.feed(b"x" * 9) is False
    assert not body.reading_paused
    assert body.feed(b"x") is True
    assert body.reading_paused
    assert body.read(4) == b"xxxx"  # 6 left: not below half the mark yet
    assert loop.pending == 0
    assert body.reading_paused
    assert body.read(2) == b"xx"  # 4 left: below half, resume reading
    assert not body.reading_paused
    assert loop.run_pending() == 1
    assert target.resumes == 1
    assert body.read(4) == b"xxxx"
    assert loop.pending == 0  # asked once


def test_reader_wanting_more_than_is_buffered_resumes_reading(
    loop: FakeLoop, target: Target
) -> None:
    body, spy = make_body(loop, target, high_water=4)
    assert body.feed(b"abcd") is True
    worker = Worker(lambda: body.read(8))
    spy.wait_entered()
    assert loop.run_pending() == 1  # reading must resume or the reader would wait forever
    assert target.resumes == 1
    assert not body.reading_paused
    body.feed(b"efgh")
    assert worker.join() == b"abcdefgh"


def test_disconnect_raises_in_a_blocked_reader(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target)
    body.feed(b"some")
    worker = Worker(body.read)
    spy.wait_entered()
    body.disconnect("client went away")
    with pytest.raises(ClientDisconnected, match="client went away"):
        worker.join()
    with pytest.raises(ClientDisconnected):
        body.read(1)
    with pytest.raises(ClientDisconnected):
        body.readline()


def test_disconnect_after_the_end_of_the_body_is_harmless(loop: FakeLoop, target: Target) -> None:
    body, _ = make_body(loop, target)
    body.feed(b"complete")
    body.feed_eof()
    body.disconnect()
    assert body.read() == b"complete"


def test_read_gives_up_after_the_timeout(loop: FakeLoop, target: Target) -> None:
    body, spy = make_body(loop, target, timeout=0.01)
    with pytest.raises(ClientDisconnected):
        body.read(1)
    assert spy.waits == 1


def test_empty_body() -> None:
    assert EMPTY_BODY.read() == b""
    assert EMPTY_BODY.read(10) == b""
    assert EMPTY_BODY.read(None) == b""
    assert EMPTY_BODY.readline() == b""
    assert EMPTY_BODY.readline(3) == b""
    assert EMPTY_BODY.readlines() == []
    assert list(EMPTY_BODY) == []


def test_client_disconnected_reports_disconnect_and_half_close(
    loop: FakeLoop, target: Target
) -> None:
    sink = ResponseSink(loop.call_soon_threadsafe, target, 1024, PATIENCE, False)
    assert sink.client_disconnected() is False
    sink.peer_closed = True  # the loop saw EOF
    assert sink.client_disconnected() is True
    sink = ResponseSink(loop.call_soon_threadsafe, target, 1024, PATIENCE, False)
    sink.disconnect()
    assert sink.client_disconnected() is True


#: A stall interval no test outlasts: the pool's stall check never wakes a thread, so what the
#: test sees comes from the wake-up in :meth:`ThreadPool.submit` alone.
NEVER = 3600.0


async def test_pool_runs_a_burst_of_calls_on_one_thread() -> None:
    """Calls submitted in one loop iteration wake one thread, which runs them all; the next
    burst finds it parked and wakes it again, instead of starting another."""
    pool = ThreadPool(asyncio.get_running_loop(), 8, name="asyncwsgi_test", stall=NEVER)
    try:
        ran: list[int] = []
        for _ in range(3):
            done = threading.Event()
            for _ in range(100):
                pool.submit(ran.append, threading.get_ident)
            pool.submit(done.set)
            assert await asyncio.to_thread(done.wait, TIMEOUT)
        assert len(ran) == 300
        assert pool.threads == 1
    finally:
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_never_loses_a_wake_up() -> None:
    """A call submitted while the only thread is going idle still runs: the thread parks, sees
    the call, and takes it, or the loop unparks it. The stall check cannot rescue a lost one."""
    pool = ThreadPool(asyncio.get_running_loop(), 1, name="asyncwsgi_test", stall=NEVER)
    try:
        for _ in range(300):
            done = threading.Event()
            pool.submit(done.set)
            assert await asyncio.to_thread(done.wait, TIMEOUT)
    finally:
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_wakes_another_thread_for_a_call_stuck_behind_a_blocked_one() -> None:
    """Two calls submitted back to back, the first blocked: the second runs in another thread
    while the first still blocks, both when the pool starts one and when it unparks one."""
    pool = ThreadPool(asyncio.get_running_loop(), 2, name="asyncwsgi_test")
    try:
        for _ in range(20):
            release = threading.Event()
            entered = threading.Semaphore(0)

            def blocked(
                entered: threading.Semaphore = entered, release: threading.Event = release
            ) -> None:
                entered.release()
                release.wait(3 * TIMEOUT)  # longer than the test waits for the second

            pool.submit(blocked)
            pool.submit(blocked)
            assert await asyncio.to_thread(entered.acquire, timeout=TIMEOUT)
            assert await asyncio.to_thread(entered.acquire, timeout=TIMEOUT), (
                "the second call waited for the first"
            )
            release.set()
        assert pool.threads == 2
    finally:
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


@pytest.mark.parametrize("side", ["request body", "response output"])
async def test_pool_wakes_a_thread_while_every_awake_one_waits_for_its_client(side: str) -> None:
    """The only thread finished a call since the last stall check, then took the next call,
    which waits for its client: for request body bytes that have not come, or for the client
    to read the response. Calls finished, yet no queued call can run until a client acts; the
    check must wake another thread all the same. (Forced here: the check runs once, by hand,
    right after a finished call.) The check used to count any finished call as progress and
    leave the queued calls behind blocked threads, which, with uploads whose bytes wait
    behind paused reading, stalled a server to a few requests a second."""
    loop = asyncio.get_running_loop()
    pool = ThreadPool(loop, 2, name="asyncwsgi_test", stall=NEVER)
    target = Target()
    body = RequestBody(loop.call_soon_threadsafe, target, 1000, False, PATIENCE)
    body._cond = body_waits = SpyCondition()
    sink = ResponseSink(loop.call_soon_threadsafe, target, 1, PATIENCE, False)
    sink._ready = sink_waits = SpyEvent()
    waited = threading.Event()

    def wait_for_the_client() -> None:
        try:
            if side == "request body":
                body.read(1)  # nothing has come yet
            else:
                sink.send(HEAD, [b"more than the client has read"], 29, False)
        except ClientDisconnected:
            pass
        waited.set()

    entered = body_waits.entered if side == "request body" else sink_waits.entered
    try:
        first = threading.Event()
        pool.submit(first.set)
        assert await asyncio.to_thread(first.wait, TIMEOUT)

        pool.submit(wait_for_the_client)
        assert await asyncio.to_thread(entered.acquire, timeout=TIMEOUT)
        queued = threading.Event()
        pool.submit(queued.set)
        assert pool.threads == 1
        pool._finished = 1  # the first call finished since the last check
        pool._check()
        assert await asyncio.to_thread(queued.wait, TIMEOUT), "the queued call never ran"
        assert pool.threads == 2
    finally:
        body.feed_eof()
        sink.disconnect()
        assert await asyncio.to_thread(waited.wait, TIMEOUT)
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


class BlockedCalls:
    """Application calls that announce they have started, then block (a sleep, a database
    call) until the test releases them."""

    def __init__(self) -> None:
        self._entered = threading.Semaphore(0)
        self._releases: list[threading.Event] = []

    def new(self) -> Callable[[], None]:
        """A call that blocks until :meth:`release` of its index, or :meth:`release_all`."""
        release = threading.Event()
        self._releases.append(release)

        def blocked() -> None:
            self._entered.release()
            release.wait(3 * TIMEOUT)

        return blocked

    async def started(self) -> None:
        """Wait until one more of the calls has started."""
        assert await asyncio.to_thread(self._entered.acquire, timeout=TIMEOUT)

    def release(self, index: int) -> None:
        self._releases[index].set()

    def release_all(self) -> None:
        for release in self._releases:
            release.set()


async def test_pool_grows_while_its_busy_threads_block_even_as_some_calls_finish() -> None:
    """Four threads block in the app (a sleep, a database call). One of them finishes its call
    and takes the next queued one, which blocks too: between two stall checks one call
    finished, for four busy threads. They do not keep up, so the check starts another thread
    for the call still queued. The check used to count any finished call as progress, so with
    many blocked threads, some finishing all the time, the pool stopped growing well short of
    --threads (44 of 64 under the sleep benchmark)."""
    pool = ThreadPool(asyncio.get_running_loop(), 8, name="asyncwsgi_test", stall=NEVER)
    calls = BlockedCalls()
    try:
        for _ in range(4):
            pool.submit(calls.new())
            pool._check()  # forced: the stall check of an interval in which nothing finished
            await calls.started()
        assert pool.threads == 4
        queued = threading.Event()
        pool.submit(calls.new())
        pool.submit(queued.set)
        calls.release(0)  # its thread finishes and takes the next call, which blocks
        await calls.started()
        pool._check()
        assert await asyncio.to_thread(queued.wait, TIMEOUT), "the queued call never ran"
        assert pool.threads == 5
    finally:
        calls.release_all()
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_unparks_a_thread_at_once_while_its_busy_ones_are_blocked() -> None:
    """Once a stall check has found the busy threads blocked, a call submitted later is taken
    by a parked thread in the same loop iteration, not a check later: with 64 threads asleep
    in the app, each new request used to wait for one of them to wake (about 1.2 ms of 50)."""
    pool = ThreadPool(asyncio.get_running_loop(), 2, name="asyncwsgi_test", stall=NEVER)
    calls = BlockedCalls()
    try:
        pool.submit(calls.new())
        await calls.started()
        first = threading.Event()
        pool.submit(first.set)
        pool._check()  # forced: nothing finished, one busy thread: blocked; a second starts
        assert await asyncio.to_thread(first.wait, TIMEOUT)
        assert pool.threads == 2
        second = threading.Event()
        pool.submit(second.set)  # the second thread has parked; no check runs from here on
        assert await asyncio.to_thread(second.wait, TIMEOUT), "the call waited for a check"
    finally:
        calls.release_all()
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_keeps_to_one_thread_while_it_keeps_up() -> None:
    """A busy thread that finished calls since the last check keeps up: no thread is added,
    whatever is queued (a CPU-bound app on one GIL gains nothing from a second thread)."""
    pool = ThreadPool(asyncio.get_running_loop(), 8, name="asyncwsgi_test", stall=NEVER)
    calls = BlockedCalls()
    try:
        pool.submit(calls.new())
        await calls.started()
        done = threading.Event()
        pool.submit(done.set)
        pool._finished = 3  # it ran three calls since the last check
        pool._check()
        assert pool.threads == 1
        calls.release(0)
        assert await asyncio.to_thread(done.wait, TIMEOUT)
        assert pool.threads == 1
    finally:
        calls.release_all()
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_shutdown_runs_queued_calls_and_stops_every_thread() -> None:
    pool = ThreadPool(asyncio.get_running_loop(), 4, name="asyncwsgi_test", stall=NEVER)
    warm = threading.Event()
    pool.submit(warm.set)
    assert await asyncio.to_thread(warm.wait, TIMEOUT)
    ran: list[int] = []
    for n in range(4):
        pool.submit(ran.append, n)
    assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0
    assert sorted(ran) == [0, 1, 2, 3]
    assert not any(thread.name.startswith("asyncwsgi_test") for thread in threading.enumerate())


async def test_pool_shutdown_runs_calls_no_thread_took() -> None:
    pool = ThreadPool(asyncio.get_running_loop(), 4, name="asyncwsgi_test")
    ran: list[int] = []
    pool.submit(ran.append, 1)  # shutdown starts before the loop wakes a thread for it
    assert pool.shutdown(TIMEOUT) == 0
    assert ran == [1]


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit, RuntimeError])
async def test_pool_thread_survives_whatever_a_call_raises(error: type[BaseException]) -> None:
    """A call raising SystemExit, KeyboardInterrupt... is logged, and the pool's only thread goes
    on to run the next calls: it is neither lost nor left counted as busy."""
    pool = ThreadPool(asyncio.get_running_loop(), 1, name="asyncwsgi_test", stall=NEVER)
    try:
        with watch_errors() as log:
            for _ in range(3):

                def boom() -> None:
                    raise error("from a call")

                pool.submit(boom)
            done = threading.Event()
            pool.submit(done.set)
            assert await asyncio.to_thread(done.wait, TIMEOUT)
        assert [r.exc_info[0] if r.exc_info else None for r in log.errors()] == [error] * 3
        assert pool.threads == 1
    finally:
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_shutdown_survives_a_queued_call_that_raises_system_exit() -> None:
    """Calls that shutdown runs itself (no thread took them) may raise anything: the next
    queued call still runs, and shutdown returns normally."""
    pool = ThreadPool(asyncio.get_running_loop(), 4, name="asyncwsgi_test")
    ran: list[int] = []

    def leave() -> None:
        raise SystemExit(1)

    pool.submit(leave)
    pool.submit(ran.append, 1)
    with watch_errors() as log:
        assert pool.shutdown(TIMEOUT) == 0
    assert ran == [1]
    assert len(log.errors()) == 1


class _ProbeLock:
    """The pool's lock, reporting when the loop thread finds it held and when a worker thread
    releases it (callbacks run in the thread concerned)."""

    def __init__(self, loop_thread: int) -> None:
        self._lock = threading.Lock()
        self._loop_thread = loop_thread
        self.loop_blocked: Callable[[], None] = lambda: None
        self.worker_released: Callable[[], None] = lambda: None

    def __enter__(self) -> bool:
        if not self._lock.acquire(blocking=False):
            if threading.get_ident() == self._loop_thread:
                self.loop_blocked()
            self._lock.acquire()
        return True

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()
        if threading.get_ident() != self._loop_thread:
            self.worker_released()


class _ParkedList(list[Any]):
    """The pool's list of parked threads, with a hook at each operation of the park/wake race."""

    def __init__(self) -> None:
        super().__init__()
        self.on_append: Callable[[], None] = lambda: None
        self.on_pop: Callable[[], None] = lambda: None
        self.after_pop: Callable[[], None] = lambda: None
        self.on_remove: Callable[[], None] = lambda: None

    def append(self, item: Any) -> None:
        super().append(item)
        self.on_append()

    def pop(self, index: Any = -1) -> Any:
        self.on_pop()
        try:
            return super().pop(index)
        finally:
            self.after_pop()

    def remove(self, item: Any) -> None:
        super().remove(item)
        self.on_remove()


async def test_pool_park_and_wake_interleaved_never_fail() -> None:
    """The race a free-threaded build (or an ill-timed GIL switch) exposes, forced step by step:
    a worker parks just as the loop, with a call to hand over, wakes a parked thread. The
    worker's "park unless a call is waiting" and the loop's "pop a parked thread" must not
    interleave: the loop popping the entry the worker has just taken back raised IndexError in
    the loop's wake-up callback. Here the worker is held right after it parked, and the loop
    right before its pop, each until the other has done all it can; the call must run and the
    loop see no error."""
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    pool = ThreadPool(loop, 1, name="asyncwsgi_test", stall=NEVER)
    parked = _ParkedList()
    probe = _ProbeLock(threading.get_ident())
    pool._parked = parked  # type: ignore[assignment]
    pool._lock = probe  # type: ignore[assignment]
    try:
        worker_parked = threading.Event()
        resume_worker = threading.Event()  # the loop reached its pop, or waits for the lock
        resume_loop = threading.Event()  # the worker took itself back, or left the lock
        popped = threading.Event()  # the loop's pop is over (or failed)
        armed = threading.Event()

        def on_append() -> None:
            if armed.is_set():
                worker_parked.set()
                assert resume_worker.wait(TIMEOUT)

        def on_pop() -> None:
            if armed.is_set():
                resume_worker.set()
                assert resume_loop.wait(TIMEOUT)

        def on_remove() -> None:  # the worker took itself back: it waits for the loop's pop
            resume_loop.set()
            if armed.is_set():
                assert popped.wait(TIMEOUT)

        parked.on_append = on_append
        parked.on_pop = on_pop
        parked.after_pop = lambda: armed.is_set() and popped.set()
        parked.on_remove = on_remove
        probe.loop_blocked = resume_worker.set
        probe.worker_released = lambda: worker_parked.is_set() and resume_loop.set()

        armed.set()
        first, second = threading.Event(), threading.Event()
        pool.submit(first.set)  # starts the thread, which parks after it: held in on_append
        assert await asyncio.to_thread(first.wait, TIMEOUT)
        assert await asyncio.to_thread(worker_parked.wait, TIMEOUT)
        pool.submit(second.set)  # the loop's wake-up meets the parking worker
        assert await asyncio.to_thread(second.wait, TIMEOUT)
        armed.clear()
        third = threading.Event()
        pool.submit(third.set)  # and the pool is still consistent: the next call runs
        assert await asyncio.to_thread(third.wait, TIMEOUT)
        assert pool.threads == 1
    finally:
        armed.clear()
        resume_worker.set()
        resume_loop.set()
        popped.set()
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0
        loop.set_exception_handler(None)
    assert not loop_errors, [context.get("exception") for context in loop_errors]


async def test_pool_runs_a_call_submitted_after_shutdown() -> None:
    """A call submitted once shutdown has stopped the threads (a file body's close() after its
    connection was cut, say) still runs, in a thread started for it, instead of waiting forever
    behind a pool that counted its ended threads as still there."""
    pool = ThreadPool(asyncio.get_running_loop(), 2, name="asyncwsgi_test", stall=NEVER)
    warm = threading.Event()
    pool.submit(warm.set)
    assert await asyncio.to_thread(warm.wait, TIMEOUT)
    assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0
    late = threading.Event()
    pool.submit(late.set)
    assert await asyncio.to_thread(late.wait, TIMEOUT)
    assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0
    assert pool.threads == 0
    assert not any(thread.name.startswith("asyncwsgi_test") for thread in threading.enumerate())


async def test_pool_thread_that_fails_to_start_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Thread.start()`` failing ("can't start new thread") is logged, the thread is not
    counted, and the stall check starts one again: the queued call runs."""
    start = threading.Thread.start
    failures = [RuntimeError("can't start new thread")]

    def flaky_start(self: threading.Thread) -> None:
        if self.name.startswith("asyncwsgi_test") and failures:
            raise failures.pop()
        start(self)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    pool = ThreadPool(asyncio.get_running_loop(), 1, name="asyncwsgi_test")
    try:
        with watch_errors() as log:
            done = threading.Event()
            pool.submit(done.set)
            assert await asyncio.to_thread(done.wait, TIMEOUT)
        assert not failures
        assert [r.getMessage() for r in log.errors()] == [
            "Cannot start a worker thread (0 of 1 running): can't start new thread "
            "(1 failure(s) since the last report); retrying"
        ]
        assert pool.threads == 1
    finally:
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0


async def test_pool_thread_that_fails_outside_a_call_is_replaced() -> None:
    """Should a thread end anyway (an error in the pool's own code, injected here into the
    queue), it is not left counted: the stall check starts another for the waiting call."""

    class FlakyQueue(deque[Any]):
        fail = True

        def popleft(self) -> Any:
            if self.fail:
                self.fail = False
                raise MemoryError("injected")
            return super().popleft()

    pool = ThreadPool(asyncio.get_running_loop(), 1, name="asyncwsgi_test")
    pool._calls = FlakyQueue()
    try:
        with watch_errors() as log:
            done = threading.Event()
            pool.submit(done.set)
            assert await asyncio.to_thread(done.wait, TIMEOUT)
        assert [r.exc_info[0] if r.exc_info else None for r in log.errors()] == [MemoryError]
        assert pool.threads == 1
    finally:
        assert await asyncio.to_thread(pool.shutdown, TIMEOUT) == 0
