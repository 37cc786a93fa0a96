"""What is served: GET /v1/models and /v1/info, and LoRA adapters (list, load, unload)."""

from __future__ import annotations

import asyncio

from vllm_server import __version__
from vllm_server.engine import Engine, EngineInputError
from vllm_server.errors import ApiError, model_not_found
from vllm_server.protocol import (
    InfoResponse,
    LoadLoraAdapterRequest,
    LoraAdapterInfo,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
)
from vllm_server.serving.state import ServingState


class ModelsServing:
    """The base model's names, the loaded adapters, and deployment facts."""

    def __init__(self, state: ServingState) -> None:
        """Serve on the shared state."""
        self.state = state
        self._base_names = set(state.settings.model_names)
        # Adapter changes one at a time: two concurrent loads of a name both passed the
        # "already loaded" check and left two copies in the engine.
        self._adapter_lock = asyncio.Lock()

    def resolve(self, eng: Engine, name: str | None) -> tuple[str, str | None]:
        """A request's `model`: (name to report, LoRA adapter or None); unknown names are 404."""
        if name is None or name in self._base_names:
            return name or self.state.settings.model_name, None
        if name in eng.lora_adapters():
            return name, name
        raise model_not_found(name)

    def model_list(self) -> ModelList:
        """Base model name(s) and loaded LoRA adapters."""
        settings, eng = self.state.settings, self.state.engine
        mml = self.state.max_model_len()
        cards = [ModelCard(id=name, root=settings.model, max_model_len=mml) for name in settings.model_names]
        if eng is not None:
            parent = settings.model_name
            cards += [
                ModelCard(id=name, root=a.path, parent=parent, max_model_len=mml)
                for name, a in eng.lora_adapters().items()
            ]
        return ModelList(data=cards)

    def info(self) -> InfoResponse:
        """Deployment facts for operators and humans."""
        s, eng = self.state.settings, self.state.engine
        return InfoResponse(
            model=s.model,
            served_model_name=s.model_name,
            max_model_len=self.state.max_model_len(),
            gpus=s.tensor_parallel_size * s.pipeline_parallel_size,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            dtype=eng.info.dtype if eng else s.dtype,
            gpu_memory_utilization=s.gpu_memory_utilization,
            quantization=(eng.info.quantization if eng else None) or s.quantization,
            kv_cache_dtype=(eng.info.kv_cache_dtype if eng else None) or s.kv_cache_dtype,
            lora_adapters=sorted(eng.lora_adapters()) if eng else [],
            engine_ready=eng is not None,
            version=__version__,
        )

    def lora_adapters(self) -> list[LoraAdapterInfo]:
        """Loaded adapters."""
        eng = self.state.attached_engine()
        return [LoraAdapterInfo(name=n, path=a.path, id=a.id) for n, a in eng.lora_adapters().items()]

    async def load_lora(self, req: LoadLoraAdapterRequest) -> str:
        """Load an adapter; its name becomes a model name."""
        eng = self.state.attached_engine()
        if not self.state.settings.lora_enabled:
            raise ApiError(
                400,
                "LoRA is not enabled; start the server with --enable-lora.",
                param="lora_name",
                code="lora_disabled",
            )
        if req.lora_name in self._base_names:
            raise ApiError(400, f"`{req.lora_name}` is the base model's name.", param="lora_name")
        async with self._adapter_lock:
            if req.lora_name in eng.lora_adapters():
                raise ApiError(
                    400,
                    f"The LoRA adapter `{req.lora_name}` has already been loaded.",
                    param="lora_name",
                    code="lora_already_loaded",
                )
            try:
                await eng.add_lora(req.lora_name, req.lora_path)
            except EngineInputError as exc:
                # The engine could not read the adapter: the path is at fault, whatever it says.
                raise ApiError(400, str(exc), param="lora_path") from exc
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload_lora(self, req: UnloadLoraAdapterRequest) -> str:
        """Unload an adapter; its name is then an unknown model."""
        eng = self.state.attached_engine()
        async with self._adapter_lock:
            if req.lora_name not in eng.lora_adapters():
                raise ApiError(
                    404,
                    f"The LoRA adapter `{req.lora_name}` is not loaded.",
                    param="lora_name",
                    code="lora_not_found",
                )
            await eng.remove_lora(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."
