"""Model loading and model-family knowledge."""
from .families import FAMILIES, Family, ScalingGroup, discover_groups, family_for
from .loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "FAMILIES", "Family", "ScalingGroup", "discover_groups", "family_for", "load_model"]
