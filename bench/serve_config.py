"""Run the production server (what ``pie-engine serve`` runs) from an EngineConfig JSON file, for benchmarks.

Why not ``serve`` itself: fields such as ``swap_link_bytes_per_s`` (the modelled KV link) are deliberately not
``serve`` flags. This takes every EngineConfig field from the JSON and then runs ``pie_engine.cli.run_server``, the
same code ``serve`` runs after parsing its flags (create_engine, create_app, uvicorn, the same signal handling).
Torch threads follow bench/pie_common.py: ONE compute thread, so the KV copy threads get the other core
(``PIE_BENCH_THREADS`` overrides).

    PYTHONPATH=engine:. python -m bench.serve_config CONFIG_JSON HOST PORT [LOG_LEVEL]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 4):
        sys.exit(f"usage: python -m bench.serve_config CONFIG_JSON HOST PORT [LOG_LEVEL]\n\n{__doc__}")
    import click

    from bench.pie_common import setup_threads
    from pie_engine.cli import run_server
    from pie_engine.config import EngineConfig

    setup_threads()  # before the model loads: torch's thread pool is sized on first use
    config = EngineConfig(**json.loads(Path(args[0]).read_text()))
    try:
        run_server(config, args[1], int(args[2]), args[3] if len(args) == 4 else "warning")
    except click.exceptions.Exit as e:  # run_server's own failure exit (it already printed the reason)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
