"""A small fake vLLM OpenAI server for tests that do not need real generation.

It implements what lorajobs calls, with vLLM's observable behaviour (vLLM 0.32):
    GET  /v1/models                  the base model + loaded adapters
    POST /v1/load_lora_adapter       400 "...has already been loaded" for a loaded name; 400
                                     when lora_path holds no adapter_config.json
    POST /v1/unload_lora_adapter     404 for a name not loaded
    POST /v1/chat/completions, /v1/completions   a fixed answer naming the model; with
                                     "stream": true, SSE chunks ending in `data: [DONE]`;
                                     404 for a model it does not serve
`restart()` forgets the adapters, as a restarted server does. The real server is exercised by
tests/serving/test_vllm_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorajobs.localserver import free_port

__all__ = ["FakeVllm"]

WORDS = ["Hello", " from", " the", " fake", " server"]


class FakeVllm:
    def __init__(self, base_model: str, *, api_key: str | None = None,
                 chunk_delay: float = 0.0) -> None:
        self.base_model = base_model
        self.api_key = api_key
        self.chunk_delay = chunk_delay
        self.adapters: dict[str, str] = {}  # name -> path
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = self._build()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeVllm:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake vLLM did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def restart(self) -> None:
        self.adapters.clear()

    def _authorized(self, request: Request) -> bool:
        return not self.api_key or request.headers.get("authorization") == \
            f"Bearer {self.api_key}"

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            if not self._authorized(request):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            ids = [self.base_model, *self.adapters]
            return {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}

        @app.post("/v1/load_lora_adapter")
        async def load(body: dict[str, Any]) -> Response:
            name, path = body["lora_name"], body["lora_path"]
            self.requests.append(("load", body))
            if name in self.adapters:
                return JSONResponse({"error": {"message": f"The lora adapter '{name}' has "
                                               "already been loaded."}}, status_code=400)
            if not (Path(path) / "adapter_config.json").is_file():
                return JSONResponse({"error": {"message": f"No adapter found for {path}"}},
                                    status_code=400)
            self.adapters[name] = path
            return Response(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(body: dict[str, Any]) -> Response:
            self.requests.append(("unload", body))
            if self.adapters.pop(body["lora_name"], None) is None:
                return JSONResponse({"error": {"message": "The lora adapter not found."}},
                                    status_code=404)
            return Response("Success")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._generate(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._generate(await request.json(), chat=False)

        return app

    async def _generate(self, body: dict[str, Any], *, chat: bool) -> Response:
        self.requests.append(("chat" if chat else "completion", body))
        model = body.get("model")
        if model != self.base_model and model not in self.adapters:
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.",
                                           "type": "NotFoundError", "code": 404}},
                                status_code=404)
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(WORDS)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "stop"} if chat else
                      {"index": 0, "text": text, "finish_reason": "stop"})
            return JSONResponse({"id": "cmpl-fake", "object": kind, "created": 0,
                                 "model": model, "choices": [choice],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 5,
                                           "total_tokens": 6}})

        async def events() -> Any:
            for word in WORDS:
                choice = ({"index": 0, "delta": {"content": word}, "finish_reason": None}
                          if chat else {"index": 0, "text": word, "finish_reason": None})
                chunk = {"id": "cmpl-fake", "object": f"{kind}.chunk", "created": 0,
                         "model": model, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def main() -> None:
    """`python -m tests.fake_vllm --model NAME --port N`: the fake in a process of its own
    (bench/proxy_bench.py)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = FakeVllm(args.model)
    uvicorn.run(server.app, host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
