"""The connection flags every service shares, with their LLMEXEC_* environment twins.

Serving:      --tls-cert, --tls-key      (LLMEXEC_TLS_CERT, LLMEXEC_TLS_KEY): serve TLS
              --tls-client-ca            (LLMEXEC_TLS_CLIENT_CA): require client certificates (mutual TLS)
              --health-port              (LLMEXEC_<SERVICE>_HEALTH_PORT): plaintext grpc.health.v1 only
              --drain-seconds            (LLMEXEC_DRAIN_SECONDS): grace for in-flight calls on SIGTERM
Calling peers: --tls-ca                  (LLMEXEC_TLS_CA): verify peers; with --tls-cert/--tls-key set,
                                         they are presented as the client certificate
              --tls-server-name          (LLMEXEC_TLS_SERVER_NAME): name to check in peers' certificates

A flag given on the command line wins over its environment variable.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from llmexec.errors import FailedPreconditionError
from llmexec.rpc.tls import ClientTLS, ServerTLS


def add_transport_args(parser: argparse.ArgumentParser, service: str) -> None:
    """Add the shared connection flags; `service` ("loader") names the health-port variable."""
    env = os.environ.get
    g = parser.add_argument_group("transport security and shutdown")
    g.add_argument("--tls-cert", default=env("LLMEXEC_TLS_CERT", ""),
                   help="PEM certificate: served, and presented to peers when --tls-ca is set")
    g.add_argument("--tls-key", default=env("LLMEXEC_TLS_KEY", ""), help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=env("LLMEXEC_TLS_CLIENT_CA", ""),
                   help="PEM CA: require client certificates it signed (mutual TLS)")
    g.add_argument("--tls-ca", default=env("LLMEXEC_TLS_CA", ""),
                   help="PEM CA that signed the peers' certificates: call peers over TLS")
    g.add_argument("--tls-server-name", default=env("LLMEXEC_TLS_SERVER_NAME", ""),
                   help="check this name in peers' certificates instead of the dialled host")
    g.add_argument("--health-port", type=int, default=int(env(f"LLMEXEC_{service.upper()}_HEALTH_PORT", "0")),
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes); 0: off")
    g.add_argument("--drain-seconds", type=float, default=float(env("LLMEXEC_DRAIN_SECONDS", "10")),
                   help="on SIGTERM, how long in-flight calls may run before they are cancelled")


@dataclass(frozen=True)
class Transport:
    server_tls: ServerTLS | None
    client_tls: ClientTLS | None
    health_port: int
    drain_seconds: float


def transport_from_args(args: argparse.Namespace) -> Transport:
    """What the flags ask for; raises FailedPreconditionError for combinations that cannot work."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise FailedPreconditionError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise FailedPreconditionError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    server_tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    client_tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if args.tls_ca else None
    return Transport(server_tls, client_tls, args.health_port, args.drain_seconds)
