"""What trains when: per-step schedules and regularizers; importing this package registers them all
(every module in it is imported, so a new schedule file needs no edit here)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registration side effect
