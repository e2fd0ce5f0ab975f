"""`ds4c`: the command-line client of the ds4 daemon.

For now this carries only the command-line entry point (`--version`, the socket path it would use); the REPL and
pipe mode arrive with the daemon they talk to.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .protocol import PROTOCOL_VERSION, socket_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds4c", description="Client of the ds4 inference daemon (ds4d).")
    parser.add_argument("--version", action="version", version=f"ds4c {__version__} (protocol {PROTOCOL_VERSION})")
    parser.add_argument("--socket", help="daemon socket (default: $DS4_SOCKET, $XDG_RUNTIME_DIR/ds4/ds4.sock, /tmp/ds4-UID/ds4.sock)")
    args = parser.parse_args(argv)
    print(f"ds4c {__version__}: the daemon client is not available yet; its socket would be {socket_path(args.socket)}",
          file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
