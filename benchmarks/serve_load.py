"""``python -m benchmarks.serve_load --model DIR``: latency and throughput of the local server.

Starts ``python -m serve`` on a free loopback port, fires ``--requests`` POST /api/predict
calls from ``--concurrency`` client threads, prints p50/p95 latency and requests/s with the
CPU model, then stops the server. Traffic goes to 127.0.0.1 only; the loop is bounded.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionlab.cli import command_parser, config_from_args, model_option, option, run_main
from lesionlab.device import cpu_model
from lesionlab.errors import LesionLabError

FIXTURE_IMAGE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ham_small"


def start_server(model: Path, threads: int, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m serve`` on a free loopback port; returns the process and its URL.

    Raises:
        LesionLabError: the server exits, or does not answer ``/healthz`` within ``timeout``
            seconds (it is then terminated).
    """
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(model), "--port",
                             str(port), "--threads", str(threads)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LesionLabError(f"the server stopped (exit {proc.returncode})")
        try:
            httpx.get(url + "/healthz", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise LesionLabError(f"the server did not answer within {timeout:.0f} s")


def fire(url: str, image: Path, n: int, concurrency: int, gradcam: bool) -> tuple[list, int]:
    """``n`` requests from ``concurrency`` threads; returns latencies (s) and the error count."""
    import httpx

    data = image.read_bytes()
    query = "?gradcam=true" if gradcam else ""

    def one(_: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        res = httpx.post(url + "/api/predict" + query, timeout=300,
                         files={"image": (image.name, data, "image/jpeg")})
        return time.perf_counter() - t0, res.status_code == 200

    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(n)))
    return [t for t, _ in out], sum(not ok for _, ok in out)


@dataclass
class ServeLoadConfig:
    """The flags of ``python -m benchmarks.serve_load``."""

    model: Path = model_option("a model folder to serve")
    image: Path | None = option(None, "image to send; None: a fixture")
    requests: int = option(64, "requests in all", ge=1)
    concurrency: int = option(8, "client threads", ge=1)
    threads: int = option(2, "the server's inference threads", ge=1)
    gradcam: bool = option(False, "ask for Grad-CAM overlays too", switch=True)


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``ServeLoadConfig``."""
    return command_parser("python -m benchmarks.serve_load", __doc__, ServeLoadConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve, load, print the figures, stop."""
    args = config_from_args(ServeLoadConfig, build_parser().parse_args(argv))
    image = args.image or sorted((FIXTURE_IMAGE / "images").glob("*.jpg"))[0]
    proc, url = start_server(args.model, args.threads)
    try:
        fire(url, image, 2, 1, args.gradcam)  # warm-up
        t0 = time.perf_counter()
        lat, errors = fire(url, image, args.requests, args.concurrency, args.gradcam)
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    p50, p95 = np.percentile(np.asarray(lat) * 1000, [50, 95])
    print(f"\n{cpu_model()}; model {args.model.name}; {args.requests} requests, "
          f"{args.concurrency} clients, {args.threads} server threads"
          f"{', with Grad-CAM' if args.gradcam else ''}\n")
    print("| p50 latency (ms) | p95 latency (ms) | requests/s | errors |")
    print("|---:|---:|---:|---:|")
    print(f"| {p50:.0f} | {p95:.0f} | {args.requests / wall:.1f} | {errors} |")
    return 0


if __name__ == "__main__":
    run_main(main)
