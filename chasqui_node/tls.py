"""Throwaway certificates for dev clusters and tests, made with `cryptography`.

`chasqui-node dev --tls` uses `write_dev_tls` so the TLS path is one command away; tests use
`make_ca` and `issue` to build a CA, node certificates and client certificates (for mutual TLS).
Keys are EC P-256 and certificates are short-lived: nothing here is meant for production, where
certificates come from the operator's own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chasqui_node import limits


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=limits.DEV_CERT_DAYS)
    )


def make_ca(common_name: str = "Chasqui dev CA") -> Issued:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    cert = _validity(builder).sign(key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued, common_name: str, hosts: tuple[str, ...] = (), client: bool = False
) -> Issued:
    """A certificate signed by `ca`: for a server answering on `hosts` (IP addresses or DNS
    names), or with `client=True` for a client proving its identity to a mutual-TLS node."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey), "make_ca makes EC keys"
    key = _new_key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = _validity(builder).sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class DevTlsFiles:
    ca_cert: Path
    node_cert: Path
    node_key: Path


def write_dev_tls(directory: Path, hosts: tuple[str, ...]) -> DevTlsFiles:
    """Write a CA and one node certificate valid for `hosts` (plus localhost) under
    `directory`, reusing what an earlier run left there. Private keys are mode 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    files = DevTlsFiles(directory / "ca.crt", directory / "node.crt", directory / "node.key")
    if all(path.exists() for path in (files.ca_cert, files.node_cert, files.node_key)):
        return files
    ca = make_ca()
    node = issue(ca, "chasqui-node", tuple(dict.fromkeys((*hosts, "localhost", "127.0.0.1"))))
    files.ca_cert.write_bytes(ca.cert_pem)
    for path, pem in ((files.node_key, node.key_pem), (directory / "ca.key", ca.key_pem)):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_bytes(pem)
    files.node_cert.write_bytes(node.cert_pem)
    return files
