"""vllm_server: an OpenAI-compatible HTTP server on vLLM's async engine."""

__version__ = "0.1.0"
