"""The exception tree. One root; every subclass carries a fixed :class:`~supervisor.policy.Reason`.

Messages are fixed text chosen at the raise site. They never hold a URL, a path under the store, a
digest, a token or a key: errors are printed, logged and sent in HTTP bodies as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from supervisor.policy import Reason

__all__ = [
    "SupervisorError",
    "unwrap_group",
]


class SupervisorError(Exception):
    """The root of every error this package raises on purpose."""

    default_reason: Reason = Reason.MALFORMED_INPUT

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason: Reason = reason if reason is not None else self.default_reason

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


@contextlib.contextmanager
def unwrap_group() -> Iterator[None]:
    """Around a task group: re-raise the first :class:`SupervisorError` inside an exception group
    as itself, so callers see ``FetchError`` or ``ChildError``, not a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        matched, _rest = group.split(SupervisorError)
        if matched is None:
            raise
        leaf: BaseException = matched
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None
