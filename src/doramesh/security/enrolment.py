"""Enrolment: a device turns a join token into a certificate for its node id.

The device makes its key and a CSR locally (the key never leaves it), reads the CA fingerprint
from its token, finds that CA in the chain the coordinator's TLS-only port presents, and only
then calls ``Enrol`` over TLS that trusts exactly that CA. The coordinator's interceptor checks
the token before the servicer runs; the servicer redeems it and signs.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from doramesh.channels import create_channel
from doramesh.errors import DoraMeshError, InvalidArgument, Unavailable, from_rpc_error
from doramesh.security import tokens
from doramesh.security.authority import FleetAuthority
from doramesh.security.ca import cert_pem, fingerprint, key_pem, make_csr, new_key
from doramesh.security.credentials import Credentials, save_node_credentials
from doramesh.security.interceptor import bearer_token
from doramesh.servicing import unary_errors
from doramesh.v1 import security_pb2, security_pb2_grpc

_log = structlog.get_logger("enrolment")

_DER = 2  # ssl's ENCODING_DER (_ssl.ENCODING_DER)
#: A CSR or certificate is a few hundred bytes; refuse anything absurd before parsing it.
MAX_PEM_BYTES = 16 << 10


class EnrolmentServicer(security_pb2_grpc.EnrolmentServicer):
    def __init__(self, authority: FleetAuthority) -> None:
        self._authority = authority

    @unary_errors
    async def Enrol(
        self, request: security_pb2.EnrolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> security_pb2.EnrolResponse:
        if len(request.csr_pem) > MAX_PEM_BYTES:
            raise InvalidArgument(f"csr_pem is larger than {MAX_PEM_BYTES} bytes")
        identity, cert = self._authority.enrol(
            bearer_token(context), request.node_id, bytes(request.csr_pem)
        )
        _log.info("device enrolled", node_id=identity.name, peer=context.peer())
        return security_pb2.EnrolResponse(
            cert_pem=cert,
            ca_pem=self._authority.ca.cert_pem,
            fleet_id=identity.fleet_id,
            node_id=identity.name,
        )


def fetch_pinned_ca(address: str, ca_fingerprint: str, *, timeout: float = 5.0) -> bytes:
    """The CA certificate (PEM) whose sha256 is ``ca_fingerprint``, taken from the chain the
    TLS port at ``address`` presents, and only if that port's own certificate is signed by it.
    Nothing is trusted before the fingerprint matches."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified by fingerprint below
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            # Python 3.13 made the chain public (DER bytes); 3.11-3.12 keep it on _sslobj.
            public = getattr(tls, "get_unverified_chain", None)
            chain = public() if public is not None else tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
            der_chain = [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain or []]
    except (OSError, ValueError) as err:
        raise Unavailable(f"cannot reach the enrolment port {address}: {err}") from err
    certs = [x509.load_der_x509_certificate(der) for der in der_chain]
    matches = [c for c in certs if fingerprint(c) == ca_fingerprint.lower()]
    if not certs or not matches:
        raise Unavailable(
            f"{address} does not present the fleet CA the token pins; not enrolling there"
        )
    ca = matches[0]
    try:
        certs[0].verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise Unavailable(f"{address}'s certificate is not signed by the pinned CA") from err
    return cert_pem(ca)


def token_credentials(address: str, token: str) -> Credentials:
    """Credentials for an app holding an app token: the CA its token pins, fetched from the
    coordinator's TLS-only port at ``address`` (where such an app must call)."""
    return Credentials(
        fetch_pinned_ca(address, tokens.peek(token).ca_fingerprint), bearer_token=token
    )


async def enrol(address: str, token: str, node_id: str, *, timeout: float = 10.0) -> Credentials:
    """Enrol this device with the coordinator's TLS-only port at ``address``."""
    claims = tokens.peek(token)
    ca_pem = await asyncio.to_thread(fetch_pinned_ca, address, claims.ca_fingerprint)
    key = new_key()
    csr = make_csr(key, node_id)
    creds = Credentials(ca_pem, bearer_token=token)
    async with create_channel(address, credentials=creds) as channel:
        stub = security_pb2_grpc.EnrolmentStub(channel)
        try:
            reply = await stub.Enrol(
                security_pb2.EnrolRequest(node_id=node_id, csr_pem=csr), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
    got = x509.load_pem_x509_certificate(reply.cert_pem)
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = got.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if mine != theirs or reply.ca_pem != ca_pem:
        raise DoraMeshError("the coordinator returned a certificate for another key or CA")
    return Credentials.from_pem(ca_pem, bytes(reply.cert_pem), key_pem(key))


async def enrol_into(
    state_dir: Path, address: str, token: str, node_id: str, *, timeout: float = 10.0
) -> Credentials:
    """Enrol and keep the credentials in ``state_dir`` (key 0600)."""
    creds = await enrol(address, token, node_id, timeout=timeout)
    save_node_credentials(state_dir, creds)
    return creds
