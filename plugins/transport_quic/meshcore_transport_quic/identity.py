"""Node identity for the QUIC transport: key, self-signed certificate and the mesh secret.

Files live in the node's state dir and are created on first start:
``quic-key.pem`` (EC P-256, mode 0600), ``quic-cert.pem`` and ``mesh-secret`` (32 random bytes,
hex; the secret of the mesh this node creates when it starts without ``--join``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SECRET_BYTES = 32


def fingerprint(cert_der: bytes) -> bytes:
    """SHA-256 of a certificate's DER encoding: what tokens and peers pin."""
    return hashlib.sha256(cert_der).digest()


@dataclass(frozen=True)
class Identity:
    """This node's key and certificate, as objects and as files (for ``ssl``)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert_der)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert_der: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key of ``cert_der``."""
    try:
        public = x509.load_der_x509_certificate(cert_der).public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


SECRET_FILES = ("quic-key.pem", "mesh-secret")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(data)


def private_dir(state_dir: Path) -> None:
    """Create the state dir, and on every start make it (and the secrets in it) private
    again: 0700 and 0600, whatever a copy, an old version or an umask left."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, mode in [(state_dir, 0o700), *((state_dir / n, 0o600) for n in SECRET_FILES)]:
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, mode)
        except FileNotFoundError:
            pass


def _new_certificate(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesh-llm {name}")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mesh-llm")]), critical=False)
        .sign(key, hashes.SHA256())
    )


def load_identity(state_dir: Path, name: str) -> Identity:
    """Load the key and certificate from ``state_dir``, creating both on first start."""
    private_dir(state_dir)
    key_path, cert_path = state_dir / "quic-key.pem", state_dir / "quic-cert.pem"
    if key_path.exists() and cert_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key: delete it and the certificate "
                             "next to it to get a new identity")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return Identity(loaded, cert, key_path, cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _new_certificate(key, name)
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key, cert, key_path, cert_path)


def load_mesh_secret(state_dir: Path) -> bytes:
    """The secret of the mesh this node starts (``state_dir/mesh-secret``), created once."""
    path = state_dir / "mesh-secret"
    private_dir(state_dir)
    try:
        value = bytes.fromhex(path.read_text().strip())
        if len(value) == SECRET_BYTES:
            return value
    except (FileNotFoundError, ValueError):
        pass
    value = secrets.token_bytes(SECRET_BYTES)
    _write_private(path, value.hex().encode() + b"\n")
    return value
