"""Process memory settings of the exporter, in force as soon as this module is imported.

Two things keep the exporter's resident memory down (docs/benchmarks.md, "Memory"):

- prometheus_client is imported without running its package __init__, which imports the
  exposition module and with it http.server's client half, urllib.request, wsgiref and ssl (the
  exporter uses only metrics_core, samples and the families of core). The package module is a
  stand-in whose attributes load on first use: `prometheus_client.<submodule>` imports just
  that submodule; any other name (`prometheus_client.REGISTRY`, `from prometheus_client import
  CollectorRegistry`) runs the real __init__ once, so every use still works, at the old cost.
- glibc's malloc keeps one arena per thread that ever contended (up to 8 per core); the
  exporter's dozen threads mostly wait, so two arenas are enough.

exporter.scrape imports this module before anything else of prometheus_client; the application's
side (exporter.instrument) never does, so it is not affected.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import importlib.util
import sys
import threading

# mallopt(3) parameter numbers (malloc.h).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


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
limit_malloc_arenas()
