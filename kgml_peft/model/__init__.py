"""The KGML-ag backbone and its physics (mass balance, non-negativity, response consistency)."""

from kgml_peft.model.backbone import GRU_NAMES, BackboneConfig, KGMLag, build_backbone

__all__ = ["GRU_NAMES", "BackboneConfig", "KGMLag", "build_backbone"]
