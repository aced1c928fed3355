"""Credentials for the local control plane: a CA, the apiserver serving cert, client certs, the service-account keys.

Everything is generated fresh per cluster (a few hundred ms with EC keys) so no secret ever lives in the repository and
concurrent clusters never share an identity.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Client identities: file stem -> (CN = user name, O = groups). The CNs of the controller-manager and scheduler match
# the users that the apiserver's bootstrap RBAC policy already binds to their roles.
CLIENTS: dict[str, tuple[str, list[str]]] = {
    "admin": ("kubernetes-admin", ["system:masters"]),
    "controller-manager": ("system:kube-controller-manager", []),
    "scheduler": ("system:kube-scheduler", []),
    # NOTE: kwok plays the kubelet of every fake node (node status, leases, pod status, pod deletion across nodes), so
    # a per-node system:node:<name> identity would not fit; like kwokctl, it runs with cluster-admin rights.
    "kwok": ("kwok-controller", ["system:masters"]),
}


@dataclass(frozen=True)
class Credentials:
    """Paths of the generated PEM files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sa_key: Path
    sa_pub: Path
    front_proxy_ca: Path
    front_proxy_cert: Path
    front_proxy_key: Path
    clients: dict[str, tuple[Path, Path]]  # stem -> (cert, key)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, orgs: list[str] | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs or []]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, pub: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    # Backdated a little: every component on this host shares one clock, but a fresh cert must never be "not yet valid".
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30)))


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name, server: bool,
          cert_path: Path, key_path: Path) -> None:
    key = _key()
    b = _builder(subject, ca.subject, key.public_key())
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in
                                        ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]]
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)


def _ca(pki: Path, stem: str, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    ca = (_builder(_name(cn), _name(cn), key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
          .sign(key, hashes.SHA256()))
    (pki / f"{stem}.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / f"{stem}.key", key)
    return ca, key


def generate(pki: Path) -> Credentials:
    """Create a fresh CA and every cert/key the control plane needs under ``pki``."""
    pki.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(pki, "ca", "pie-local-ca")
    _leaf(ca, ca_key, _name("kube-apiserver"), True, pki / "apiserver.crt", pki / "apiserver.key")
    clients = {}
    for stem, (cn, orgs) in CLIENTS.items():
        clients[stem] = (pki / f"{stem}.crt", pki / f"{stem}.key")
        _leaf(ca, ca_key, _name(cn, orgs), False, *clients[stem])
    # Front proxy (request-header authn) identity, as kubeadm sets up: the aggregator needs it to proxy to aggregated
    # APIs, and without it every component logs errors about a missing requestheader CA bundle.
    fp_ca, fp_key = _ca(pki, "front-proxy-ca", "pie-front-proxy-ca")
    _leaf(fp_ca, fp_key, _name("front-proxy-client"), False, pki / "front-proxy-client.crt",
          pki / "front-proxy-client.key")
    # RSA for the service-account signer: RS256 is what every token consumer supports.
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return Credentials(pki / "ca.crt", pki / "ca.key", pki / "apiserver.crt", pki / "apiserver.key",
                       pki / "sa.key", pki / "sa.pub", pki / "front-proxy-ca.crt", pki / "front-proxy-client.crt",
                       pki / "front-proxy-client.key", clients)


def kubeconfig(path: Path, server: str, ca_cert: Path, cert: Path, key: Path, user: str) -> Path:
    """Write a self-contained kubeconfig (credentials embedded) that verifies the apiserver against ``ca_cert``."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    # JSON is valid YAML, and keeps this module free of a yaml dependency.
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "pie-local", "preferences": {},
        "clusters": [{"name": "pie-local", "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "pie-local", "context": {"cluster": "pie-local", "user": user, "namespace": "default"}}],
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)
    return path
