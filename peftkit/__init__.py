"""peftkit: parameter-efficient fine-tuning methods of the research literature behind one small API.

    import peftkit
    model = peftkit.apply(model, peftkit.LoRAConfig(r=16, alpha=32, targets="all-linear"))
    peftkit.print_summary(model)
    peftkit.save(model, "adapter/")
    model = peftkit.load(base_model, "adapter/")
    plain = peftkit.unload(peftkit.merge(model))
"""

__version__ = "0.1.0"

from . import methods  # noqa: F401,E402  (registers every method)
from .core.apply import apply, disabled, has_adapter, merge, unload, unmerge  # noqa: E402
from .core.config import AdapterConfig, ConfigError  # noqa: E402
from .core.io import AdapterFileError, load, load_weights, save  # noqa: E402
from .core.layer import AdapterLayer, MergeError  # noqa: E402
from .core.params import print_summary, trainable_parameters  # noqa: E402
from .core.registry import config_from_dict, get_method, registered_methods  # noqa: E402
from .core.schedule import MethodSchedule, schedule_for  # noqa: E402
from .methods.dora import DoRAConfig  # noqa: E402
from .methods.ia3 import IA3Config  # noqa: E402
from .methods.lora import LoRAConfig  # noqa: E402
from .methods.prompt_tuning import PromptTuningConfig  # noqa: E402
from .methods.selective import FullFineTuneConfig, HeadOnlyConfig  # noqa: E402
from .schedules import rank_budget_methods  # noqa: F401,E402  (importing schedules registers them all)

__all__ = [
    "AdapterConfig", "AdapterFileError", "AdapterLayer", "ConfigError", "DoRAConfig", "FullFineTuneConfig",
    "HeadOnlyConfig", "IA3Config", "LoRAConfig", "MergeError", "MethodSchedule", "PromptTuningConfig", "apply",
    "config_from_dict", "disabled", "get_method", "has_adapter", "load", "load_weights", "merge",
    "print_summary", "registered_methods", "save", "schedule_for", "trainable_parameters", "unload", "unmerge",
]
