"""Hugging Face peft conversion, one module per peft type; importing this package registers them all.

Each module defines a `PeftConverter` (core/peft_convert.py) for one peftkit method: peft's type (and
variant), the config both ways (`to_peft`, `from_peft`) and how the layers' tensors are named and
stored in peft's files. The layout every type shares (files, key prefixes, validation) stays in
core/peft_format.py. A method without a converter here cannot be saved with format="peft".
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registration side effect
