"""A test PKI for a deployment, written with ``cryptography`` (a Flower dependency).

:func:`make_pki` writes a CA, a server certificate whose subjectAltName lists the names and IPs
SuperNodes use to reach the SuperLink (always including ``localhost``/``127.0.0.1``: the SuperLink's
own ServerApp runtime connects over loopback with the same certificate), and one EC P-384 key pair per
SuperNode in OpenSSH format, the format ``flwr supernode register`` and ``flower-supernode
--auth-supernode-private-key`` read. Key material comes from the operating system's CSPRNG on
purpose: it is the one random choice in simlab that must not be reproducible from a seed. Private
keys are written owner-only, atomically.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from simlab.engine.flwr_config import DeploymentError, check_name
from simlab.fileio import atomic_write


def _file(name: str) -> property:
    return property(lambda self: self.root / name, doc=f"``<root>/{name}``")


@dataclass(frozen=True)
class Pki:
    """A directory of TLS and SuperNode-authentication files::

        ca.crt              CA certificate: every SuperNode site and every `flwr` CLI user needs it
        ca.key              CA private key: stays with whoever signs server certificates
        server.pem/.key     SuperLink certificate and key: the SuperLink's machine only
        supernodes/<name>   SuperNode private key (OpenSSH, EC P-384): that hospital's machine only
        supernodes/<name>.pub  its public key: registered at the SuperLink with `flwr supernode register`
    """

    root: Path

    ca_cert = _file("ca.crt")
    ca_key = _file("ca.key")
    server_cert = _file("server.pem")
    server_key = _file("server.key")

    def node_key(self, name: str) -> Path:
        return self.root / "supernodes" / name

    def node_pub(self, name: str) -> Path:
        return self.root / "supernodes" / f"{name}.pub"

    def nodes(self) -> list[str]:
        folder = self.root / "supernodes"
        return sorted(p.stem for p in folder.glob("*.pub")) if folder.is_dir() else []

    def check(self) -> None:
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise DeploymentError(f"{self.root}: not a PKI directory (missing {', '.join(p.name for p in missing)}); "
                                  f"create one with `tools/deploy pki {self.root}`")


def _write_private_key(path: Path, key, fmt) -> None:
    from cryptography.hazmat.primitives import serialization

    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()), mode=0o600)


def add_node_keys(pki: Pki, names: Iterable[str], overwrite: bool = False) -> list[Path]:
    """One EC P-384 key pair per name (OpenSSH format); existing keys are kept unless ``overwrite``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    written = []
    for name in names:
        key_path = pki.node_key(check_name(name))
        if key_path.exists() and not overwrite:
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private_key(key_path, key, serialization.PrivateFormat.OpenSSH)
        pki.node_pub(name).write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH) + b"\n")
        written.append(key_path)
    return written


def _key_usage(**on: bool):
    from cryptography import x509

    flags = dict(digital_signature=False, key_cert_sign=False, crl_sign=False, content_commitment=False,
                 key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                 decipher_only=False)
    return x509.KeyUsage(**{**flags, **on})


def _ca(pki: Pki, now: dt.datetime, until: dt.datetime, overwrite: bool):
    """(CA key, CA certificate): the existing ones unless ``overwrite``, else new ones, written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if pki.ca_key.is_file() and pki.ca_cert.is_file() and not overwrite:
        return (serialization.load_pem_private_key(pki.ca_key.read_bytes(), None),
                x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "simlab deployment CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    _write_private_key(pki.ca_key, ca_key, serialization.PrivateFormat.PKCS8)
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert


def _server_cert(pki: Pki, ca_key, ca_cert, names: list[str], addrs: list[str], common_name: str,
                 now: dt.datetime, until: dt.datetime) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs]
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private_key(pki.server_key, key, serialization.PrivateFormat.PKCS8)
    pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(root: str | Path, nodes: Iterable[str] = (), *, dns_names: Iterable[str] = (),
             ips: Iterable[str] = (), days: int = 365, overwrite: bool = False) -> Pki:
    """Create a CA, a SuperLink certificate and SuperNode keys under ``root``.

    The server certificate's subjectAltName is ``localhost`` and ``127.0.0.1`` plus ``dns_names`` and
    ``ips``: list every name and address SuperNodes and ``flwr`` users will dial (TLS checks the name
    they dial against this list). All keys are EC P-384, signatures ECDSA-SHA384. The CA is marked
    critical ``CA:TRUE, pathlen 0``; the server certificate carries serverAuth, subject and authority
    key identifiers, so strict verifiers (OpenSSL 3, Python ≥ 3.13's X509_STRICT) accept it.
    An existing CA is reused (new server certificates are signed by it) unless ``overwrite``.
    """
    pki = Pki(Path(root).resolve())
    pki.root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)
    ca_key, ca_cert = _ca(pki, now, until, overwrite)
    dns_names = list(dns_names)
    names = list(dict.fromkeys(["localhost", *dns_names]))
    addrs = list(dict.fromkeys(["127.0.0.1", *ips]))
    _server_cert(pki, ca_key, ca_cert, names, addrs, names[-1] if dns_names else addrs[-1], now, until)
    add_node_keys(pki, nodes, overwrite=overwrite)
    return pki
