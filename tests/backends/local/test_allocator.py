"""The malloc tuning for CPU steps: done once, and skipped on request."""

import copd.backends.local.allocator as allocator


def test_done_once_on_glibc_and_skipped_on_request(monkeypatch):
    allocator.keep_freed_memory.cache_clear()
    monkeypatch.setenv("COPD_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() is False
    allocator.keep_freed_memory.cache_clear()
    monkeypatch.delenv("COPD_KEEP_FREED_MEMORY")
    assert allocator.keep_freed_memory() is True  # these machines run glibc
    assert allocator.keep_freed_memory.cache_info().currsize == 1
