"""Methods: what each optimizer step trains on. One module per method or family, each registering what is its
own (its options, plan and parts, the rows it adds, its advantages, loss terms and metrics); see
docs/methods.md. A user's own method is a class in their own file: ``--method path/to/file.py:Class``.
"""

from __future__ import annotations

import importlib
from typing import Any

from sasr.contracts import file_hash, load_module, split_spec
from sasr.errors import SasrError
from sasr.methods.base import METHODS, PHASES, Method, Options, cosine, register_method

# The method modules, in the order the docs and the default comparison list their methods.
MODULES = (
    "sasr",
    "baselines",
    "chord",
    "hpt",
    "luffy",
    "relift",
    "uft",
    "prefix_rft",
    "sdft",
    "sdpo",
    "questa",
)
for _module in MODULES:
    importlib.import_module(f"sasr.methods.{_module}")
BUILT_IN = tuple(METHODS)  # the methods this package ships


def is_spec(name: str) -> bool:
    """Whether ``name`` names a user's method class (``file.py:Class`` or ``module:Class``)."""
    return ":" in name


def load_method(spec: str) -> type[Method]:
    """The method class ``spec`` names (``path/to/file.py:Class`` or ``package.module:Class``), registered under
    its ``name`` (default: the class's own name), or one sentence saying what is wrong."""
    module_name, class_name = split_spec(spec, "method", "Class")
    cls = getattr(load_module(module_name, "method", once=True), class_name, None)
    if cls is None:
        raise SasrError(f"method module '{module_name}' has no class '{class_name}'")
    return register_class(cls, spec)


def register_class(cls: Any, spec: str) -> type[Method]:
    """A user's method class (named ``spec`` in errors) registered under its ``name`` (default: the class's
    own name), or one sentence saying what is wrong. Registering the same class again is a no-op."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls is Method:
        raise SasrError(
            f"'{spec}' is not a method: a method is a subclass of sasr.methods.Method (docs/methods.md, "
            "'Write your own hybrid')"
        )
    if "name" not in vars(cls):
        cls.name = cls.__name__
    if cls.name in BUILT_IN and METHODS[cls.name] is not cls:
        raise SasrError(
            f"method '{spec}' takes the name '{cls.name}' of a built-in method; give it another name"
        )
    return METHODS.add(cls.name, cls)


def method_class(name: str) -> type[Method]:
    """A registered method by name, or a user's method by its ``file.py:Class`` spec (loaded once)."""
    return load_method(name) if is_spec(name) else METHODS[name]


def method_source(name: str) -> dict[str, str] | None:
    """For a user's method, what a run records of it: the spec and its file's sha256 (None for a built-in or
    a method from an installed module)."""
    module_name = name.rpartition(":")[0]
    if not is_spec(name) or not module_name.endswith(".py"):
        return None
    return {"spec": name, "sha256": file_hash(module_name)}


def table() -> str:
    """The built-in methods as a markdown table, one line each (the README holds it; a test keeps it current)."""
    lines = ["| method | what a step does | paper |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | {METHODS[n].summary} | {METHODS[n].paper or ''} |" for n in BUILT_IN]
    return "\n".join(lines)


def get_method(name: str, **kwargs: Any) -> Method:
    """A method by name, built with the run's budget (steps, warmup_steps, seed, batch sizes) and its options."""
    return method_class(name)(**kwargs)


__all__ = [
    "BUILT_IN",
    "METHODS",
    "PHASES",
    "Method",
    "Options",
    "cosine",
    "get_method",
    "load_method",
    "method_class",
    "method_source",
    "register_method",
]
