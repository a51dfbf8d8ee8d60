"""A small certificate authority for device identities (mutual TLS), as AWS IoT and Azure use them.

``fleet ca init`` makes a CA key and a self-signed CA certificate; ``fleet ca issue DEVICE`` signs a
client certificate whose subject common name is the device id (the broker maps it to the MQTT user
name, so a certificate *is* the device's identity); ``fleet ca server NAME`` signs a server
certificate for the broker's TLS listener and the API's HTTPS. Keys are EC P-256, written with mode
0600; nothing here is ever committed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.errors import InvalidInput, NotFound
from orchestrator.protocol import DEVICE_ID_PATTERN, is_reserved_device_id

CA_KEY = "ca.key"
CA_CERT = "ca.crt"


@dataclass(frozen=True)
class IssuedFiles:
    key: Path
    cert: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(
    directory: Path, *, name: str = "fleet device CA", days: int = 3650, force: bool = False
) -> IssuedFiles:
    """Create ``ca.key`` and ``ca.crt`` in ``directory``. Refuses to overwrite unless ``force``."""
    files = IssuedFiles(directory / CA_KEY, directory / CA_CERT)
    if files.key.exists() and not force:
        raise InvalidInput(f"{files.key} exists already; a new CA would invalidate every issued certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise NotFound(f"no CA in {directory}; create one with `fleet ca init --dir {directory}`") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{directory / CA_KEY} is not an EC private key")
    return key, cert


def _sign(
    directory: Path, common_name: str, out: Path, *, days: int, server_names: list[str] | None
) -> IssuedFiles:
    ca_key, ca_cert = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server_names is None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    else:
        alt: list[x509.GeneralName] = []
        for name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    files = IssuedFiles(out / f"{common_name}.key", out / f"{common_name}.crt")
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def issue_device(directory: Path, device_id: str, out: Path | None = None, *, days: int = 825) -> IssuedFiles:
    """A client certificate with CN = ``device_id``, signed by the CA in ``directory``."""
    import re

    if not re.match(DEVICE_ID_PATTERN, device_id) or is_reserved_device_id(device_id):
        raise InvalidInput(f"{device_id!r} is not a valid device id", field="device")
    return _sign(directory, device_id, out or directory / "devices", days=days, server_names=None)


def issue_server(
    directory: Path, name: str, alt_names: list[str], out: Path | None = None, *, days: int = 825
) -> IssuedFiles:
    """A server certificate for ``name`` (and ``alt_names``: host names or IP addresses)."""
    return _sign(directory, name, out or directory / "servers", days=days, server_names=[name, *alt_names])
