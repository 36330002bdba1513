"""serve.py's server, by concern: request schema and checks (protocol), the batching scheduler over the
engine (scheduler), per-user saved conversations (user_memory), the personas and their prompts
(server), the FastAPI app and startup (app)."""
