"""OpenAI-compatible HTTP server for trimode (``trimode serve``): FastAPI + uvicorn.

``app.build_app(engine, tokenizer, vocab_size, ServerConfig(...))`` gives the ASGI app;
``cli`` adds the ``serve`` subcommand (importable without the server's dependencies). The
app modules need the ``serve`` extra (fastapi, uvicorn, prometheus_client).
"""
