"""Before the CLI imports nats-py: what makes `ringfence` start faster. Imported first by main.py
(only by the command line: services importing ringfence.cli modules are left as they are)."""

import importlib
import importlib.util
import sys
import types


class _ImportedOnUse(types.ModuleType):
    """Stands in sys.modules for a module until one of its attributes is used."""

    def __getattr__(self, name: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def _import_aiohttp_on_use() -> None:
    """nats-py imports aiohttp (for ws:// URLs) when it is imported: a third of the CLI's
    start-up, for a transport the CLI rarely uses; it is imported when first used instead.
    (importlib's LazyLoader does not help: `import aiohttp` itself would load it.)"""
    if "aiohttp" not in sys.modules and importlib.util.find_spec("aiohttp") is not None:
        sys.modules["aiohttp"] = _ImportedOnUse("aiohttp")


_import_aiohttp_on_use()
