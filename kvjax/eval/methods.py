"""Compression methods by name, resolved at run time from the kvjax packages.

    build("snapkv", 0.5)                     # kvjax.compress.snapkv(compression_ratio=0.5)
    build("kivi2", 0.5)                      # kvjax.quant.kivi(bits=2) (takes no ratio)
    build("chain(snapkv, kivi4)", 0.5)       # chain(snapkv(compression_ratio=0.5), kivi(bits=4))
    build("snapkv(window=32)", 0.25)         # keyword arguments are Python literals
    build("adakv('snapkv')", 0.5)            # positional literals (a bare name is a string)

The name table (`method_table`) is every public function of `kvjax.compress`, `kvjax.quant`,
`kvjax.sparse` and `kvjax.lowrank`, and of their submodules, whose return annotation is
`Compressor`; a method file that lands later shows up without changes here. `full` is an alias
of `identity`. A trailing number selects `bits` for factories that take it (`kivi2`). The sweep
ratio goes to every factory with a `compression_ratio` parameter that the name does not set.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Mapping
from typing import Any

from kvjax.compress.base import Compressor, chain

Factory = Callable[..., Compressor]
PACKAGES = ("kvjax.compress", "kvjax.quant", "kvjax.sparse", "kvjax.lowrank", "kvjax.learned")
ALIASES = {"full": "identity", "minicache": "minicache_compressor"}


def _is_factory(fn: Any) -> bool:
    if not callable(fn) or not inspect.isfunction(inspect.unwrap(fn)):
        return False  # (factories may be functools.cache wrappers)
    if fn.__name__.startswith("_"):
        return False
    ret = inspect.signature(fn).return_annotation
    return ret is Compressor or (isinstance(ret, str) and ret.split(".")[-1] == "Compressor")


def method_table(packages: tuple[str, ...] = PACKAGES) -> dict[str, Factory]:
    """{name: factory} of every Compressor factory found in `packages` (see module doc)."""
    table: dict[str, Factory] = {}
    for pkg_name in packages:
        try:
            pkg = importlib.import_module(pkg_name)
        except ImportError:
            continue
        modules = [pkg]
        for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            try:
                modules.append(importlib.import_module(f"{pkg_name}.{info.name}"))
            except ImportError:  # a half-landed method file must not break the others
                continue
        for module in modules:
            for name, fn in vars(module).items():
                if _is_factory(fn) and name not in table:
                    table[name] = fn
    for alias, target in ALIASES.items():
        if target in table:
            table[alias] = table[target]
    return table


def _literal(node: ast.AST, name: str) -> Any:
    if isinstance(node, ast.Name):
        return node.id
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"method {name!r}: arguments must be Python literals, got "
                         f"{ast.unparse(node)!r}") from None


def _parse(node: ast.AST, name: str) -> tuple[str, tuple, dict, tuple]:
    """(function name, positional args, keyword args, chained members)."""
    if isinstance(node, ast.Name):
        return node.id, (), {}, ()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fname = node.func.id
        if fname == "chain":
            if node.keywords or not node.args:
                raise ValueError(f"method {name!r}: chain takes one or more methods")
            return "chain", (), {}, tuple(_parse(a, name) for a in node.args)
        args = tuple(_literal(a, name) for a in node.args)
        kwargs = {k.arg: _literal(k.value, name) for k in node.keywords if k.arg}
        return fname, args, kwargs, ()
    raise ValueError(f"method {name!r} is not a name, name(args) or chain(a, b, ...)")


def _factory(fname: str, table: Mapping[str, Factory]) -> tuple[Factory, dict[str, Any]]:
    if fname in table:
        return table[fname], {}
    m = re.fullmatch(r"([A-Za-z_]+?)(\d+)", fname)
    if m and m.group(1) in table and "bits" in inspect.signature(table[m.group(1)]).parameters:
        return table[m.group(1)], {"bits": int(m.group(2))}
    raise ValueError(f"unknown method {fname!r}; known methods: {', '.join(sorted(table))}, "
                     "and chain(a, b, ...)")


def _takes_ratio(fn: Factory) -> bool:
    return "compression_ratio" in inspect.signature(fn).parameters


def _build(parsed: tuple, ratio: float | None, table: Mapping[str, Factory], name: str
           ) -> Compressor:
    fname, args, kwargs, members = parsed
    if fname == "chain":
        return chain(*(_build(m, ratio, table, name) for m in members))
    fn, implied = _factory(fname, table)
    kwargs = {**implied, **kwargs}
    if _takes_ratio(fn) and "compression_ratio" not in kwargs and "budget" not in kwargs:
        pos = list(inspect.signature(fn).parameters).index("compression_ratio")
        if len(args) <= pos and ratio is not None:
            kwargs["compression_ratio"] = ratio
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"method {name!r}: bad arguments for {fname}: {e}") from None
    return fn(*args, **kwargs)


def parse(name: str) -> tuple:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    try:
        tree = ast.parse(name.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"method {name!r} is not a name, name(args) or chain(a, b, ...)"
                         ) from None
    return _parse(tree.body, name)


def takes_ratio(name: str, table: Mapping[str, Factory] | None = None) -> bool:
    """Whether the sweep ratio reaches any member of method `name` (else it runs once)."""
    table = method_table() if table is None else table

    def walk(parsed: tuple) -> bool:
        fname, args, kwargs, members = parsed
        if fname == "chain":
            return any(walk(m) for m in members)
        fn, _ = _factory(fname, table)
        return (_takes_ratio(fn) and "compression_ratio" not in kwargs
                and "budget" not in kwargs)

    return walk(parse(name))


def build(name: str, ratio: float | None = None, table: Mapping[str, Factory] | None = None
          ) -> Compressor:
    """The Compressor named `name` at compression ratio `ratio` (see module doc).

    Raises ValueError listing the known methods for an unknown name.
    """
    table = method_table() if table is None else table
    return _build(parse(name), ratio, table, name)


def check(names: list[str], table: Mapping[str, Factory] | None = None) -> None:
    """ValueError for the first name that does not resolve (before any model work)."""
    table = method_table() if table is None else table
    for name in names:
        takes_ratio(name, table)
