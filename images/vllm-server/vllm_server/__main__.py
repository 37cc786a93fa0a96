"""Entry point for `python -m vllm_server`."""

from vllm_server.cli import main

if __name__ == "__main__":  # the engine spawns processes: keep this guard
    raise SystemExit(main())
