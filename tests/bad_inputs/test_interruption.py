"""Builds that are interrupted (SIGINT at a random moment, SIGTERM) or run twice at once leave
either the complete new artifact or the previous one at the final path, never a partial."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enginekit.core.artifacts import read_manifest, verify_files

ROOT = Path(__file__).parents[2]


COMMANDS = {
    "export": ["export", "--model", "digits_cnn"],
    "build": ["build", "--model", "digits_cnn", "--target", "onnxruntime", "--precision", "int8", "-n", "64"],
}


def _export(out: Path, cache: Path, command: str = "export") -> subprocess.Popen:
    env = {**os.environ, "ENGINEKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "enginekit", *COMMANDS[command], "-o", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _assert_whole(out: Path) -> dict:
    manifest = read_manifest(out)
    verify_files(out, manifest)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"leftovers beside the artifact: {leftovers}"
    return manifest


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """A cache with digits_cnn trained, and the time one export takes."""
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    process = _export(tmp_path_factory.mktemp("warm") / "out", cache)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return cache, time.perf_counter() - start


@pytest.mark.parametrize("command, seed", [("export", 0), ("export", 1), ("export", 2), ("build", 3), ("build", 4)])
def test_sigint_at_a_random_point_leaves_old_or_new_artifact(warm_cache, tmp_path, command, seed):
    cache, duration = warm_cache
    out = tmp_path / "artifact"
    started = time.perf_counter()
    assert _export(out, cache, command).wait(timeout=300) == 0
    duration = time.perf_counter() - started
    previous = json.dumps(read_manifest(out), sort_keys=True)
    delay = random.Random(seed).uniform(0.1, duration * 1.1)
    process = _export(out, cache, command)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=300)
    manifest = _assert_whole(out)
    if code == 0:
        assert manifest["model"] == "digits_cnn"  # it finished before the signal: the new artifact
    else:
        assert code in (130, -signal.SIGINT), process.stderr.read()  # -2: interrupted while still starting up
        assert json.dumps(manifest, sort_keys=True) == previous or manifest["model"] == "digits_cnn"


def test_sigterm_cleans_up_like_ctrl_c(warm_cache, tmp_path):
    cache, duration = warm_cache
    out = tmp_path / "artifact"
    assert _export(out, cache).wait(timeout=300) == 0
    process = _export(out, cache)
    time.sleep(duration * 0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) in (0, 130, -signal.SIGTERM)
    _assert_whole(out)


def test_two_concurrent_builds_of_one_artifact_leave_one_complete(warm_cache, tmp_path):
    cache, _ = warm_cache
    out = tmp_path / "artifact"
    first, second = _export(out, cache), _export(out, cache)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.wait(timeout=300) == 0, second.stderr.read()
    _assert_whole(out)


def test_an_interrupt_a_library_rewraps_as_its_own_error_still_exits_as_interrupted(tmp_path):
    """torch.onnx catches the KeyboardInterrupt of a SIGTERM and raises its own export error: the
    CLI must still report an interruption (exit 130), not a failed export (exit 2)."""
    script = (
        "import os, signal\n"
        "from enginekit import api, cli\n"
        "def rewrapping_export(*args, **kwargs):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    except KeyboardInterrupt as exc:\n"
        "        raise RuntimeError('Failed to export the model to ONNX') from exc\n"
        "api.export = rewrapping_export\n"
        f"cli.main(['export', '--model', 'digits_cnn', '-o', {str(tmp_path / 'out')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().endswith("enginekit: interrupted"), result.stderr
    assert not (tmp_path / "out").exists()
