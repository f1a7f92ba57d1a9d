"""Resolve `package.module:attr` names and optional dependencies with one-line errors."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import UserError, on_every_rank


def import_object(spec: str, what: str) -> Any:
    """`package.module:factory` -> the object; a clear error when it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} {spec!r} is neither a registry name nor `package.module:factory`")
    _look_in_working_folder()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{what} {spec!r}: cannot import `{module_name}` ({err}); is it on PYTHONPATH?") from None
    except Exception as err:  # the module's own code failed as it was imported (a SyntaxError, a raise)
        raise UserError(f"{what} {spec!r}: importing `{module_name}` raised {raised(err)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} {spec!r}: module `{module_name}` has no attribute `{attr}`") from None


def _look_in_working_folder() -> None:
    """`python -m dist_train` and torchrun import from the folder the run starts in; the `dist-train`
    console script and spawn's ranks do not. Append it (last: it never shadows an installed module),
    so a package there resolves alike under every launcher."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def require(module_name: str, extra: str, feature: str) -> Any:
    """Import an optional dependency, or fail with the pip extra that provides it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        install = f"`pip install 'dist-train[{extra}]'`"
        if isinstance(err, ModuleNotFoundError) and err.name == module_name:
            message = f"{feature} needs `{module_name}`: install it with {install}"
        else:  # installed, but its own import failed (a dependency of its own missing, a version clash)
            cause = str(err).splitlines()[0] if str(err) else ""
            message = f"{feature} needs `{module_name}`, which is installed but does not import "
            message += f"({type(err).__name__}: {cause}): repair it, e.g. {install}"
        raise on_every_rank(UserError(message)) from None  # the same environment on every rank of a node


def resolve(name: str, registry: dict[str, str], what: str) -> Any:
    """A registry name (mapped to `module:attr`, imported lazily) or a user import path."""
    if name in registry:
        return import_object(registry[name], what)
    if ":" not in name:
        import difflib

        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(sorted(registry))}"
        raise UserError(f"unknown {what} {name!r} ({hint}; or give `package.module:factory`)")
    return import_object(name, what)


def call_factory(factory: Any, kwargs: dict, what: str, *args: Any) -> Any:
    """Call a factory with config kwargs; unknown or missing kwargs, and an exception the factory
    raises, become one-line errors (the line names where it was raised)."""
    import inspect

    if not callable(factory):
        raise UserError(f"{what} is a {type(factory).__name__}, not a factory function or class")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            params = [p for p in signature.parameters if p not in ("split",)]
            raise UserError(f"{what}: {err} (it takes: {', '.join(params) or 'no arguments'})") from None
        kwargs = _checked_kwargs(signature, kwargs, what)
    try:
        return factory(*args, **kwargs)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{what}: the factory raised {raised(err)}") from None


# Annotations a factory argument is checked against before the call (name: accepted types, said as),
# `X | None` taking null too: a string where a number belongs failed inside the factory, as "'<' not
# supported between instances of 'str' and 'int'".
SIMPLE_ANNOTATIONS = {
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _checked_kwargs(signature: Any, kwargs: dict, what: str) -> dict:
    """Arguments whose annotation is a plain int, float, bool or str (or one of them | None) must be
    one; an argument the factory annotates `int` takes an integral float as that int, as an int key
    does (`data.num_samples=1e5` is the float 100000.0 in YAML 1.2: torch refused it in the factory)."""
    out = dict(kwargs)
    for name, value in kwargs.items():
        param = signature.parameters.get(name)
        annotation = getattr(param, "annotation", None)
        kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
        optional = isinstance(kind, str) and kind.endswith(" | None")
        kind = kind[: -len(" | None")] if optional else kind
        if kind not in SIMPLE_ANNOTATIONS or (value is None and optional):
            continue
        if kind == "int" and isinstance(value, float) and value.is_integer():
            out[name] = value = int(value)
        types, said = SIMPLE_ANNOTATIONS[kind]
        if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
            raise UserError(f"{what}: {name} must be {said}{' or null' if optional else ''}, got {value!r}")
    return out


def raised(err: Exception) -> str:
    """`Type: message (at file:line)` for an exception user code raised: where it came from, in one line."""
    import traceback

    if isinstance(err, SyntaxError) and err.filename:
        where = f"{err.filename}:{err.lineno}"
        message = err.msg
    else:
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        message = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {message} (at {where})"
