"""The one registry of targets. `build`, the build key, the CLI's choices, the harness and
`enginekit.load` all ask it; a target registered here (by enginekit or by a user's own code)
works everywhere with no edit elsewhere."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enginekit.core.errors import InputError
from enginekit.targets.base import Runner, Target

if TYPE_CHECKING:
    from enginekit.core.artifacts import Manifest

# Built-in targets, imported on first use (each module defines TARGET; runtimes load lazily).
_BUILTIN_MODULES = ("enginekit.targets.onnxruntime", "enginekit.targets.openvino", "enginekit.targets.tflite",
                    "enginekit.targets.tensorrt")
_REGISTRY: dict[str, Target] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(target: Target) -> Target:
    """Make `target` known by its name and aliases (a later registration of a name replaces it)."""
    _REGISTRY[target.name] = target
    for alias in target.aliases:
        _ALIASES[alias] = target.name
    return target


def unregister(name: str) -> None:
    target = _REGISTRY.pop(name, None)
    for alias in getattr(target, "aliases", ()):
        _ALIASES.pop(alias, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            target = importlib.import_module(module).TARGET
            if target.name not in _REGISTRY:  # a user's registration of the same name wins
                register(target)


def target_names() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)


def get_target(name: str) -> Target:
    """The target called `name` (or an alias such as "onnx"); an unknown name lists the known ones."""
    _load_builtins()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise InputError(f"unknown target '{name}' (known: {', '.join(_REGISTRY)})", option="targets")
    return _REGISTRY[name]


def plugin_classes() -> list[dict[str, str]]:
    """Module, file and class name of every registered target that is not built in, so a worker
    process (a benchmark) can register the same targets before it opens an artifact."""
    import inspect

    _load_builtins()
    return [{"module": type(t).__module__, "file": inspect.getfile(type(t)), "class": type(t).__qualname__}
            for t in _REGISTRY.values() if type(t).__module__ not in _BUILTIN_MODULES]


def load_plugins(classes: list[dict[str, str]]) -> None:
    """Register an instance of each class `plugin_classes` listed (imported by module name, else
    from its file: a test module or script is not always on this process's path)."""
    import importlib.util

    for spec in classes:
        try:
            module = importlib.import_module(spec["module"])
        except ImportError:
            loader = importlib.util.spec_from_file_location(spec["module"], spec["file"])
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        register(getattr(module, spec["class"])())


def verified_artifact(folder: str | Path) -> tuple["Manifest", Target]:
    """(manifest, target) of an artifact folder whose files match its manifest's hashes."""
    from enginekit.core.artifacts import read_manifest, verify_files

    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    target_name = manifest.get("target")
    if not isinstance(target_name, str):
        raise InputError("manifest names no target", folder)
    return manifest, get_target(target_name)


def open_artifact(folder: str | Path, threads: int | None = None, **runtime: Any) -> tuple[Runner, dict[str, Any]]:
    """(runner, manifest) of an artifact folder; its files are verified against the manifest first.
    `threads` None: the count its build measured fastest (`artifact_threads`)."""
    manifest, target = verified_artifact(folder)
    return target.open(Path(folder), manifest, threads=artifact_threads(manifest, threads), **runtime), manifest


def artifact_threads(manifest: Mapping[str, Any], asked: int | None = None) -> int | None:
    """The thread count an artifact runs at: the caller's, else the one its build measured fastest
    on its machine (builder.threads), else None (the runtime's default: every core)."""
    if asked:
        return asked
    chosen = (manifest.get("runtime_threads") or {}).get("chosen")
    return chosen if isinstance(chosen, int) and chosen > 0 else None
