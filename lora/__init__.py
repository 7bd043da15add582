"""From-scratch LoRA for any nn.Module: inject by regex, train, merge, and save in PEFT's format.

    from lora import LoRAConfig, inject_lora, mark_only_lora_trainable, save_adapter
    config = LoRAConfig(r"audio_tower.*self_attn\.(q|k|v|out)_proj", r=16, alpha=32)
    inject_lora(model, config)                 # -> list of injected module paths
    mark_only_lora_trainable(model, also=["audio_proj"])
    ...train...
    save_adapter(model, "out/", config)        # adapter_model.safetensors + adapter_config.json
"""

from lora.adapter import load_adapter, save_adapter
from lora.config import LoRAConfig
from lora.diagnose import DiagnosisReport, diagnose, first_nonfinite_module
from lora.inject import (cast_frozen, inject_lora, lora_layers, lora_state_dict, mark_only_lora_trainable, merge_lora,
                         unmerge_lora)
from lora.layer import LinearWithLoRA
from lora.summary import TrainableSummary, trainable_summary

__all__ = [
    "DiagnosisReport",
    "cast_frozen",
    "LoRAConfig",
    "LinearWithLoRA",
    "TrainableSummary",
    "diagnose",
    "first_nonfinite_module",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "save_adapter",
    "trainable_summary",
    "unmerge_lora",
]
