"""``fastattr index build --ray``: the manifest's chunks embedded by a pool of Ray actors.

The driver (the process running the command) still streams and validates the manifest and merges
the chunks; each actor loads the encoder once (on the GPU Ray gives it, else on CPU) and runs the
single-process ``_embed_chunk`` into the work dir. So the bundle is the single-process one, and a
killed build continues with ``--resume`` (finished chunks are skipped).

On a multi-node cluster the work dir (``<out>.partial``), the images and the encoder files must be
on a filesystem every node mounts at the same path, and fastattr must be installed on every node.
Only imported with ``--ray``: ``import fastattr_hook`` and ``fastattr --help`` never import Ray.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from fastattr_hook.errors import FastattrError

IN_FLIGHT_PER_WORKER = 2  # queued chunks per actor: no actor waits, and the driver holds few rows
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast on a cluster address nobody answers: ``ray.init(address=...)`` retries it for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise FastattrError(f"--ray-address {address!r}: expected HOST:PORT (the GCS port `ray start --head` "
                            "prints, 6379 by default) or ray://HOST:PORT (Ray Client)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FastattrError(f"Ray cluster at {address} not reachable ({exc}); check the address and "
                            "that `ray start --head` runs there, or leave out --ray-address (and RAY_ADDRESS) to "
                            "start Ray on this machine") from None


class RayChunkPool:
    """Context manager over the Ray connection; ``submit`` hands a chunk to the least busy actor.

    Made before the encoder loads, so that a missing Ray or a wrong address fails at once. Entering
    connects to ``options.ray_address``, else ``$RAY_ADDRESS``, else starts Ray on this machine (an
    already initialised Ray, e.g. in a notebook, is used as it is); actors start on the first chunk.
    """

    def __init__(self, encoder_spec: Path, work: Path, options) -> None:
        try:
            import ray
        except ImportError:
            raise FastattrError("--ray needs Ray, which is not installed: pip install 'fastattr[ray]'") from None
        if options.ray_workers is not None and options.ray_workers < 1:
            raise FastattrError(f"--ray-workers {options.ray_workers}: give at least 1")
        self.ray, self.options = ray, options
        self.actor_args = (encoder_spec, work, options)
        self.address = None if ray.is_initialized() else options.ray_address or os.environ.get("RAY_ADDRESS")
        if self.address and self.address not in ("auto", "local"):
            check_reachable(self.address)
        self.started = False
        self.actors: list = []
        self.in_flight: dict = {}  # ObjectRef -> index of the actor embedding that chunk

    def __enter__(self) -> RayChunkPool:
        if not self.ray.is_initialized():
            self.ray.init(address=self.address or "local")
            self.started = True
        return self

    def __exit__(self, *exc_info) -> None:
        for actor in self.actors:  # an interrupted build frees its GPUs at once
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()

    def submit(self, chunk_index: int, rows: list) -> int:
        """Queue one chunk, first waiting while every actor has its share; returns rows finished meanwhile."""
        if not self.actors:
            self._start_actors()
        finished = 0
        while len(self.in_flight) >= IN_FLIGHT_PER_WORKER * len(self.actors):
            finished += self._finish_one()
        load = [0] * len(self.actors)
        for n in self.in_flight.values():
            load[n] += 1
        n = load.index(min(load))
        self.in_flight[self.actors[n].embed.remote(chunk_index, rows)] = n
        return finished

    def drain(self) -> int:
        """Wait for every queued chunk; returns their rows."""
        finished = 0
        while self.in_flight:
            finished += self._finish_one()
        return finished

    def _finish_one(self) -> int:
        [ref], _ = self.ray.wait(list(self.in_flight), num_returns=1)
        del self.in_flight[ref]
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, FastattrError):  # said as the single-process build says it
                raise exc.cause from None
            raise
        except self.ray.exceptions.RayActorError as exc:
            raise FastattrError(f"a Ray worker died ({exc}); rerun with --resume: finished chunks are kept in "
                                f"{self.actor_args[1]}") from None

    def _start_actors(self) -> None:
        resources = self.ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        have, kind = (gpus, "GPUs") if gpus else (cpus, "CPUs")
        workers = self.options.ray_workers or have
        if workers > have:  # Ray would wait forever for the missing resources
            raise FastattrError(f"--ray-workers {workers}: the Ray cluster has {have} {kind} and each worker takes "
                                f"one; ask for at most {have}, or add nodes")
        actor = self.ray.remote(**({"num_gpus": 1} if gpus else {"num_cpus": 1}))(ChunkEmbedder)
        self.actors = [actor.remote(*self.actor_args) for _ in range(workers)]


class ChunkEmbedder:
    """One Ray actor: loads the encoder once, then embeds each chunk it is handed into the work dir."""

    def __init__(self, encoder_spec: Path, work: Path, options) -> None:
        self.encoder_spec, self.work, self.options = encoder_spec, work, options
        self.encoder = None  # loaded by the first chunk: an error there reaches the driver as raised

    def embed(self, chunk_index: int, rows: list) -> int:
        from .build import _embed_chunk

        if self.encoder is None:
            self.encoder = self._load_encoder()
        _embed_chunk(chunk_index, rows, self.encoder, self.work, self.options)
        return len(rows)

    def _load_encoder(self):
        import ray
        from fastattr_hook.encoder import Encoder

        from .build import read_work_state

        node = ray.util.get_node_ip_address()
        state_file = self.work / "state.yaml"  # written by the driver before any chunk is handed out
        if not state_file.is_file():
            raise FastattrError(f"{self.work} is not visible on Ray node {node}: on a multi-node cluster the work "
                                "dir must be on storage every node mounts at the same path")
        encoder = Encoder.from_yaml(self.encoder_spec, device="cuda" if ray.get_gpu_ids() else "cpu")
        if encoder.fingerprint != read_work_state(self.work)["encoder_fingerprint"]:
            raise FastattrError(f"{self.encoder_spec} on Ray node {node} differs from the driver's; the encoder "
                                "files must be the same on every node (shared storage)")
        return encoder
