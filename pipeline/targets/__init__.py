"""Target adapters: the interface (``base``), the registry of adapters and ``load_target``.

``load_target(model, ...)`` resolves a model name in three steps:

1. a name registered in the entry-point group ``audio_eagle.model_aliases`` (a callable with no arguments that
   returns a local model directory, building it if needed) stands for that directory; this is how the test
   target ``tiny`` (``pipeline.testing``) is found without the product importing test code;
2. anything else is an HF model id (in the local HF cache) or a local model directory, whose config names its
   HF ``model_type``;
3. the adapter registered for that ``model_type`` loads it: a built-in one (below) or one a package registers
   in the entry-point group ``audio_eagle.targets`` (``model_type = "package.module:AdapterClass"``), so another
   model family plugs in without editing this package. An entry point overrides a built-in of the same name.

Adapters are imported only when chosen: listing them imports no model code.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import torch

from pipeline.errors import TargetError
from pipeline.targets.base import (
    DTYPES,
    AudioTarget,
    DraftDefaults,
    KVCache,
    Sampling,
    StepOutput,
    TargetInputs,
    TargetStates,
)

__all__ = [
    "ALIAS_GROUP",
    "TARGET_GROUP",
    "AudioTarget",
    "DraftDefaults",
    "KVCache",
    "Sampling",
    "StepOutput",
    "TargetInputs",
    "TargetStates",
    "load_target",
    "model_aliases",
    "resolve_model",
    "target_adapters",
]

ALIAS_GROUP = "audio_eagle.model_aliases"
TARGET_GROUP = "audio_eagle.targets"

# The adapters this package ships, by HF model_type, as entry-point values (imported when chosen).
BUILTIN_TARGETS = {
    "qwen2_audio": "pipeline.targets.qwen2_audio:Qwen2AudioTarget",
    "qwen3_omni_moe": "pipeline.targets.qwen3_omni:Qwen3OmniTarget",
}


def model_aliases() -> dict[str, EntryPoint]:
    """Installed model-name aliases, by name."""
    return {ep.name: ep for ep in entry_points(group=ALIAS_GROUP)}


def target_adapters() -> dict[str, EntryPoint]:
    """Adapter classes by HF model_type: the built-ins, then those installed packages register."""
    adapters = {name: EntryPoint(name, value, TARGET_GROUP) for name, value in BUILTIN_TARGETS.items()}
    adapters.update({ep.name: ep for ep in entry_points(group=TARGET_GROUP)})
    return adapters


def resolve_model(model: str) -> str:
    """An alias's model directory (built on first use), or ``model`` itself (an HF id or a local directory)."""
    alias = model_aliases().get(model)
    return str(alias.load()()) if alias is not None else model


def load_target(model: str, dtype: str, device: str | torch.device) -> AudioTarget:
    """Load ``model`` (an alias, an HF id or a local directory) with the adapter of its ``model_type``."""
    from transformers import AutoConfig

    path = resolve_model(model)
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as err:
        aliases = ", ".join(f"--model {name}" for name in sorted(model_aliases()))
        aliases = aliases or "none installed: `pip install -e .` registers this project's"
        raise TargetError(
            f"cannot read a model config from {model!r}: {err}\n"
            f"Pass an HF model id already in your HF cache, a local model directory, or an alias ({aliases})."
        ) from None
    adapters = target_adapters()
    if model_type not in adapters:
        raise TargetError(f"no adapter for model_type {model_type!r}; supported: {sorted(adapters)}")
    adapter = adapters[model_type].load()
    return adapter(path, model, DTYPES[dtype], torch.device(device))
