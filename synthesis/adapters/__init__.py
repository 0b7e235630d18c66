"""LoRA style adapters: create, save, load, verify, switch and fuse them on a PixCell base.

An adapter is a peft LoRA on the cross-attention projections only (``attn2.to_q``,
``attn2.to_k``, ``attn2.to_v``, ``attn2.to_out.0`` of every block; r = 4, α = 4, A gaussian,
B zero), so self-attention (the geometry) stays frozen and a fresh adapter changes nothing.

On disk an adapter is one folder, in PEFT's own format plus one metadata file:

* ``adapter_model.safetensors``: the LoRA tensors with PEFT's key names
  (``base_model.model.transformer_blocks.0.attn2.to_q.lora_A.weight`` [r, in],
  ``....lora_B.weight`` [out, r]), as ``PeftModel.save_pretrained`` writes them, so
  ``PeftModel.from_pretrained(transformer, folder)`` reads it too;
* ``adapter_config.json``: the ``LoraConfig``;
* ``histosynth_adapter.json``: :class:`AdapterInfo` (domain, resolution, base id and base
  weight hash, r, α, targets, creation time, training-data checksum, validation metrics,
  histosynth version, sha256 of the weights file).

A library is a folder of such folders, one per adapter (``<root>/<name>/``); folders whose
name starts with ``.`` (temporary writes) are ignored. :func:`save_adapter` writes a whole
folder into a temporary sibling and renames it into place, so a reader never sees half an
adapter.

:func:`load_adapter` checks everything before the model is touched: the two JSON files
parse (size and depth limited) and keep their numbers within
:data:`~histosynth.synthesis.config_limits.LIMITS`; ``adapter_config.json`` sets no
LoRA field histosynth does not write (``use_dora``, ``modules_to_save``,
``layer_replication`` …: :func:`~histosynth.synthesis.config_limits.check_lora_config`);
the weights file matches the sha256 recorded in the metadata (required) *before* it is
parsed; targets / rank / α agree between the files and are the cross-attention targets,
every tensor has the shape the base expects and finite values no larger than
:data:`~histosynth.synthesis.config_limits.MAX_ADAPTER_WEIGHT`, the adapter's resolution
is the base's, and the base weight hash (:func:`base_weight_hash`) is the one the
adapter was made for. Any failure is one
:class:`EngineError` naming the folder or file and what was expected. Several adapters
can be loaded at once; :func:`activate` switches between them (or back to the plain base)
without reloading anything, and the plain base is restored exactly.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from histosynth.synthesis.engine import tiny_transformer_config
    >>> from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
    >>> def base():
    ...     torch.manual_seed(0)
    ...     return PixCellTransformer2DModel.from_config(tiny_transformer_config(64))
    >>> model, other_model = base(), base()
    >>> library = Path(tempfile.mkdtemp())
    >>> info = create_adapter(model, "he-brightfield", domain="TCGA-BRCA", base_id="tiny")
    >>> # ... train the LoRA parameters (the only ones left trainable) ...
    >>> folder = save_adapter(model, "he-brightfield", library / "he-brightfield")
    >>> load_adapter(other_model, library / "he-brightfield").name  # verified, then active
    'he-brightfield'
    >>> activate(other_model, None)  # plain base again, bit for bit

The modules: :mod:`.folder` (the files, :class:`AdapterInfo`, the library's place),
:mod:`.switch` (the adapters on a model: active, switching, fusing), :mod:`.base` (the
base's resolution and weight hash), :mod:`.save` (create and write) and :mod:`.load`
(read, verify, load).
"""

from __future__ import annotations

# re-exported without a place in __all__ (as before the split): histosynth_version,
# HASH_DTYPE, METADATA_FORMAT, PEFT_PREFIX
from histosynth.common.version import histosynth_version as histosynth_version
from histosynth.synthesis.adapters.base import base_weight_hash, model_resolution
from histosynth.synthesis.adapters.folder import (
    CONFIG_FILE,
    CROSS_ATTENTION_TARGETS,
    DEFAULT_LIBRARY,
    METADATA_FILE,
    VAE_DOWNSCALE,
    WEIGHTS_FILE,
    AdapterInfo,
    adapter_library,
    lora_config,
    validate_adapter_name,
)
from histosynth.synthesis.adapters.folder import (
    HASH_DTYPE as HASH_DTYPE,
)
from histosynth.synthesis.adapters.folder import (
    METADATA_FORMAT as METADATA_FORMAT,
)
from histosynth.synthesis.adapters.folder import (
    PEFT_PREFIX as PEFT_PREFIX,
)
from histosynth.synthesis.adapters.load import (
    check_adapter,
    list_adapters,
    load_adapter,
    read_adapter_info,
)
from histosynth.synthesis.adapters.save import create_adapter, save_adapter
from histosynth.synthesis.adapters.switch import (
    activate,
    active_adapter,
    fuse,
    fused_adapter,
    loaded_adapters,
    unfuse,
    unload_adapter,
)

__all__ = [
    "CONFIG_FILE",
    "CROSS_ATTENTION_TARGETS",
    "DEFAULT_LIBRARY",
    "METADATA_FILE",
    "VAE_DOWNSCALE",
    "WEIGHTS_FILE",
    "AdapterInfo",
    "activate",
    "active_adapter",
    "adapter_library",
    "base_weight_hash",
    "check_adapter",
    "create_adapter",
    "fuse",
    "fused_adapter",
    "list_adapters",
    "load_adapter",
    "loaded_adapters",
    "lora_config",
    "model_resolution",
    "read_adapter_info",
    "save_adapter",
    "unfuse",
    "unload_adapter",
    "validate_adapter_name",
]
