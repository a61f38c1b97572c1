"""``python -m relay``: run the public relay."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from starlette.applications import Starlette

from tunnel.credentials import RedactCredentials
from tunnel.protocol import MAX_FRAME_BYTES

from .app import create_app
from .config import ConfigError, RelayConfig
from .drain import DrainingServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay", description="OpenAI-compatible speech API relay for Qwen3-TTS nodes.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.error").addFilter(RedactCredentials())  # uvicorn hands it to websockets
    try:
        config = RelayConfig.from_env()
    except ConfigError as exc:
        sys.exit(f"relay: {exc}")
    app = create_app(config)
    DrainingServer(server_config(app, config, args.host, args.port, args.log_level), app.state.router, config.drain_grace).run()


def server_config(app: Starlette, config: RelayConfig, host: str, port: int, log_level: str) -> uvicorn.Config:
    """How uvicorn serves the relay; in-process tests serve it the same way."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_BYTES + 1024,  # a tunnel frame is at most 64 KiB
        ws_ping_interval=config.ping_interval,
        ws_ping_timeout=config.ping_timeout,
        proxy_headers=True,
        # The access log is off: it adds nothing the relay's own log lines lack.
        access_log=False,
        timeout_graceful_shutdown=5,  # after the drain: slow clients do not hold the exit
    )


if __name__ == "__main__":
    main()
