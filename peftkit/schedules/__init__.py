"""What trains when: per-step schedules and regularizers; importing this package registers them all
(every module in it is imported, so a new schedule file needs no edit here)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registration side effect

from .ist import IST  # noqa: E402  (the training schedules a user constructs by hand)
from .lisa import LISA  # noqa: E402
from .mgpo import MGPO  # noqa: E402

__all__ = ["IST", "LISA", "MGPO"]
