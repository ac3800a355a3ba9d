"""A spy on a real library's callable: it calls through and records each call's arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["Spy", "spy"]


class Spy:
    """Calls through to the wrapped callable, recording each call (`args` and the keywords)."""

    def __init__(self, wrapped: Callable[..., Any]) -> None:
        self.wrapped = wrapped
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append({"args": args, **kwargs})
        return self.wrapped(*args, **kwargs)


def spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Spy:
    """Put a Spy in place of `owner.name` for the test."""
    watcher = Spy(getattr(owner, name))
    monkeypatch.setattr(owner, name, watcher)
    return watcher
