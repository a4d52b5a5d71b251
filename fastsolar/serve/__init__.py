"""`fastsolar serve`: an OpenAI-compatible HTTP server with continuous batching over the static KV cache.

- `engine.py`: the continuous-batching loop (one thread owns the model; requests join and leave the
  running decode batch one step at a time, each in its own cache row);
- `schemas.py`, `errors.py`, `api.py`: request validation, OpenAI-shaped errors, the FastAPI routes;
- `grammar.py`, `token_mask.py`: `response_format` as an llguidance grammar, and the per-row token bitmask a
  decode step applies;
- `metrics.py`: GET /metrics in Prometheus' format under vLLM's names;
- `sizing.py`: cache rows from a memory fraction (`--gpu-memory-utilization`);
- `server.py`: uvicorn, binding and graceful shutdown.

The HTTP parts need the `serve` extra (`pip install 'fastsolar[serve]'`); the engine needs only torch.

    from fastsolar import Solar, Tokenizer
    from fastsolar.serve import Engine, create_app, run
    model, tok = Solar.from_pretrained(d, device="cuda"), Tokenizer.from_pretrained(d)
    run(create_app(Engine(model, tok, max_batch=8), tok, "solar"), port=8000)
"""
from fastsolar.decoding.sampling import RowParams
from fastsolar.serve.engine import Engine, Output, Request


def __getattr__(name: str):
    # The HTTP pieces import fastapi / uvicorn, which the core install does not have.
    if name == "create_app":
        from fastsolar.serve.api import create_app

        return create_app
    if name == "run":
        from fastsolar.serve.server import run

        return run
    raise AttributeError(f"module 'fastsolar.serve' has no attribute {name!r}")


__all__ = ["Engine", "Output", "Request", "RowParams", "create_app", "run"]
