"""`llmstack serve`: an OpenAI-compatible HTTP API over continuous batching.

engine.py (the scheduler over the slot-based KV cache), text.py (detokenization, stop strings,
chat templates), protocol.py (the OpenAI wire format), app.py (FastAPI routes, guards, SSE) and
server.py (`serve(ServeOptions)`: load, bind, run uvicorn, drain on SIGTERM).
"""
