"""Fixtures and hooks for every test.

The ``slow`` marker (registered in pyproject.toml) is set here, by file name, rather than in the
test files: the fast tier, ``pytest -m "not slow"``, is then defined in one place, and a test
file gains or loses it without an edit of its own. A file is slow when its tests run external
programs, soak or fuzz the server, fork worker processes, or otherwise take more than about a
second each; single slow tests in otherwise fast files are listed by node name.
"""

from __future__ import annotations

import threading

import pytest

#: Files whose every test is slow: soak, fuzz, supervisor (forked workers), a real nginx or
#: HAProxy, and subprocesses that import a framework or start the server per test.
SLOW_FILES = frozenset(
    {
        "test_soak.py",
        "test_fuzz.py",
        "test_supervisor.py",
        "test_worker_recovery.py",
        "test_metrics.py",
        "test_stuck_threads.py",
        "test_nginx.py",
        "test_scale_out.py",
    }
)

#: Slow tests in files that are otherwise fast, ``file::name`` (parameters ignored): each waits
#: out a graceful-shutdown timeout or a reload, a second or more by design.
SLOW_TESTS = frozenset(
    {
        "test_cli.py::test_graceful_timeout_cuts_a_stuck_request_and_exits",
        "test_cli.py::test_graceful_shutdown_closes_idle_keep_alive_connections",
        "test_cli.py::test_second_signal_cuts_connections_and_exits",
        "test_django_runserver.py::test_runserver_autoreloader_serves_the_edited_view",
        "test_limits.py::test_graceful_timeout_cuts_a_stuck_request_and_close_still_runs",
        "test_server.py::test_graceful_shutdown_serves_the_request_of_a_connection_it_just_accepted",
        "test_health.py::test_shutdown_delay_keeps_serving_while_the_health_check_fails",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`SLOW_FILES` and :data:`SLOW_TESTS` ``slow``."""
    for item in items:
        name = item.path.name
        function = getattr(item, "originalname", item.name)
        if name in SLOW_FILES or f"{name}::{function}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Fail a test that leaves non-pool threads behind (pool threads end when idle)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t.ident not in before
        and t.is_alive()
        and not t.name.startswith(("asyncwsgi", "asyncio_", "ThreadPoolExecutor"))
    ]
    assert not leaked, f"threads leaked: {leaked}"
