"""The fleet's certificate authority: created once by ``doramesh fleet init``, kept in a state
directory on the coordinator's box, used to sign the certificates of enrolled devices.

Keys are ECDSA P-256 (fast to make on a Pi, small certificates). Secret files are written 0600
in a 0700 directory, through a temporary file so a crash never leaves half a key behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.security.identity import Identity, valid_name

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
FLEET_FILE = "fleet.json"
TOKEN_KEY = "token.key"
USED_TOKENS = "used-tokens.json"

#: Lifetime of a certificate the CA signs for a device, and of the CA itself.
DEVICE_CERT_DAYS = 365
CA_DAYS = 3650
#: A clock a little behind on a device must not reject a certificate issued just now.
_CLOCK_SKEW = dt.timedelta(minutes=5)


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER, hex: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_csr(key: ec.EllipticCurvePrivateKey, node_id: str) -> bytes:
    """A certificate signing request for ``node_id``; the key never leaves this process."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        # The CN is a label only: the signed identity comes from the token or the request.
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id[:64] or "doramesh device")])
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class FleetCA:
    fleet_id: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, fleet_id: str, *, days: int = CA_DAYS) -> FleetCA:
        if not valid_name(fleet_id):
            raise InvalidArgument(f"invalid fleet id {fleet_id!r}")
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "doramesh"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"doramesh fleet {fleet_id} CA"),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(fleet_id, key, cert)

    # -- state directory -----------------------------------------------------------------

    @classmethod
    def init_state_dir(cls, state_dir: Path, fleet_id: str) -> FleetCA:
        """``doramesh fleet init``: a new CA and token secret; refuses to overwrite a fleet."""
        if (state_dir / CA_KEY).exists():
            raise FailedPrecondition(f"{state_dir} already holds a fleet CA; not overwriting it")
        ca = cls.create(fleet_id)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
        write_secret(state_dir / CA_KEY, key_pem(ca.key))
        write_secret(state_dir / CA_CERT, cert_pem(ca.cert))
        write_secret(state_dir / TOKEN_KEY, secrets.token_bytes(32).hex().encode())
        write_secret(state_dir / FLEET_FILE, json.dumps({"fleet_id": fleet_id}).encode())
        return ca

    @classmethod
    def load(cls, state_dir: Path) -> FleetCA:
        try:
            key = serialization.load_pem_private_key((state_dir / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((state_dir / CA_CERT).read_bytes())
            fleet_id = json.loads((state_dir / FLEET_FILE).read_text())["fleet_id"]
        except FileNotFoundError as err:
            raise FailedPrecondition(
                f"no fleet CA in {state_dir} (run `doramesh fleet init --state-dir {state_dir}`)"
            ) from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{state_dir / CA_KEY} is not an EC key")
        return cls(str(fleet_id), key, cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    # -- signing -------------------------------------------------------------------------

    def sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: Identity,
        *,
        valid_for: dt.timedelta = dt.timedelta(days=DEVICE_CERT_DAYS),
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A leaf certificate for ``identity``: its URI SAN is the only name servers trust."""
        if identity.fleet_id != self.fleet_id:
            raise InvalidArgument(f"{identity} is not in fleet {self.fleet_id}")
        start = not_before or dt.datetime.now(dt.UTC) - _CLOCK_SKEW
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        sans += [x509.DNSName(name) for name in identity.dns_names]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.role != "app":
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def sign_csr(self, csr_pem: bytes, identity: Identity) -> x509.Certificate:
        """Sign a device's CSR; the identity comes from the redeemed token, never the CSR."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise InvalidArgument(f"not a PEM certificate signing request: {err}") from err
        if not csr.is_signature_valid:
            raise InvalidArgument("the CSR's signature does not match its key")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidArgument("the CSR's key must be an EC key")
        return self.sign(public_key, identity)

    def issue(
        self,
        identity: Identity,
        *,
        valid_for: dt.timedelta = dt.timedelta(days=DEVICE_CERT_DAYS),
        not_before: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A new key and certificate (PEM) for a service running where the CA is: the
        coordinator and planner on the CA's box, tools run by the fleet's operator, test fleets.
        """
        key = new_key()
        cert = self.sign(key.public_key(), identity, valid_for=valid_for, not_before=not_before)
        return key_pem(key), cert_pem(cert)
