"""Featurize on a Dask.distributed cluster: each task embeds one chunk of images.

The client keeps the cache: it writes every returned chunk atomically into the same layout a
local run writes, so the result is the same files, and a killed run resumes from the chunks
already written. A worker that dies has its chunks rescheduled by Dask.

Connecting to ``tcp://...`` is bounded by Dask's ``distributed.comm.timeouts.connect`` setting
(30 s unless ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT`` or a Dask config file says
otherwise), the Dask handshake included: a peer that is not a Dask scheduler, or that never
answers, is a one-line ``LesionLabError`` naming the address.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from lesionlab.errors import LesionLabError

log = logging.getLogger(__name__)
# a worker's task: (featurize settings, image paths, torch threads or None) -> (n, dim) features
Task = Callable[[dict, Sequence[str], int | None], np.ndarray]


def connect_timeout(timeout: float | str | None = None) -> float:
    """Seconds to wait for a scheduler: ``timeout``, else Dask's connect timeout setting."""
    import dask
    from dask.utils import parse_timedelta

    if timeout is None:
        timeout = dask.config.get("distributed.comm.timeouts.connect")
    return float(parse_timedelta(timeout, default="seconds"))


def probe_scheduler(address: str, timeout: float) -> None:
    """Check that a Dask scheduler completes the handshake at ``address`` within ``timeout`` s.

    Dask's own ``Client(..., timeout=)`` bounds the TCP connect but not the handshake read
    after it, so a peer that accepts and stays silent would hang it forever; and a peer that
    is not Dask makes it decode garbage (``Unable to allocate 3.07 EiB``).

    Raises:
        LesionLabError: nothing listens there, the peer does not speak the Dask protocol, or
            it does not answer within ``timeout`` seconds.
    """
    from distributed.comm import connect

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    with ThreadPoolExecutor(1) as pool:  # its own event loop, also under a running one
        try:
            pool.submit(asyncio.run, handshake()).result()
        except (asyncio.TimeoutError, TimeoutError):
            raise LesionLabError(f"the Dask scheduler {address} did not answer within "
                                 f"{timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, closed mid-handshake
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise LesionLabError(f"cannot reach the Dask scheduler {address}: {why}") from None
        except Exception as exc:  # a non-Dask peer's bytes: MemoryError, ValueError, ...
            raise LesionLabError(f"{address} is not a Dask scheduler: its reply is not the "
                                 f"Dask protocol ({type(exc).__name__})") from None


@contextmanager
def dask_client(scheduler: str, timeout: float | str | None = None) -> Iterator:
    """A client of ``tcp://...`` (an existing cluster) or of a new ``local:N`` LocalCluster.

    ``timeout`` (seconds or ``"30s"``; None: Dask's connect timeout) bounds reaching an
    existing scheduler.

    Raises:
        LesionLabError: Dask is not installed, or the scheduler cannot be reached, is not a
            Dask scheduler, or does not answer within the timeout.
    """
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
    seconds = connect_timeout(timeout)
    probe_scheduler(scheduler, seconds)
    try:
        client = Client(scheduler, timeout=seconds)
    except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise LesionLabError(f"cannot reach the Dask scheduler {scheduler}: {why}") from None
    with client:
        yield client


def run_on_cluster(scheduler: str, settings: dict, task: Task, paths: Sequence[str],
                   todo: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Fan the chunks out: ``task(settings, paths[start:end], threads)`` runs on a worker for
    each (index, start, end) of ``todo`` (``task`` must be importable there: a module-level
    function); yield (index, start, end, features) as each one comes back.

    Args:
        scheduler: ``tcp://HOST:PORT`` or ``local:N``.
        settings: the ``FeaturizeConfig`` as a dict, sent to every task.
        task: ``task(settings, paths, threads) -> (n_chunk, dim)`` float32 embeddings.
        paths: the image files, as strings.
        todo: (index, start, end) of each chunk to embed.

    Returns:
        (index, start, end, features) per chunk as it finishes; features (end - start, dim).

    Raises:
        LesionLabError: the scheduler cannot be reached (see :func:`dask_client`).
    """
    from dask.distributed import as_completed

    threads = 1 if scheduler.startswith("local:") else None  # one thread each on a LocalCluster
    with dask_client(scheduler) as client:
        log.info("featurize on %s: %d chunks over %d workers", scheduler, len(todo),
                 len(client.scheduler_info()["workers"]))
        futures = {client.submit(task, settings, list(paths[s:e]), threads,
                                 key=f"embed-{s}-{e}-{id(settings)}", retries=2): (i, s, e)
                   for i, s, e in todo}
        for future in as_completed(futures):
            i, s, e = futures[future]
            yield i, s, e, future.result()
