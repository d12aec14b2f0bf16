"""Process memory settings of the exporter, in force as soon as this module is imported.

Three things keep the exporter's resident memory down (docs/bench-prometheus.md, "Memory"):

- prometheus_client is imported without running its package __init__, which imports the
  exposition module and with it http.server's client half, urllib.request, wsgiref and ssl (the
  exporter uses only metrics_core, samples and the families of core). The package module is a
  stand-in whose attributes load on first use: `prometheus_client.<submodule>` imports just
  that submodule; any other name (`prometheus_client.REGISTRY`, `from prometheus_client import
  CollectorRegistry`) runs the real __init__ once, so every use still works, at the old cost.
- psycopg imports ssl, and ssl brings the system's OpenSSL: 5 MB resident for nothing, as
  PostgreSQL's TLS is libpq's own. Its libpq binding imports ssl for an OpenSSL 1.0 setup step
  and gets an empty stand-in; asyncio (psycopg.errors imports it, for an async API the
  exporter does not use) gets an ImportError and takes its own no-TLS path. Once psycopg is
  imported, ssl is importable as usual for what really needs it (a TLS web config, rediss://).
  The same way, psycopg's imports of ctypes.util (used by its ctypes binding only) and
  typing_extensions (TypeVar's `default=`, read by type checkers only) get small stand-ins.
- glibc's malloc keeps one arena per thread that ever contended (up to 8 per core); the
  exporter's threads mostly wait and hold the GIL when they allocate, so one arena is enough.

exporter.scrape imports this module before anything else of prometheus_client; the application's
side (exporter.instrument) never does, so it is not affected.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import typing
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# mallopt(3) parameter numbers (malloc.h).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 1


def defer_package_init(package: str) -> bool:
    """Make `package` importable submodule by submodule, its __init__ run only when a name
    of the package itself is asked for; False when it is already imported (nothing to do)."""
    if package in sys.modules:
        return False
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    running = [False]

    def attribute(name: str) -> object:
        if importlib.machinery.PathFinder.find_spec(f"{package}.{name}", module.__path__):
            return importlib.import_module(f"{package}.{name}")
        with lock:
            if running[0] or (name.startswith("__") and name != "__all__"):
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            running[0] = True
            try:
                module.__dict__.pop("__getattr__", None)
                assert spec.loader is not None
                spec.loader.exec_module(module)
            finally:
                running[0] = False
        return getattr(module, name)

    module.__getattr__ = attribute  # type: ignore[method-assign]  # PEP 562
    sys.modules[package] = module
    return True


class _ImportWithout:
    """A meta path finder: finds one module, once, and runs it with others replaced in
    sys.modules (None: an import of it raises ImportError), except those loaded already.
    (Not an importlib.abc.MetaPathFinder: importlib.abc imports importlib.resources.)"""

    def __init__(self, module: str, stand_ins: dict[str, ModuleType | None]) -> None:
        self.module = module
        self.stand_ins = stand_ins

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module:
            return None
        with _finder_lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        replaced = {name: module for name, module in self.stand_ins.items()
                    if sys.modules.get(name) is None or _is_stand_in(sys.modules[name])}
        if not replaced:
            return None  # the real ones are loaded: nothing to save
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return None
        loader = spec.loader

        class _Loader(importlib.machinery.SourceFileLoader):
            def exec_module(self, module: ModuleType) -> None:
                had = {name: sys.modules.get(name, module) for name in replaced}  # module: none
                sys.modules.update(replaced)  # type: ignore[arg-type]
                try:
                    loader.exec_module(module)
                finally:
                    for name, stand_in in replaced.items():
                        if sys.modules.get(name) is stand_in:
                            if had[name] is module:
                                del sys.modules[name]
                            else:
                                sys.modules[name] = had[name]

        spec.loader = _Loader(loader.name, loader.path)
        return spec


_finder_lock = threading.Lock()
_finders: list[_ImportWithout] = []


def _is_stand_in(module: object) -> bool:
    return any(module is stand_in for f in _finders for stand_in in f.stand_ins.values())


def import_without(module: str, **stand_ins: ModuleType | None) -> bool:
    """The first import of `module` runs with the modules named (dots as `__`) replaced by
    their stand-ins (None: importing it fails, and `module` takes its fallback); False when
    `module` is already imported."""
    if module in sys.modules:
        return False
    finder = _ImportWithout(module, {k.replace("__", "."): v for k, v in stand_ins.items()})
    _finders.append(finder)
    sys.meta_path.insert(0, finder)
    return True


def release_modules(*names: str) -> list[str]:
    """Forget the modules named and their submodules, so that their code and data are freed
    once nothing else refers to them: for start-up work (argparse, PyYAML) that would
    otherwise stay resident for the process's life. An import of one later loads it again.
    Returns the names forgotten."""
    prefixes = tuple(f"{name}." for name in names)
    gone = [name for name in list(sys.modules)
            if name in names or name.startswith(prefixes)]
    for name in gone:
        module = sys.modules.pop(name, None)
        parent, _, child = name.rpartition(".")
        holder = sys.modules.get(parent) if parent else None
        if holder is not None and getattr(holder, child, None) is module:
            delattr(holder, child)  # a package keeps its imported submodules as attributes
    gc.collect()
    return gone


def _distribution_version(name: str) -> str:
    """A distribution's version from its installed `.dist-info` folder's name, for
    importlib.metadata.version() without importlib.metadata (email, zipfile, csv: ~2.5 MB)."""
    wanted = name.lower().replace("-", "_").replace(".", "_")
    for folder in sys.path:
        try:
            entries = os.listdir(folder or ".")
        except OSError:
            continue
        for entry in entries:
            base, dot, suffix = entry.rpartition(".")
            if dot and suffix == "dist-info":
                dist, _, version = base.partition("-")
                if dist.lower().replace(".", "_") == wanted and version:
                    return version
    raise _PackageNotFoundError(name)


class _PackageNotFoundError(ModuleNotFoundError):
    """importlib.metadata.PackageNotFoundError's stand-in."""


def _metadata_stand_in() -> ModuleType:
    module = ModuleType("importlib.metadata", "stand-in: see exporter.lean")
    module.version = _distribution_version  # type: ignore[attr-defined]
    module.PackageNotFoundError = _PackageNotFoundError  # type: ignore[attr-defined]
    return module


def _load_aside(name: str, path: Sequence[str] | None = None) -> ModuleType:
    """The real module `name` (found on path, or sys.path), run in a module of its own that is
    not put in sys.modules: what a stand-in hands over to when asked for more than it has."""
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    return real


def _ctypes_util_stand_in() -> ModuleType:
    """ctypes.util's stand-in for psycopg's import: psycopg.pq.misc imports it for one
    find_library() that only its pure-Python libpq binding calls; the real module brings
    subprocess, tempfile, shutil, bz2 and lzma (1.3 MB resident). Its find_library runs the
    real one, loaded aside, should anything call it."""
    module = ModuleType("ctypes.util", "stand-in: see exporter.lean")

    def find_library(name: str) -> str | None:
        found: str | None = _load_aside("ctypes.util", ctypes.__path__).find_library(name)
        return found

    module.find_library = find_library  # type: ignore[attr-defined]
    return module


def _typing_extensions_stand_in() -> ModuleType:
    """typing_extensions' stand-in for psycopg's import: on Python 3.11 and 3.12 psycopg takes
    only TypeVar from it, for the `default=` of its generic row types, which only type checkers
    read; the real module is 0.4 MB resident. Its TypeVar makes typing's (the default left
    out); any other name loads the real module and gives its attribute."""
    module = ModuleType("typing_extensions", "stand-in: see exporter.lean")

    def type_var(name: str, *constraints: Any, bound: Any = None, covariant: bool = False,
                 contravariant: bool = False, **_typing_only: Any) -> Any:
        return typing.TypeVar(name, *constraints, bound=bound, covariant=covariant,
                              contravariant=contravariant)

    def attribute(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        real = sys.modules.get("typing_extensions")
        if real is None or real is module:  # (while psycopg imports: this stand-in)
            real = module.__dict__.get("_real")
            if real is None:
                try:
                    real = module.__dict__["_real"] = _load_aside("typing_extensions")
                except ImportError:
                    raise AttributeError(name) from None
        return getattr(real, name)

    module.TypeVar = type_var  # type: ignore[attr-defined]
    module.__getattr__ = attribute  # type: ignore[method-assign]  # PEP 562
    return module


def _psycopg_binds_with_c() -> bool:
    """Whether psycopg will use its C binding (psycopg-binary or psycopg-c), not ctypes."""
    if os.environ.get("PSYCOPG_IMPL", "").lower() == "python":
        return False
    return any(importlib.util.find_spec(name) is not None
               for name in ("psycopg_binary", "psycopg_c"))


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """mallopt(M_ARENA_MAX, count) in glibc; False where there is no such call (musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, libc's among them
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


defer_package_init("prometheus_client")
import_without("asyncio", ssl=None)
# psycopg's libpq bindings import ssl only to have Python set up OpenSSL's locking callbacks,
# which OpenSSL 1.1 and later do not need (and psycopg-binary's libpq has its own OpenSSL,
# which Python's ssl never touches): an empty stand-in satisfies that import. psycopg and
# psycopg-binary read their own version with importlib.metadata: the stand-in reads it from
# the .dist-info folder's name.
# With its C binding, psycopg never calls ctypes.util (above).
import_without("psycopg", ssl=ModuleType("ssl", "stand-in: see exporter.lean"),
               importlib__metadata=_metadata_stand_in(),
               typing_extensions=_typing_extensions_stand_in(),
               **({"ctypes__util": _ctypes_util_stand_in()} if _psycopg_binds_with_c() else {}))
# PyYAML without libyaml's binding: the exporter reads its small files with the pure-Python
# safe loader (exporter/yamlload.py), and the binding's module keeps the yaml package alive
# for good, so that it could not be let go of after start-up (release_modules).
import_without("yaml", **{"yaml___yaml": None})
limit_malloc_arenas()
