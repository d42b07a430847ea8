"""TLS and mutual TLS for our gRPC servers and channels, from mounted PEM files.

A service reads its certificate files once, at start (Kubernetes mounts them
from a Secret; rotate them by restarting the pods). One certificate per
service serves both directions: it is the server certificate other services
verify, and the client certificate it presents when it calls them. So it
needs both key usages (cert-manager: `usages: [server auth, client auth]`)
and the DNS names (or IPs) its callers dial.

    ServerTLS(cert, key)                 TLS: clients verify the server
    ServerTLS(cert, key, client_ca)      mutual TLS: the server also requires a client
                                         certificate signed by client_ca; a client
                                         without one fails the handshake, before any
                                         RPC exists (the client sees UNAVAILABLE)
    ClientTLS(ca)                        verify servers against ca
    ClientTLS(ca, cert, key)             ... and present a client certificate
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from llmexec.errors import FailedPreconditionError


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read the {what} {path!r}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise FailedPreconditionError(f"the {what} {path!r} is not PEM (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    cert_file: str
    key_file: str
    client_ca_file: str = ""  # set: mutual TLS, client certificates required

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key_file, "TLS key"), read_pem(self.cert_file, "TLS certificate"))
        client_ca = read_pem(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=self.mutual)


@dataclass(frozen=True)
class ClientTLS:
    ca_file: str
    cert_file: str = ""  # with key_file: the client certificate for mutual TLS
    key_file: str = ""
    # Checked against the server certificate instead of the dialled host, for
    # addresses the certificate does not name (a pod IP, a port-forward).
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise FailedPreconditionError("a client certificate needs both its certificate and its key file")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca_file, "CA certificate"),
            private_key=read_pem(self.key_file, "TLS key") if self.key_file else None,
            certificate_chain=read_pem(self.cert_file, "TLS certificate") if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
