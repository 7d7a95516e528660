"""The ``clusterflow`` console script: a warm ``run`` before anything heavy is imported.

``clusterflow run`` on a warm local stack is handed to the stack's runner
(``flows.warm_client``), which has Prefect and the pipeline imported already; this module
imports only the standard library until it knows whether that applies. Every other command,
and a run without a (current) runner, goes to the Typer app in ``flows.cli`` as before.
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        from flows.warm_client import run_warm

        code = run_warm(sys.argv)
        if code is not None:
            sys.exit(code)
    from flows.cli import app

    app()


if __name__ == "__main__":
    main()
