"""The cluster's certificate authority on the admin's machine, and what it signs: a server
certificate per host (installed by steps/tls.py) and one client certificate for the admin.

Why here and like this: docker-machine kept one CA on the laptop (~/.docker/machine/certs)
and gave `docker` a directory of ca.pem, cert.pem and key.pem (DOCKER_CERT_PATH); the
admin's directory here has that same shape, so `DOCKER_CERT_PATH` can point at it. The
CA lives outside the repository by default, per cluster. Keys are written 0600 from the
first byte (os.open with the mode, never chmod after) and are never printed.

The `cryptography` package writes everything (it is already here: paramiko needs it);
nothing shells out to openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from overlaylab.errors import InputError

CA_DAYS = 3650
CERT_DAYS = 365
RENEW_WITHIN = dt.timedelta(days=30)  # a re-run renews a certificate that expires sooner
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CLIENT_CERT, CLIENT_KEY = "cert.pem", "key.pem"  # with ca.pem: a DOCKER_CERT_PATH directory
FILES = (CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY)  # all this module writes in a CA directory
API_PORT = 2376


def default_dir(cluster: str) -> Path:
    """Outside the repository: $XDG_DATA_HOME/overlaylab/ca/<cluster> (~/.local/share/...)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "overlaylab" / "ca" / cluster


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Authority:
    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def signed(self, cert: x509.Certificate) -> bool:
        """This CA signed it (a certificate from another CA, or a lost one's, is not)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def write_private(path: Path, data: bytes) -> None:
    """0600 from creation: the key is never readable by others, not even for a moment."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def load(directory: Path) -> Authority | None:
    """The CA kept in ``directory``, or None when there is none yet. Anything half there or
    unreadable is an input error (exit 2 before any host is touched): a new CA would
    silently orphan every host's certificate."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: the CA directory cannot be read (not a directory)")
    if directory.exists() and not os.access(directory, os.R_OK | os.X_OK):
        raise InputError(f"{directory}: the CA directory cannot be read (permission denied)")
    present = [p.name for p in (cert_path, key_path) if p.exists()]
    if len(present) == 1:
        missing = CA_KEY if present == [CA_CERT] else CA_CERT
        raise InputError(
            f"{directory}: has {present[0]} but not {missing}; restore it, or make a new CA with --reissue-certs"
        )
    if not present:
        return None
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "CA certificate"))
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except ValueError as exc:
        raise InputError(f"{directory}: the CA's certificate or key is not valid PEM ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise InputError(f"{key_path}: is not the key of {cert_path}")
    return Authority(directory, cert, key)


def create(directory: Path, cluster: str) -> Authority:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"overlaylab CA ({cluster})")])
    start = now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    write_private(directory / CA_KEY, _key_pem(key))
    (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(directory, cert, key)


def load_or_create(directory: Path, cluster: str) -> tuple[Authority, bool]:
    """The CA in ``directory``; made there if it holds none. (authority, made now)."""
    found = load(directory)
    return (found, False) if found is not None else (create(directory, cluster), True)


def set_aside(directory: Path) -> Path | None:
    """--reissue-certs: the old CA (and the admin's certificate) kept next to the new one,
    never deleted: a host still on it can be told apart, and nothing is lost."""
    files = [directory / n for n in FILES if (directory / n).exists()]
    if not files:
        return None
    aside = directory / f"replaced-{now():%Y%m%dT%H%M%S}"
    aside.mkdir(mode=0o700)
    for f in files:
        f.rename(aside / f.name)
    return aside


def remove(directory: Path) -> str:
    """teardown --remove-ca: the files this module writes (and the CAs set aside), nothing
    else: tls.ca_dir may name a directory that holds other things too."""
    gone = [directory / n for n in FILES if (directory / n).exists()]
    for p in gone:
        p.unlink()
    for aside in directory.glob("replaced-*") if directory.is_dir() else []:
        for p in aside.iterdir():
            p.unlink()
        aside.rmdir()
        gone.append(aside)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    return f"removed the CA in {directory}" if gone else f"no CA in {directory}"


class Keeper:
    """The run's CA: read before any host is touched, made (or, with ``reissue``, made anew)
    only when a real run first needs it; a dry run never writes one."""

    def __init__(self, directory: Path, cluster: str, reissue: bool = False) -> None:
        self.directory, self.cluster, self.reissue = directory, cluster, reissue
        self.found = load(directory)
        if (directory / CLIENT_KEY).exists():
            _read(directory / CLIENT_KEY, "admin key")  # unreadable: the admin's to mend, before any change
        self._made: Authority | None = None
        self._lock = threading.Lock()
        self._admin_lock = threading.Lock()  # HA mode's agents ask for it at once
        self.events: list[str] = []  # what the run did to the CA, for its report

    @property
    def current(self) -> Authority | None:
        """The CA the hosts should be on: None while a new one is still to be made."""
        if self._made is not None:
            return self._made
        return None if self.reissue else self.found

    def authority(self) -> Authority:
        with self._lock:
            current = self.current
            if current is not None:
                return current
            aside = set_aside(self.directory) if self.reissue else None
            self._made = create(self.directory, self.cluster)
            self.events.append(
                f"new CA in {self.directory}" + (f" (the previous one kept in {aside})" if aside else "")
            )
            return self._made

    def admin(self) -> str:
        """The admin's client certificate, made or renewed if need be; what was done, or ""."""
        with self._admin_lock:
            directory, made = ensure_client(self.authority())
        return (
            f"admin certificate written in {directory} (DOCKER_CERT_PATH): none was there, or it was due"
            if made
            else ""
        )


def host_names(name: str, hostname: str, address: str, resolved: str, advertise_ip: str) -> tuple[list[str], list[str]]:
    """(IPs, DNS names) a host's server certificate covers: every way the admin or a peer
    may reach it (the inventory's address, an ssh alias's HostName, the cluster address,
    its hostname and inventory name), and loopback for a client on the host itself."""
    ips, names = [advertise_ip, "127.0.0.1"], [name, "localhost"]
    for value in (address, resolved, hostname):
        if not value:
            continue
        try:
            ips.append(str(ipaddress.ip_address(value)))
        except ValueError:
            names.append(value)
    return [i for i in dict.fromkeys(ips) if i], list(dict.fromkeys(names))


def covers(cert: x509.Certificate, ips: Iterable[str], names: Iterable[str]) -> bool:
    have_ips, have_names = sans(cert)
    return set(ips) <= have_ips and set(names) <= have_names


def issue(
    ca: Authority,
    common_name: str,
    *,
    ips: Iterable[str] = (),
    names: Iterable[str] = (),
    client: bool = False,
    days: int = CERT_DAYS,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): a server certificate whose subject alternative names are
    the host's addresses and names, or (``client``) the admin's."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = now() - dt.timedelta(minutes=5)
    # a host's certificate is also a client's: its dockerd presents it to a Consul that
    # verifies clients (tls.store); measured on the lab, Consul refuses a serverAuth-only one
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([] if client else [ExtendedKeyUsageOID.SERVER_AUTH])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
    sans += [x509.DNSName(n) for n in dict.fromkeys(names)]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def read_cert(path: Path) -> x509.Certificate | None:
    """A certificate file, or None when it is missing or not a certificate."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def expires(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def needs_renewal(cert: x509.Certificate, at: dt.datetime | None = None) -> bool:
    return expires(cert) - (at or now()) < RENEW_WITHIN


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(IP addresses, DNS names) the certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}, set(ext.get_values_for_type(x509.DNSName))


def ensure_client(ca: Authority) -> tuple[Path, bool]:
    """The admin's client certificate next to the CA (a DOCKER_CERT_PATH directory); a new
    one when it is missing, not this CA's, or expires within RENEW_WITHIN. (dir, made now)."""
    cert_path, key_path = ca.directory / CLIENT_CERT, ca.directory / CLIENT_KEY
    if cert_path.exists() and key_path.exists():
        try:
            current = x509.load_pem_x509_certificate(_read(cert_path, "admin certificate"))
        except ValueError:
            current = None
        _read(key_path, "admin key")  # an unreadable key is the admin's to mend, not ours to replace
        if current is not None and ca.signed(current) and not needs_renewal(current):
            return ca.directory, False
    cert, key = issue(ca, "overlaylab admin", client=True)
    write_private(key_path, key)
    cert_path.write_bytes(cert)
    return ca.directory, True
