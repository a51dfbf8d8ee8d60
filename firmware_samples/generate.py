"""Generate the sample firmware images, their signed manifests and (optionally) the dev key pair.

Images are pseudo-random bytes drawn from a seed, so the same seed and key always give the same
files (ed25519 signatures are deterministic). Usage::

    python firmware_samples/generate.py                 # rewrite images + manifests with the existing key
    python firmware_samples/generate.py --check         # exit 1 if the files on disk differ
    python firmware_samples/generate.py --regenerate-key  # new dev key pair, then re-sign everything

Layout: ``<model>/<version>.bin``, ``<model>/<version>.json`` (manifest: model, version, size,
sha256, signature) and ``index.json`` (every manifest plus its image path).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).resolve().parent
PRIVATE_KEY = "dev-signing-key.DEV-ONLY.pem"
PUBLIC_KEY = "dev-signing-key.DEV-ONLY.pub.pem"
DEFAULT_SEED = 2026
MAGIC = b"FLEETFW1"
# (model, version, size in bytes): 64 KiB .. 1 MiB, sizes deliberately not multiples of a chunk.
SAMPLES = [
    ("sensor-v2", "1.0.0", 98_427),
    ("sensor-v2", "1.1.0", 200_003),
    ("gateway-x1", "1.0.0", 655_437),
    ("gateway-x1", "1.1.0", 1_000_000),
]


def canonical_manifest(model: str, version: str, size: int, sha256: str) -> bytes:
    """Same bytes as orchestrator.protocol.canonical_manifest (kept standalone so this script runs
    without the project installed); tests check that both agree."""
    doc = {"model": model, "sha256": sha256, "size": size, "version": version}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def image_bytes(seed: int, model: str, version: str, size: int) -> bytes:
    """A deterministic image: a small header naming the firmware, then pseudo-random bytes."""
    header = MAGIC + json.dumps({"model": model, "version": version}).encode() + b"\n"
    rng = random.Random(f"{seed}:{model}:{version}")
    return header + rng.randbytes(size - len(header))


def sign(key: Ed25519PrivateKey, model: str, version: str, size: int, sha256: str) -> str:
    """base64 ed25519 signature over the canonical manifest."""
    return base64.b64encode(key.sign(canonical_manifest(model, version, size, sha256))).decode()


def load_or_create_key(directory: Path, regenerate: bool) -> tuple[Ed25519PrivateKey, bool]:
    path = directory / PRIVATE_KEY
    if path.exists() and not regenerate:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SystemExit(f"{path} is not an ed25519 private key")
        return key, False
    return Ed25519PrivateKey.generate(), True


def key_files(key: Ed25519PrivateKey) -> dict[str, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {PRIVATE_KEY: private, PUBLIC_KEY: public}


def build(seed: int, key: Ed25519PrivateKey) -> dict[str, bytes]:
    """Every generated file (relative path -> content), keys excluded."""
    files: dict[str, bytes] = {}
    index = []
    for model, version, size in SAMPLES:
        data = image_bytes(seed, model, version, size)
        sha = hashlib.sha256(data).hexdigest()
        manifest = {
            "model": model,
            "version": version,
            "size": size,
            "sha256": sha,
            "signature": sign(key, model, version, size, sha),
        }
        files[f"{model}/{version}.bin"] = data
        files[f"{model}/{version}.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
        index.append({**manifest, "image": f"{model}/{version}.bin"})
    files["index.json"] = (json.dumps({"seed": seed, "firmware": index}, indent=2) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: beside this file)")
    parser.add_argument("--regenerate-key", action="store_true", help="make a new dev key pair")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args(argv)

    key, new_key = load_or_create_key(args.out, args.regenerate_key)
    files = build(args.seed, key)
    if new_key:
        files.update(key_files(key))
    if args.check:
        stale = [name for name, data in files.items() if _read(args.out / name) != data]
        for name in stale:
            print(f"differs: {name}", file=sys.stderr)
        return 1 if stale else 0
    for name, data in files.items():
        path = args.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    total = sum(len(d) for n, d in files.items() if n.endswith(".bin"))
    print(
        f"wrote {len(files)} files to {args.out} ({total / 1024:.0f} KiB of images){' + new key' * new_key}"
    )
    return 0


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
