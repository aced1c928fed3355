"""The OpenAI-compatible HTTP server around LLMEngine (FastAPI + one engine thread)."""
