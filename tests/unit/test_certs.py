"""Unit tests (no host: files in a temporary directory): the cluster's CA and what it signs."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from overlaylab import certs
from overlaylab.errors import InputError


def test_the_ca_is_made_once_with_its_key_readable_by_its_owner_alone(tmp_path: Path) -> None:
    ca, made = certs.load_or_create(tmp_path / "ca", "lab")
    assert made and ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((tmp_path / "ca" / certs.CA_KEY).stat().st_mode) == 0o600
    again, made_again = certs.load_or_create(tmp_path / "ca", "lab")
    assert not made_again and again.cert == ca.cert


def test_a_hosts_certificate_covers_its_addresses_and_names_and_is_signed_by_this_ca_alone(tmp_path: Path) -> None:
    ca, _ = certs.load_or_create(tmp_path / "ca", "lab")
    other, _ = certs.load_or_create(tmp_path / "other", "lab")
    pem, key = certs.issue(ca, "bm-docker-02", ips=["10.210.1.12", "10.210.0.12"], names=["bm-docker-02"])
    cert = x509.load_pem_x509_certificate(pem)
    assert certs.sans(cert) == ({"10.210.1.12", "10.210.0.12"}, {"bm-docker-02"})
    assert ca.signed(cert) and not other.signed(cert)
    assert b"PRIVATE KEY" in key and b"PRIVATE KEY" not in pem


def test_renewal_is_due_within_thirty_days_of_expiry(tmp_path: Path) -> None:
    ca, _ = certs.load_or_create(tmp_path / "ca", "lab")
    short = x509.load_pem_x509_certificate(certs.issue(ca, "w", days=10)[0])
    long = x509.load_pem_x509_certificate(certs.issue(ca, "w")[0])
    assert certs.needs_renewal(short) and not certs.needs_renewal(long)
    assert certs.needs_renewal(long, at=certs.expires(long) - dt.timedelta(days=29))


def test_the_admins_client_certificate_is_kept_until_it_is_due_or_from_another_ca(tmp_path: Path) -> None:
    ca, _ = certs.load_or_create(tmp_path / "ca", "lab")
    directory, made = certs.ensure_client(ca)
    assert made and {p.name for p in directory.iterdir()} == {"ca.pem", "ca-key.pem", "cert.pem", "key.pem"}
    assert stat.S_IMODE((directory / certs.CLIENT_KEY).stat().st_mode) == 0o600
    assert certs.ensure_client(ca) == (directory, False)
    pem, _ = certs.issue(certs.load_or_create(tmp_path / "other", "lab")[0], "x", client=True)
    (directory / certs.CLIENT_CERT).write_bytes(pem)
    assert certs.ensure_client(ca) == (directory, True)


def test_an_unreadable_ca_key_is_named_with_its_path(tmp_path: Path) -> None:
    """Unreadable for root too: the key's path is a directory (a mode bit would not stop root, who runs CI)."""
    certs.load_or_create(tmp_path / "ca", "lab")
    (tmp_path / "ca" / certs.CA_KEY).unlink()
    (tmp_path / "ca" / certs.CA_KEY).mkdir()
    with pytest.raises(InputError, match=r"ca-key\.pem: cannot read the CA key"):
        certs.load_or_create(tmp_path / "ca", "lab")


def test_a_ca_with_its_key_missing_or_not_matching_is_named(tmp_path: Path) -> None:
    certs.load_or_create(tmp_path / "ca", "lab")
    certs.load_or_create(tmp_path / "other", "lab")
    (tmp_path / "ca" / certs.CA_KEY).write_bytes((tmp_path / "other" / certs.CA_KEY).read_bytes())
    with pytest.raises(InputError, match="is not the key of"):
        certs.load_or_create(tmp_path / "ca", "lab")
    (tmp_path / "ca" / certs.CA_KEY).unlink()
    with pytest.raises(InputError, match=r"has ca\.pem but not ca-key\.pem"):
        certs.load_or_create(tmp_path / "ca", "lab")
    (tmp_path / "other" / certs.CA_KEY).write_text("garbage")
    with pytest.raises(InputError, match="not valid PEM"):
        certs.load_or_create(tmp_path / "other", "lab")


def test_the_default_directory_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert certs.default_dir("lab") == tmp_path / "overlaylab" / "ca" / "lab"


def test_a_hosts_certificate_serves_and_is_a_client_and_the_admins_is_a_client_alone(tmp_path: Path) -> None:
    """Host certificates carry both usages: the store's Consul (tls.store) verifies dockerd as
    its client, and refused a serverAuth-only certificate on the lab ("tls: bad certificate")."""
    ca, _ = certs.load_or_create(tmp_path / "ca", "c")

    def usages(pem: bytes) -> set[x509.ObjectIdentifier]:
        cert = x509.load_pem_x509_certificate(pem)
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    host, _ = certs.issue(ca, "h", ips=["10.0.0.1"])
    admin, _ = certs.issue(ca, "admin", client=True)
    assert usages(host) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert usages(admin) == {ExtendedKeyUsageOID.CLIENT_AUTH}
