"""Named registries that modules fill as they load: methods, row kinds, row makers, advantage estimators,
part losses, passes, metrics. A name is taken once: a second module that registers it (a user's method file
reusing a built-in name, say) is refused in one sentence."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sasr.errors import SasrError, unknown

T = TypeVar("T")
REGISTRIES: list[Registry] = []  # every registry made, for ``snapshot`` and ``restore``


def _origin(obj: object) -> str:
    """Where ``obj`` was defined, for an error sentence (a wrapper such as a LossTerm: its function's)."""
    inner = next((getattr(obj, a) for a in ("fn", "run", "make") if callable(getattr(obj, a, None))), obj)
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__qualname__)}"


class Registry(Generic[T]):
    """name -> object, in the order registered. ``kind`` names the registry in error sentences; ``name`` (its
    module's constant) and ``about`` (what a module registers there, and how) describe it in the docs."""

    def __init__(self, kind: str, name: str = "", about: str = "") -> None:
        self.kind, self.name, self.about = kind, name, about
        self._items: dict[str, T] = {}
        REGISTRIES.append(self)

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name``; the same object again is a no-op, another one under a taken name is
        refused."""
        held = self._items.get(name)
        if held is not None and held is not obj:
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


def snapshot() -> list[dict]:
    """What every registry holds now (a test that loads a user's file puts it back after: ``restore``)."""
    return [dict(r._items) for r in REGISTRIES]


def restore(held: list[dict]) -> None:
    for registry, items in zip(REGISTRIES, held):
        registry._items = dict(items)


def table(shown: int = 6) -> str:
    """Every registry as a markdown table (docs/methods.md, "Write your own hybrid", holds it; a test keeps
    the two equal): where it is, what goes in it, and what is in it (the first ``shown`` names)."""
    lines = ["| registry | what a module registers there | in it |", "| --- | --- | --- |"]
    for r in sorted(REGISTRIES, key=lambda r: r.name):
        names = [f"`{n}`" for n in r]
        held = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        lines.append(f"| `{r.name}` | {r.about} | {held or 'none yet'} |")
    return "\n".join(lines)
