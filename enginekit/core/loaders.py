"""The one place that opens untrusted model, weight and data files.

Every loader here refuses to execute code from a file: ONNX external data must stay inside the
model's folder, PyTorch checkpoints go through the weights-only unpickler (never a silent retry
without it), safetensors headers are bounds-checked before any tensor is read, and numpy files
are read with `allow_pickle=False`. Other modules call these functions, never the raw loaders.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from enginekit.core import limits
from enginekit.core.errors import InputError, one_line
from enginekit.core.optional import require, require_torch

if TYPE_CHECKING:
    import onnx
    import torch

_PT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def check_archive(path: Path, what: str) -> None:
    """A zip archive's member count and total decompressed size, from its directory, before any
    member is inflated (zipfile enforces the declared sizes while reading)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"not a readable {what} ({_first_line(exc)})", path) from None
    if len(members) > limits.MAX_ARCHIVE_MEMBERS:
        raise InputError(f"{what} has {len(members)} members, over the limit of {limits.MAX_ARCHIVE_MEMBERS}", path)
    limits.check_bytes(sum(m.file_size for m in members), limits.MAX_DATA_BYTES, f"decompressing this {what}",
                       "ENGINEKIT_MAX_DATA_BYTES", path)


def require_file(path: str | Path) -> Path:
    """Return `path` as a Path if it names an existing regular file, else raise InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    if not path.is_file():
        raise InputError("not a regular file", path)
    return path


# ----------------------------------------------------------------------------------------- ONNX


def load_onnx(path: str | Path) -> "onnx.ModelProto":
    """Parse an ONNX file, checking every external-data reference before reading it."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

    path = require_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not a valid ONNX model (protobuf parse failed: {_first_line(exc)})", path) from None
    if model.ir_version == 0 or not model.graph.output:
        raise InputError("not an ONNX model (no IR version or no graph outputs; truncated or another format?)", path)
    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        try:
            info = ExternalDataInfo(tensor)
            check_external_data_location(path.parent, info.location, info.offset, info.length, tensor.name, path)
        except (ValueError, TypeError, OSError) as exc:  # offsets that are text, paths with NUL bytes or too long
            raise InputError(f"external data of tensor '{tensor.name}' is malformed ({_first_line(exc)})", path) from None
    if external:
        try:
            load_external_data_for_model(model, str(path.parent))
        except (ValueError, OSError) as exc:
            raise InputError(f"external data cannot be read ({_first_line(exc)})", path) from None
    return model


def parse_exported_onnx(data: bytes, origin: str) -> "onnx.ModelProto":
    """An ONNX graph an exporter just wrote in this process (torch's TorchScript exporter writes
    bytes, not a ModelProto); kept here with the other parsers. It holds no external data."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"the exporter wrote no valid ONNX graph ({_first_line(exc)})", origin) from None


def check_external_data_location(
    folder: Path, location: str, offset: int | None, length: int | None, tensor: str, model_path: Path
) -> Path:
    """Refuse external data that escapes the model folder, is a link, or lies past its file's end."""
    where = f"external data of tensor '{tensor}'"
    if not location:
        raise InputError(f"{where} has no location", model_path)
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InputError(f"{where} uses an absolute path '{location}'; only files inside the model folder are read", model_path)
    if ".." in rel.parts:
        raise InputError(f"{where} points outside the model folder ('{location}')", model_path)
    folder_resolved = folder.resolve()
    current = folder
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise InputError(f"{where} goes through a symbolic link ('{location}'); links are refused", model_path)
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder_resolved):
        raise InputError(f"{where} resolves outside the model folder ('{location}')", model_path)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        raise InputError(f"{where} names a missing file '{location}'", model_path) from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{where} is not a regular file ('{location}')", model_path)
    if info.st_nlink != 1:
        raise InputError(f"{where} is a file with {info.st_nlink} hard links ('{location}'); refused", model_path)
    start = offset or 0
    if start < 0 or start > info.st_size or (length is not None and start + length > info.st_size):
        raise InputError(
            f"{where} reads bytes {start}..{start + (length or 0)} beyond the end of '{location}' ({info.st_size} bytes)",
            model_path,
        )
    return target


def _all_tensors(model: "onnx.ModelProto"):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


# -------------------------------------------------------------------------------------- PyTorch


def load_state_dict(path: str | Path) -> dict[str, "torch.Tensor"]:
    """Load a weights file (safetensors preferred; .pt/.pth through the weights-only unpickler)."""
    path = require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in _PT_SUFFIXES:
        return _load_torch_weights_only(path)
    raise InputError(
        f"unknown weights format '{suffix or '(no suffix)'}'; use .safetensors (preferred) or a state_dict saved as .pt/.pth",
        path,
    )


def _load_torch_weights_only(path: Path) -> dict[str, "torch.Tensor"]:
    import pickle

    torch = require_torch("loading PyTorch weights")
    if zipfile.is_zipfile(path):  # the current .pt format is a zip archive: bound it before torch inflates it
        check_archive(path, "PyTorch checkpoint")

    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise InputError(
            "is a full pickle checkpoint (it stores Python objects, and unpickling them can run arbitrary code); "
            "save only the weights: torch.save(model.state_dict(), 'weights.pt') "
            "or safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')",
            path,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"not a readable PyTorch checkpoint ({_first_line(exc)})", path) from None
    return _as_tensor_dict(obj, path)


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [v for k, v in obj.items() if k in ("state_dict", "model", "model_state_dict") and isinstance(v, Mapping)]
        if len(nested) == 1:
            obj = nested[0]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InputError("does not hold a state_dict (a mapping of parameter names to tensors)", path)
    return dict(obj)


def _load_safetensors(path: Path) -> dict[str, "torch.Tensor"]:
    check_safetensors_header(path)
    require_torch("loading PyTorch weights")
    load_file = require("safetensors.torch", "torch", "loading .safetensors weights").load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise InputError(f"not a readable safetensors file ({_first_line(exc)})", path) from None


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate a safetensors header: size, dtypes, offsets in bounds, no overlap, sizes that add up."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError("not a safetensors file (shorter than its 8-byte header length)", path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise InputError(f"safetensors header length {header_len} exceeds the file ({size} bytes)", path)
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("safetensors header is not valid JSON", path) from None
    if not isinstance(header, dict):
        raise InputError("safetensors header is not a JSON object", path)
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"safetensors entry '{name}' lacks dtype/shape/data_offsets", path) from None
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise InputError(f"safetensors entry '{name}' has unknown dtype {dtype!r}", path)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise InputError(f"safetensors entry '{name}' has offsets {begin}..{end} outside the data ({data_len} bytes)", path)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InputError(f"safetensors entry '{name}' has an invalid shape {shape}", path)
        if math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype] != end - begin:
            raise InputError(f"safetensors entry '{name}': {dtype} x {shape} does not match its {end - begin} bytes", path)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise InputError(f"safetensors entries '{name_a}' and '{name_b}' overlap", path)
    return header


# ---------------------------------------------------------------------------------------- Keras

KERAS_UNSAFE_LAYERS = {"Lambda", "TFSMLayer"}


def keras_config(path: str | Path) -> dict[str, Any]:
    """The model config of a .keras archive (config.json) or an .h5 file (model_config attribute),
    read as data: nothing is deserialized or built."""
    path = require_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".keras":
            check_archive(path, "Keras model")
            with zipfile.ZipFile(path) as archive:
                limits.check_bytes(archive.getinfo("config.json").file_size, limits.MAX_CONFIG_BYTES, "the model's config.json",
                                   "ENGINEKIT_MAX_CONFIG_BYTES", path)
                return json.loads(archive.read("config.json"))
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as handle:
                if "model_config" in handle.attrs:
                    limits.check_bytes(handle.attrs.get_id("model_config").get_storage_size(), limits.MAX_CONFIG_BYTES,
                                       "the model's config", "ENGINEKIT_MAX_CONFIG_BYTES", path)
                raw = handle.attrs.get("model_config")
                if raw is None:
                    raise InputError("is an HDF5 file without a Keras model_config (weights only?)", path)
                return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (zipfile.BadZipFile, KeyError, OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"not a readable Keras model ({_first_line(exc)})", path) from None
    raise InputError(f"unknown Keras format '{suffix}'; use .keras or .h5", path)


def keras_config_problems(config: Any) -> list[str]:
    """Layers that would run code from the file: Lambda and TFSMLayer, and any class whose
    module lies outside Keras (a custom object the file asks Python to import)."""
    problems = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            class_name, module = node.get("class_name"), node.get("module")
            name = (node.get("config") or {}).get("name") if isinstance(node.get("config"), dict) else None
            if class_name in KERAS_UNSAFE_LAYERS:
                problems.append(f"{class_name} layer '{name}'")
            elif isinstance(module, str) and module and not module.split(".")[0] in ("keras", "tf_keras"):
                problems.append(f"class {class_name} from module '{module}'")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return problems


def load_keras(path: str | Path, allow_unsafe: bool = False) -> Any:
    """Inspect the config first, refuse code-carrying layers unless the user opted in, then load
    with Keras' safe_mode (which stays on even then, except for what was explicitly allowed)."""
    path = require_file(path)
    problems = keras_config_problems(keras_config(path))
    if problems and not allow_unsafe:
        raise InputError(
            f"contains {', '.join(problems[:3])}, which would run Python code from the file; "
            "rewrite it with built-in layers, or allow it if you trust the file", path, option="unsafe_allow_lambda")
    from enginekit.core.tf_support import require_keras

    keras = require_keras()

    try:
        return keras.saving.load_model(str(path), safe_mode=not allow_unsafe, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        raise InputError(f"Keras could not load the model ({_first_line(exc)})", path) from None


def load_saved_model(path: str | Path) -> Any:
    """A TensorFlow SavedModel folder (as `model.export()` writes it): graph functions and
    variables only, no pickled Python. Its `serve` endpoint is what enginekit converts."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise InputError("is a folder without saved_model.pb (not a TensorFlow SavedModel)", path)
    from enginekit.core.tf_support import require_tensorflow

    tf = require_tensorflow()

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # TF raises OSError, ValueError, DecodeError... for a bad SavedModel
        raise InputError(f"TensorFlow could not load the SavedModel ({_first_line(exc)})", path) from None
    if not hasattr(loaded, "serve"):
        raise InputError(f"SavedModel has no 'serve' endpoint (has: {', '.join(sorted(loaded.signatures)) or 'none'}); "
                         "export it with keras model.export()", path)
    return loaded


# --------------------------------------------------------------------------------------- TFLite

TFLITE_CHECK_SECONDS = 60
TFLITE_CHECK_MEMORY = 4 << 30


def check_tflite(path: str | Path) -> bytes:
    """Open and allocate a user-supplied .tflite in a subprocess with memory and time limits, so
    a malformed flatbuffer that crashes the interpreter cannot take enginekit down with it; the
    bytes that passed are returned (the file is read once)."""
    import signal
    import subprocess
    import sys

    from enginekit.core.interrupt import die_with_parent

    path = require_file(path)
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({TFLITE_CHECK_MEMORY}, {TFLITE_CHECK_MEMORY}))\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        "Interpreter(model_content=sys.stdin.buffer.read()).allocate_tensors()\n"
    )
    data = path.read_bytes()
    try:
        result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=TFLITE_CHECK_SECONDS,
                                preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        raise InputError(f"TFLite model did not load within {TFLITE_CHECK_SECONDS} s; refused", path) from None
    if result.returncode < 0:
        raise InputError(f"malformed TFLite model: the checking process died with {signal.Signals(-result.returncode).name}", path)
    if result.returncode != 0:
        lines = [line for line in result.stderr.decode(errors="replace").strip().splitlines() if line.strip()]
        raise InputError(f"not a loadable TFLite model ({lines[-1][:200] if lines else 'unknown error'})", path)
    return data


# ---------------------------------------------------------------------------------------- images


def load_image(path: str | Path) -> np.ndarray:
    """An image file as an H x W x 3 uint8 RGB array; truncated or bogus files are refused
    (PIL's decompression-bomb limit stays on)."""
    pil = require("PIL.Image", "images", "reading image files")
    Image, UnidentifiedImageError = pil, pil.UnidentifiedImageError
    path = require_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"unreadable or truncated image ({exc})", path) from None


# ------------------------------------------------------------------------------ JSON documents


def load_json_document(path: str | Path, schema: str, what: str) -> dict[str, Any]:
    """A JSON file enginekit wrote (manifest, calibration table, report), checked for its schema."""
    path = Path(path)
    document = _read_json(path, what, limits.MAX_DOCUMENT_BYTES, "ENGINEKIT_MAX_DOCUMENT_BYTES")
    if not isinstance(document, dict) or document.get("schema") != schema:
        found = document.get("schema") if isinstance(document, dict) else None
        raise InputError(f"not an enginekit {what} (schema {found!r}, expected {schema!r})", path)
    return document


def load_json_file(path: str | Path, what: str) -> Any:
    """Any JSON file (a model server's config), size-limited; unreadable or invalid is one line."""
    return _read_json(require_file(path), what, limits.MAX_CONFIG_BYTES, "ENGINEKIT_MAX_CONFIG_BYTES", detail=True)


def _read_json(path: Path, what: str, limit: int, variable: str, detail: bool = False) -> Any:
    """JSON of at most `limit` bytes (`variable` raises it); every failure one line naming `what`
    (with the parser's first line where `detail`)."""
    try:
        limits.check_bytes(path.stat().st_size, limit, f"this {what}", variable, path)
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{what} not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError, RecursionError, ValueError) as exc:
        raise InputError(f"{what} is not valid JSON" + (f" ({_first_line(exc)})" if detail else ""), path) from None
    except OSError as exc:
        raise InputError(f"{what} cannot be read ({exc.strerror})", path) from None


# ------------------------------------------------------------------------------- Triton configs


def triton_model_config_class() -> Any:
    """Triton's `inference.ModelConfig` message class, from the `model_config_pb2` module that
    ships in tritonclient. Loaded from its file: importing `tritonclient.grpc` would pull in the
    gRPC client, which a config check does not need."""
    import importlib.util
    import sys

    module_name = "enginekit_triton_model_config_pb2"
    if module_name not in sys.modules:
        package = importlib.util.find_spec("tritonclient")
        location = Path(next(iter(package.submodule_search_locations or []), "")) / "grpc" / "model_config_pb2.py" if package else None
        if location is None or not location.is_file():
            from enginekit.core.optional import missing

            raise missing("triton", "checking Triton configs against Triton's model_config.proto")
        spec = importlib.util.spec_from_file_location(module_name, location)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name].ModelConfig


def parse_triton_config(text: str, where: str | Path) -> Any:
    """A config.pbtxt text as Triton's ModelConfig message; anything Triton would refuse to parse
    (unknown field, wrong type, bad enum) is an InputError with the parser's line and column."""
    from google.protobuf import text_format

    config = triton_model_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise InputError(f"config.pbtxt does not parse as Triton's ModelConfig ({_first_line(exc)})", where) from None
    return config


def load_triton_config(path: str | Path) -> Any:
    path = require_file(path)
    limits.check_bytes(path.stat().st_size, limits.MAX_CONFIG_BYTES, "this config", "ENGINEKIT_MAX_CONFIG_BYTES", path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError("config.pbtxt is not UTF-8 text", path) from None
    return parse_triton_config(text, path)


# ----------------------------------------------------------------------------------------- YAML


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping: safe loader (no Python objects) and no aliases (an alias
    bomb of a few hundred bytes expands to gigabytes)."""
    import yaml

    path = require_file(path)
    limits.check_bytes(path.stat().st_size, limits.MAX_CONFIG_BYTES, "this config", "ENGINEKIT_MAX_CONFIG_BYTES", path)
    text = path.read_text(errors="replace")

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases are not allowed in enginekit configs", event.start_mark)
            return super().compose_node(parent, index)

    try:
        config = yaml.load(text, Loader=NoAliases) or {}
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise InputError(f"not valid YAML ({one_line(exc)})", path) from None
    if not isinstance(config, dict):
        raise InputError("a build config must be a mapping of option names to values", path)
    return config


# ---------------------------------------------------------------------------------------- numpy


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .npy (one array, keyed by the file stem) or .npz file without unpickling anything."""
    path = require_file(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(f"unknown array format '{suffix}'; use .npy or .npz", path)
    try:
        if suffix == ".npy":
            with open(path, "rb") as fh:
                _check_array_header(fh, path.stem, path)
            arrays = {path.stem: np.load(str(path), allow_pickle=False, mmap_mode="r")}  # read on demand
        else:
            check_archive(path, ".npz archive")
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    with archive.open(member) as fh:
                        _check_array_header(fh, member.filename, path)
            with np.load(str(path), allow_pickle=False) as loaded:
                arrays = {name: loaded[name] for name in loaded.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError("holds pickled Python objects, which enginekit refuses to load", path) from None
        raise InputError(f"not a readable numpy file ({_first_line(exc)})", path) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"not a readable numpy file ({_first_line(exc)})", path) from None
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise InputError(f"array '{name}' has an object dtype; refused", path)
    if not arrays:
        raise InputError("holds no arrays", path)
    return arrays


def _check_array_header(fh, name: str, path: Path) -> None:
    """An .npy header's dtype and shape, checked before its data is read: no object arrays, and no
    more bytes than the data budget."""
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(fh)
        reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = reader(fh, max_header_size=1 << 20)
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise InputError(f"array '{name}' has an unreadable .npy header ({_first_line(exc)})", path) from None
    if dtype.hasobject:
        raise InputError(f"array '{name}' holds pickled Python objects, which enginekit refuses to load", path)
    limits.check_bytes(float(np.prod(shape, dtype=np.float64)) * dtype.itemsize, limits.MAX_DATA_BYTES,
                       f"array '{name}' {list(shape)} {dtype}", "ENGINEKIT_MAX_DATA_BYTES", path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
