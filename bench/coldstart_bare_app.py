"""The cold-start baseline of the api function (bench/bench_coldstart.py): a bare FastAPI app with one route
behind Mangum, configured as ``functions/api/handler.py`` configures its own (lifespan off)."""
from __future__ import annotations

from fastapi import FastAPI
from mangum import Mangum

app = FastAPI()


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


handler = Mangum(app, lifespan="off")
