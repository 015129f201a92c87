"""Featurize on a Dask.distributed cluster: each task embeds one chunk of images.

The client keeps the cache: it writes every returned chunk atomically into the same layout a
local run writes, so the result is the same files, and a killed run resumes from the chunks
already written. A worker that dies has its chunks rescheduled by Dask.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Iterator, Sequence

import numpy as np

from featurize.extract import Extractor, FeaturizeConfig, embed_chunk
from lesionlab.errors import LesionLabError

log = logging.getLogger(__name__)
_EXTRACTORS: dict[str, Extractor] = {}  # per worker process: loaded once per settings


def worker_embed(settings: dict, paths: Sequence[str], threads: int | None) -> np.ndarray:
    """Runs on a worker: embed one chunk with a backbone loaded once per worker process."""
    key = json.dumps(settings, sort_keys=True)
    if key not in _EXTRACTORS:
        if threads:
            import torch

            torch.set_num_threads(threads)
        cfg = FeaturizeConfig(**settings)
        _EXTRACTORS[key] = Extractor(cfg)
    return embed_chunk(_EXTRACTORS[key], paths)


@contextmanager
def dask_client(scheduler: str) -> Iterator:
    """A client of ``tcp://...`` (an existing cluster) or of a new ``local:N`` LocalCluster."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise LesionLabError("--scheduler needs Dask: pip install 'lesionlab[distributed]'"
                             ) from None
    if scheduler.startswith("local:"):
        n = int(scheduler.split(":", 1)[1])
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="30s")
    except OSError as exc:
        raise LesionLabError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    with client:
        yield client


def run_on_cluster(cfg: FeaturizeConfig, paths: Sequence[str],
                   todo: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Fan the chunks out; yield (index, start, end, features) as each one comes back."""
    from dask.distributed import as_completed

    # workers are daemon processes (no DataLoader workers); one thread each on a LocalCluster
    settings = asdict(replace(cfg, scheduler=None, num_workers=0))
    threads = 1 if cfg.scheduler.startswith("local:") else None
    with dask_client(cfg.scheduler) as client:
        log.info("featurize on %s: %d chunks over %d workers", cfg.scheduler, len(todo),
                 len(client.scheduler_info()["workers"]))
        futures = {client.submit(worker_embed, settings, list(paths[s:e]), threads,
                                 key=f"embed-{s}-{e}-{id(cfg)}", retries=2): (i, s, e)
                   for i, s, e in todo}
        for future in as_completed(futures):
            i, s, e = futures[future]
            yield i, s, e, future.result()
