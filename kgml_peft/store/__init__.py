"""Backbone checkpoints and adapter files: safetensors + JSON metadata, fingerprints, atomic
writes; the adapter store (list, export, import)."""

from kgml_peft.store.adapter import Adapter, load_adapter, read_adapter, save_adapter
from kgml_peft.atomic import atomic_path
from kgml_peft.store.checkpoint import Backbone, fingerprint, load_backbone, save_backbone

__all__ = ["Adapter", "Backbone", "atomic_path", "fingerprint", "load_adapter", "load_backbone",
           "read_adapter", "save_adapter", "save_backbone"]
