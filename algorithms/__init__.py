"""Built-in algorithm plugins. Every module of this package is imported here, so a new
plugin file registers itself (``@register``) without editing this file."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
