"""Entry point of the embedded AWS endpoint: moto's own HTTP server plus our extensions.

Run as ``python -m infra.aws.moto_server -H 127.0.0.1 -p PORT`` (same flags as ``moto_server``).
"""

from __future__ import annotations

import sys

from infra.aws import moto_gaps


def main(argv: list[str] | None = None) -> None:
    moto_gaps.apply()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
