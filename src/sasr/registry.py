"""Named registries that modules fill as they load: methods, row kinds, row makers, advantage estimators,
part losses, passes, metrics. A name is taken once: a second module that registers it (a user's method file
reusing a built-in name, say) is refused in one sentence."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sasr.errors import SasrError, unknown

T = TypeVar("T")


def _origin(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class Registry(Generic[T]):
    """name -> object, in the order registered. ``kind`` names the registry in error sentences."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name``; the same object (or the same definition loaded again) again is a
        no-op, another one under a taken name is refused."""
        held = self._items.get(name)
        if held is not None and held is not obj and _origin(held) != _origin(obj):
            raise SasrError(
                f"{self.kind} name '{name}' is taken (by {_origin(held)}); give {_origin(obj)} another name"
            )
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """As a decorator: ``@LOSSES.register("my_loss")``."""
        return lambda obj: self.add(name, obj)

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._items.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self):
        return self._items.keys()

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()
