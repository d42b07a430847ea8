"""`python -m llmexec.rpc.probe ADDRESS [SERVICE]`: exit 0 when grpc.health.v1 says SERVING.

For health checks that run a command inside the container (Docker Compose,
or Kubernetes exec probes on clusters older than native gRPC probes). Plaintext:
point it at a service's --health-port.
"""

from __future__ import annotations

import sys

from llmexec.rpc.client import check_health


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    status = check_health(args[0], args[1] if len(args) == 2 else "")
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
