"""The model-aware router: one OpenAI endpoint for every VLLMModel it is given.

Layers, each in its own module:
- `table` (pure): VLLMModels and their pods -> which names route to which pod addresses;
- `balance` (pure): which eligible pod takes a request (least load, prefix affinity, session);
- `errors` (pure): OpenAI-shaped error bodies, the one place they are built;
- `proxy` (asyncio edge): the HTTP/1.1 front end and the upstream connection pool; request and
  response bodies pass through as bytes, SSE chunks are relayed as they arrive;
- `watch` (Kubernetes edge): keeps the table current from watches of VLLMModels and pods;
- `serve`: wires them together for `vllm-operator router`.
"""
