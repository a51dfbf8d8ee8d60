"""The committed sample firmware: manifests, signatures, determinism of the generator."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

from device_sim.context import load_public_key
from orchestrator.protocol import FirmwareRef, canonical_manifest, verify_manifest_signature
from tests.device_sim.helpers import PUBLIC_KEY_PATH, SAMPLES


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fw_generate", SAMPLES / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_match_images_and_verify() -> None:
    key = load_public_key(PUBLIC_KEY_PATH)
    index = json.loads((SAMPLES / "index.json").read_text())["firmware"]
    assert {(f["model"], f["version"]) for f in index} == {
        (m, v) for m in ("sensor-v2", "gateway-x1") for v in ("1.0.0", "1.1.0")
    }
    total = 0
    for entry in index:
        data = (SAMPLES / entry["image"]).read_bytes()
        total += len(data)
        manifest = json.loads((SAMPLES / entry["model"] / f"{entry['version']}.json").read_text())
        assert set(manifest) == {"model", "version", "size", "sha256", "signature"}
        assert manifest["size"] == len(data) and 64 * 1024 <= len(data) <= 1024 * 1024
        assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
        ref = FirmwareRef(**manifest, url="http://x", token="t")
        assert verify_manifest_signature(key, ref)
        assert not verify_manifest_signature(key, ref.model_copy(update={"version": "9.9.9"}))
    assert total < 3 * 1024 * 1024


def test_generator_is_deterministic(tmp_path: Path) -> None:
    gen = _generator()
    assert gen.canonical_manifest("m", "1", 5, "ab") == canonical_manifest("m", "1", 5, "ab")
    shutil.copy(SAMPLES / gen.PRIVATE_KEY, tmp_path / gen.PRIVATE_KEY)
    assert gen.main(["--out", str(tmp_path)]) == 0
    for name in ("index.json", "sensor-v2/1.0.0.bin", "gateway-x1/1.1.0.json"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes()
    assert gen.main(["--check"]) == 0  # the committed files are what the generator makes
    (tmp_path / "sensor-v2/1.0.0.bin").write_bytes(b"changed")
    assert gen.main(["--out", str(tmp_path), "--check"]) == 1


def test_regenerated_key_signs_everything(tmp_path: Path) -> None:
    gen = _generator()
    assert gen.main(["--out", str(tmp_path), "--regenerate-key", "--seed", "5"]) == 0
    key = load_public_key(tmp_path / gen.PUBLIC_KEY)
    manifest = json.loads((tmp_path / "gateway-x1" / "1.0.0.json").read_text())
    assert verify_manifest_signature(key, FirmwareRef(**manifest, url="u", token="t"))
    assert manifest["sha256"] != json.loads((SAMPLES / "gateway-x1" / "1.0.0.json").read_text())["sha256"]
