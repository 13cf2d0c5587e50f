"""A tiny name -> object registry used for op handlers, data readers, metrics, solvers and profiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from onnxmpq.errors import InternalError, OnnxmpqError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; registering a name twice is a bug and raises.

    Example:
        >>> READERS = Registry[type]("data reader")
        >>> @READERS.register("npz")
        ... class NpzReader: ...
        >>> READERS.get("npz").__name__
        'NpzReader'
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise InternalError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise OnnxmpqError(f"unknown {self.kind} {name!r}.", f"choose one of: {known}.") from None

    def get_or_none(self, name: str) -> T | None:
        return self._items.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

