"""A user's own code named as ``module:name`` or ``path/to/file.py:name`` (reward functions, methods), and the
calling contracts of TRL's and verl's reward functions. A leaf: it imports nothing of sasr but its errors, so
the rewards, the tasks and the methods can all use it."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import marshal
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from sasr.errors import SasrError

_FILES: dict[tuple[Path, str], ModuleType] = {}  # (resolved path, sha256) -> its module, executed once


def split_spec(spec: str, what: str, example: str) -> tuple[str, str]:
    """'module:name' -> ('module', 'name'), or one sentence saying how ``what`` must be named."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise SasrError(f"{what} '{spec}' must look like module:{example} or path/to/file.py:{example}")
    return module_name, name


def file_hash(path: str | Path) -> str:
    """The sha256 of a file's bytes: what a run records of a user's file so that a changed file is noticed."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_module(module_name: str, what: str, once: bool = False) -> ModuleType:
    """The module ``module_name`` (a dotted name, or a ``.py`` file). ``once``: a file is executed once per
    process and content (so the classes it defines stay the same objects when named again)."""
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        path = Path(module_name)
        if not path.is_file():
            raise SasrError(f"{what} file '{path}' does not exist")
        key = (path.resolve(), file_hash(path))
        if once and key in _FILES:
            return _FILES[key]
        # executed once: under a name of its own in sys.modules, where dataclasses look its classes up
        name = f"sasr_user_{path.stem}_{key[1][:12]}" if once else path.stem
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        if once:
            sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    except ImportError as exc:
        raise SasrError(f"cannot import {what} module '{module_name}' ({exc})") from None
    if once:
        _FILES[key] = module
    return module


def forget_files(keep: dict | None) -> dict:
    """The files loaded ``once`` so far; with ``keep``, forget every file loaded since (tests isolate)."""
    held = dict(_FILES)
    if keep is not None:
        _FILES.clear()
        _FILES.update(keep)
    return held


def load_function(spec: str) -> Callable:
    """'module:function' or 'file.py:function' -> the function, or one sentence saying what is missing."""
    module_name, func_name = split_spec(spec, "reward", "function")
    func = getattr(load_module(module_name, "reward"), func_name, None)
    if not callable(func):
        raise SasrError(f"reward module '{module_name}' has no function '{func_name}'")
    return func


def function_name(fn: Callable) -> str:
    """How logs name a reward function: its __name__, as TRL's metric keys do."""
    return getattr(fn, "__name__", None) or type(fn).__name__


VERL_ARGUMENTS = ("data_source", "solution_str", "ground_truth")


def trl_contract(fn: Callable) -> bool:
    """Whether ``fn`` can be called as TRL calls a reward function: it takes ``completions`` or **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # a callable whose signature Python cannot read: let the call say
    return any(p.kind is p.VAR_KEYWORD or p.name == "completions" for p in params)


def verl_contract(fn: Callable) -> bool:
    """Whether ``fn`` is a verl reward function: compute_score(data_source, solution_str, ground_truth,
    extra_info=None, **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in VERL_ARGUMENTS)


def verl_score(fn: Callable, data_source: Any, text: str, truth: Any, extra_info: Any) -> tuple[float, dict]:
    """One completion scored as verl calls ``fn``: a float, or a dict whose 'score' is the reward and whose
    other keys are logged. Returns (score, the other keys)."""
    out = fn(data_source=data_source, solution_str=text, ground_truth=truth, extra_info=extra_info)
    if isinstance(out, dict):
        if "score" not in out:
            name = function_name(fn)
            raise SasrError(
                f"verl reward function {name} returned a dict without 'score' (keys: {sorted(out)})"
            )
        extra = {k: v for k, v in out.items() if k != "score"}
        return float(out["score"]), extra
    return float(out), {}


PYTHON_OBJECT = "python:"  # a config's name for a callable passed as an object that no import can reach


def _source_of(fn: Any) -> tuple[bytes, str]:
    """What identifies ``fn``'s code: its source text, else (defined at a prompt) its bytecode."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) or isinstance(fn, type) else type(fn)
    try:
        return inspect.getsource(target).encode(), "source"
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        return (marshal.dumps(code) if code else repr(target).encode()), "bytecode"


def qualified_name(fn: Any) -> str:
    """``module.qualname`` of a function, a partial's function or a callable instance's class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def callable_identity(fn: Any) -> dict[str, str]:
    """What a run records of a callable it was handed: its qualified name and the sha256 of its code (and of
    a partial's bound arguments), so that a resume with another function is noticed."""
    code, of = _source_of(fn)
    digest = hashlib.sha256(code)
    if isinstance(fn, functools.partial):
        digest.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
    return {"name": qualified_name(fn), "sha256": digest.hexdigest(), "of": of}


def importable_spec(fn: Any) -> str | None:
    """``module:name`` when importing that gives back ``fn`` itself (so a command line can load it again);
    None for a function of a script run as __main__, a notebook, a closure or a lambda."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in name or "." in name:
        return None
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return f"{module}:{name}" if found is fn else None


def object_spec(fn: Any) -> str:
    """How a config names a callable passed as an object: its import spec, else ``python:module.qualname``."""
    return importable_spec(fn) or f"{PYTHON_OBJECT}{qualified_name(fn)}"
