"""Built-in slide model families. Importing this package imports every module in it,
and each module registers its models with ``@register_slide_model``."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
