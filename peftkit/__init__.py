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
from .core.adapters import active_adapters, adapters, set_active  # noqa: E402
from .core.apply import apply, delete, disabled, has_adapter, merge, unload, unmerge  # noqa: E402
from .core.calibration import calibrate  # noqa: E402
from .core.config import AdapterConfig, ConfigError  # noqa: E402
from .core.io import AdapterFileError, load, load_weights, save  # noqa: E402
from .core.layer import AdapterLayer, MergeError  # noqa: E402
from .core.model_adapter import ModelAdapter  # noqa: E402
from .core.params import param_groups, print_summary, trainable_parameters  # noqa: E402
from .core.registry import config_from_dict, get_method, registered_methods  # noqa: E402
from .core.routing import BASE, mixed_batch  # noqa: E402
from .core.schedule import MethodSchedule, schedule_for  # noqa: E402
from .merging.combine import combine  # noqa: E402
from .merging.compeft import compress  # noqa: E402
from .methods.adalora import AdaLoRAConfig  # noqa: E402
from .methods.bone import BoneConfig  # noqa: E402
from .methods.bottleneck import BottleneckConfig  # noqa: E402
from .methods.dept import DePTConfig  # noqa: E402
from .methods.difffit import DiffFitConfig  # noqa: E402
from .methods.dora import DoRAConfig  # noqa: E402
from .methods.dsee import DSEEConfig  # noqa: E402
from .methods.hydra import HydraConfig  # noqa: E402
from .methods.ia3 import IA3Config  # noqa: E402
from .methods.increlora import IncreLoRAConfig  # noqa: E402
from .methods.kronecker import DiffuseKronAConfig  # noqa: E402
from .methods.llama_adapter import LlamaAdapterConfig  # noqa: E402
from .methods.lofit import LoFiTConfig  # noqa: E402
from .methods.loldu import LoLDUConfig  # noqa: E402
from .methods.lora import LoRAConfig  # noqa: E402
from .methods.p_tuning import PTuningConfig  # noqa: E402
from .methods.pego import PEGOConfig  # noqa: E402
from .methods.prefix_tuning import PrefixTuningConfig  # noqa: E402
from .methods.prompt_tuning import PromptTuningConfig  # noqa: E402
from .methods.randlora import RandLoRAConfig  # noqa: E402
from .methods.selective import BitFitConfig, FullFineTuneConfig, HeadOnlyConfig, LNTuningConfig  # noqa: E402
from .methods.spiel import SpIELConfig  # noqa: E402
from .methods.spt import SPTConfig  # noqa: E402
from .methods.ssf import SSFConfig  # noqa: E402
from .methods.svfit import SVFitConfig  # noqa: E402
from .methods.triadaptlora import TriAdaptLoRAConfig  # noqa: E402
from .methods.vqt import VQTConfig  # noqa: E402
from .optim import GaLoreAdamW, MeZO, galore_param_groups  # noqa: E402
from .schedules import rank_budget_methods  # noqa: F401,E402  (importing schedules registers them all)
from .schedules.ist import IST  # noqa: E402
from .schedules.lisa import LISA  # noqa: E402
from .schedules.mgpo import MGPO  # noqa: E402

__all__ = [
    "AdaLoRAConfig", "AdapterConfig", "AdapterFileError", "AdapterLayer", "BitFitConfig", "BoneConfig",
    "BottleneckConfig", "ConfigError", "DSEEConfig", "DePTConfig", "DiffFitConfig", "DiffuseKronAConfig",
    "DoRAConfig", "FullFineTuneConfig", "HeadOnlyConfig", "HydraConfig", "IA3Config", "IncreLoRAConfig",
    "LNTuningConfig", "LlamaAdapterConfig", "LoFiTConfig", "LoLDUConfig", "LoRAConfig", "MergeError",
    "MethodSchedule", "ModelAdapter", "GaLoreAdamW", "MeZO", "LISA", "IST", "MGPO", "galore_param_groups", "PEGOConfig", "PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig",
    "RandLoRAConfig", "SPTConfig", "SSFConfig", "SVFitConfig", "SpIELConfig", "TriAdaptLoRAConfig",
    "BASE", "VQTConfig", "active_adapters", "adapters", "apply", "delete", "mixed_batch", "set_active", "calibrate", "combine", "compress", "config_from_dict", "disabled", "get_method", "has_adapter", "load", "load_weights",
    "merge", "param_groups", "print_summary", "registered_methods", "save", "schedule_for",
    "trainable_parameters", "unload", "unmerge",
]
