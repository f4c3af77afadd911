from __future__ import annotations

import threading

import pytest


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
