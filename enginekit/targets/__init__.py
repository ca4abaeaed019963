"""Targets: one adapter per runtime behind one contract (base.py), found through one registry
(registry.py). Each target turns the shared build inputs into an artifact folder and opens such
a folder as a Runner."""

from enginekit.targets.base import Built, BuildInputs, Runner, Target
from enginekit.targets.registry import get_target, open_artifact, register, target_names, unregister

__all__ = ["BuildInputs", "Built", "Runner", "Target", "get_target", "open_artifact", "register", "target_names", "unregister"]
