"""`python -m vllm_operator` is the console script."""

from vllm_operator.cli import main

raise SystemExit(main())
