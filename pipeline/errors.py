"""Error rows: how their reason is written, and which of them a rerun tries again.

An error row's ``error`` is ``<kind>: <detail>``; the summary counts rows by kind. Some
failures say nothing about the image: a storage error that outlived its retries, a GPU out
of memory because of what else ran beside it, a worker killed at a memory cap that a rerun
may raise. Their kind ends in ``(retryable)``, and a rerun processes those keys again and
replaces their error rows (pipeline.supersede); every other error row is final (not an
image, truncated, too large): trying again would give the same answer.
"""

from __future__ import annotations

RETRYABLE = "(retryable)"


def retryable(kind: str, detail: str) -> str:
    """The error text of a failure that a rerun should try again."""
    return f"{kind} {RETRYABLE}: {detail}"


def is_retryable(error: str | None) -> bool:
    return error is not None and error.split(":", 1)[0].endswith(RETRYABLE)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors (CUDA, and CPU allocations that failed), by name, so
    that this module needs no torch."""
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)
