"""Certificates and keys for the local control plane, made with the `openssl` command."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"
DAYS = "3650"


class PkiError(RuntimeError):
    """openssl failed."""


@dataclass(frozen=True)
class Pki:
    """Paths of every file the control plane needs, all inside one directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """The cluster CA certificate (signs serving and client certs)."""
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The cluster CA key (also given to the controller-manager's CSR signer)."""
        return self.directory / "ca.key"

    @property
    def serving_cert(self) -> Path:
        """kube-apiserver's serving certificate."""
        return self.directory / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        """kube-apiserver's serving key."""
        return self.directory / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        """The admin client certificate (O=system:masters)."""
        return self.directory / "admin.crt"

    @property
    def admin_key(self) -> Path:
        """The admin client key."""
        return self.directory / "admin.key"

    @property
    def sa_key(self) -> Path:
        """Private key that signs service-account tokens."""
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> Path:
        """Public key that verifies service-account tokens."""
        return self.directory / "sa.pub"

    def exists(self) -> bool:
        """True when every file is present (a restart reuses them)."""
        files = (
            self.ca_cert,
            self.ca_key,
            self.serving_cert,
            self.serving_key,
            self.admin_cert,
            self.admin_key,
            self.sa_key,
            self.sa_pub,
        )
        return all(path.exists() for path in files)


def openssl(*args: str, cwd: Path) -> None:
    """Run one openssl command, raising with its stderr on failure."""
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PkiError(f"openssl {' '.join(args)}: {proc.stderr.strip()}")


def make_ca(pki: Pki) -> None:
    """A self-signed CA."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        DAYS,
        "-keyout",
        str(pki.ca_key),
        "-out",
        str(pki.ca_cert),
        "-subj",
        "/CN=vllm-operator-local-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki.directory,
    )


def sign(pki: Pki, name: str, subject: str, extensions: list[str]) -> tuple[Path, Path]:
    """A key and a CA-signed certificate named `name` with the given v3 extensions."""
    key, csr, cert = (pki.directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    extfile = pki.directory / f"{name}.ext"
    extfile.write_text("\n".join(extensions) + "\n")
    openssl(
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        subject,
        cwd=pki.directory,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca_cert),
        "-CAkey",
        str(pki.ca_key),
        "-CAcreateserial",
        "-days",
        DAYS,
        "-out",
        str(cert),
        "-extfile",
        str(extfile),
        cwd=pki.directory,
    )
    csr.unlink()
    extfile.unlink()
    return key, cert


def service_ip(service_cidr: str) -> str:
    """The first address of the service range: the `kubernetes` Service's ClusterIP."""
    return str(next(ipaddress.ip_network(service_cidr).hosts()))


def make_all(directory: Path, service_cidr: str) -> Pki:
    """Create the CA, serving cert, admin client cert and service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    make_ca(pki)
    names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    sans = [f"DNS:{name}" for name in names] + ["IP:127.0.0.1", f"IP:{service_ip(service_cidr)}"]
    sign(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        [
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth",
            f"subjectAltName={','.join(sans)}",
        ],
    )
    # system:masters bypasses RBAC: the harness, kubectl, helm and the control plane use it.
    sign(
        pki,
        "admin",
        "/O=system:masters/CN=admin",
        [
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=clientAuth",
        ],
    )
    openssl(
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        str(pki.sa_key),
        cwd=directory,
    )
    openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub), cwd=directory)
    for path in directory.glob("*.key"):
        path.chmod(0o600)
    return pki
