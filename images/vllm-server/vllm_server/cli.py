"""Command line: parse flags, validate engine flags early, run uvicorn with a graceful stop."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Generator, Sequence

import uvicorn

from vllm_server.app import create_app
from vllm_server.auth import Access
from vllm_server.engine import engine_args_from_argv
from vllm_server.settings import Settings, parse_settings

log = logging.getLogger("vllm_server")


class _Server(uvicorn.Server):
    """uvicorn without re-raising SIGTERM after a graceful stop, so the exit code is 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install stop handlers; unlike uvicorn's, do not re-raise the signal afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def check_engine_args(settings: Settings) -> str | None:
    """Parse the engine command line with vLLM's parser now; return an error or None."""
    try:
        engine_args_from_argv(settings.engine_argv())
    except ImportError as exc:
        return f"vLLM is not installed: {exc}"
    except SystemExit as exc:  # argparse already printed the problem
        return f"invalid engine arguments (exit {exc.code})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; 0 on a clean stop, 1 if the engine failed."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    access = Access.from_settings(settings)
    log.info("%r", access)  # which credentials are set, never their values
    if access.adapter_changes_open:
        log.warning(
            "Anyone who can reach this server may load and unload LoRA adapters "
            "(VLLM_ALLOW_RUNTIME_LORA_UPDATING without an API key or admin token)."
        )
    problem = check_engine_args(settings)
    if problem:
        log.error("%s", problem)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,  # per-request log lines cost CPU under load; /metrics counts them
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        timeout_keep_alive=30,
    )
    _Server(config).run()
    if app.state.startup_error is not None:
        return 1
    return 0
