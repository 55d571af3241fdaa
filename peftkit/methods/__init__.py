"""One file per method family; importing this package registers them all."""

from . import dora, ia3, lora, prompt_tuning, selective  # noqa: F401  (registration side effect)
