"""Backbone checkpoints (and, later, adapter files): safetensors + JSON metadata, atomic writes."""

from kgml_peft.store.atomic import atomic_path
from kgml_peft.store.checkpoint import Backbone, fingerprint, load_backbone, save_backbone

__all__ = ["Backbone", "atomic_path", "fingerprint", "load_backbone", "save_backbone"]
