"""Local web page and HTTP API over a lesionlab model folder (FastAPI + uvicorn)."""
