"""The backend scaled out on Ray Serve: three deployments behind the same HTTP face as the single-process server.

- ``Ingress`` (stateless): the routes, auth, limits and error format of ``create_http_app``; it forwards each
  session's calls to the session tier with the session id as the routing key.
- ``SessionTier`` (CPU): owns sessions and does the encrypted update (``Engine``), routed by session id with
  Serve's consistent-hash router; every session is written through to Redis (``RedisSessionStore``), so a lost or
  added replica costs at most the step in flight, which the ingress retries on another replica.
- ``UNetTier`` (one GPU per replica in production): stateless; ``@serve.batch`` stacks the steps of different
  sessions (per-row timesteps, each session's guidance pair kept together, grouped by shape) into one forward pass.

Only bytes, numpy arrays and plain dataclasses cross deployment handles: TenSEAL objects do not pickle.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig

from hediff.backend.app import ApiError, as_api_errors, create_http_app
from hediff.backend.auth import TokenStore
from hediff.backend.engine import BodyCall, Engine, ModelFacts, ServerModel
from hediff.backend.limits import Limits
from hediff.backend.redis_sessions import RedisSessionStore
from hediff.backend.scheduler import FairScheduler
from hediff.backend.serve import TLSFiles, prepare_process
from hediff.backend.sessions import SessionError, new_session_id
from hediff.common import he, protocol

log = logging.getLogger("hediff.backend")

APP_NAME = "hediff"
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
_METRICS_KEPT = 10_000  # most recent entries of each metrics list in Redis
INGRESS_CPUS = 0.25


@dataclass(frozen=True)
class RayServeConfig:
    """Everything the three deployments need; plain values, so that it pickles and fits a `serve deploy` file."""

    model_path: str
    model_id: str
    tokens_path: str
    lora: tuple[str, ...] = ()  # DIR[:SCALE] entries folded into the UNet, as `hediff serve --lora`
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "hediff"
    limits: Limits = field(default_factory=Limits)
    ingress_replicas: int = 1
    session_replicas: int = 2
    session_workers: int = 4  # steps one session replica works on at once (they wait on the UNet tier)
    session_cpus: float = 0.5
    unet_replicas: int = 1
    unet_gpus: float = 0.0  # 1 per replica on a GPU cluster
    unet_cpus: float = 1.0
    torch_threads: int | None = None  # None: Ray's default for the replica's CPUs
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8  # 1 turns batching off
    batch_wait_s: float = 0.01
    step_attempts: int = 4  # the ingress's tries of one call when a session replica is lost

    def to_args(self) -> dict:
        """The config as `serve deploy` args (JSON-able)."""
        out = asdict(self)
        out["limits"] = asdict(self.limits)
        return out

    @classmethod
    def from_args(cls, args: dict) -> RayServeConfig:
        args = dict(args)
        args["limits"] = Limits(**args.get("limits", {}))
        args["lora"] = tuple(args.get("lora", ()))
        return cls(**args)


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def batch_sizes_key(prefix: str) -> str:
    return f"{prefix}:metrics:batch_sizes"


def step_metrics_key(prefix: str) -> str:
    return f"{prefix}:metrics:steps"  # "store_s tier_s" per step of the session tier


def _push_metric(pipe, key: str, value) -> None:
    pipe.rpush(key, value)
    pipe.ltrim(key, -_METRICS_KEPT, -1)


def served_by_key(prefix: str, session_id: str) -> str:
    return f"{prefix}:metrics:served:{session_id}"


async def _outcome(awaitable) -> tuple:
    """("ok", value) or ("error", status, code, detail, headers): errors cross the handle as data, never as Ray's
    wrapped exceptions, so the ingress answers exactly what the single-process server would."""
    try:
        with as_api_errors():
            return ("ok", await awaitable)
    except ApiError as e:
        return ("error", e.status, e.code, e.detail, e.headers)


class UNetUnavailable(SessionError):
    status = 503
    code = "unet_unavailable"
    retry_after_s = 1


@serve.deployment(name="UNetTier")
class UNetTier:
    def __init__(self, config: RayServeConfig):
        import torch

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.model = ServerModel(
            Path(config.model_path), config.model_id, device=config.device, dtype=config.dtype, lora=config.lora
        )
        self.redis = _redis(config.redis_url)
        self.sizes_key = batch_sizes_key(config.key_prefix)
        prepare_process()

    def reconfigure(self, user_config: dict) -> None:
        """Batching settings, changeable on a running deployment (Serve's user_config)."""
        self.run.set_max_batch_size(int(user_config.get("max_batch_size", 8)))
        self.run.set_batch_wait_timeout_s(float(user_config.get("batch_wait_s", 0.01)))

    def describe(self) -> dict:
        return {"device": self.model.device_name, "dtype": self.model.dtype_name}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run(self, calls: list[BodyCall]):
        # off the event loop, so that the next batch forms while this one runs
        out = await asyncio.to_thread(self.model.run_batch, calls)
        pipe = self.redis.pipeline()
        _push_metric(pipe, self.sizes_key, len(calls))
        try:
            await asyncio.to_thread(pipe.execute)
        except Exception as e:  # noqa: BLE001 - a metric never fails the sessions' steps
            log.warning("could not record a batch size: %s", type(e).__name__)
        return out


@serve.deployment(
    name="SessionTier",
    request_router_config=RequestRouterConfig(
        request_router_class=CONSISTENT_HASH_ROUTER,
        request_router_kwargs={"num_fallback_replicas": 0},
    ),
)
class SessionTier:
    async def __init__(self, config: RayServeConfig, unet):
        self.config = config
        self.unet = unet
        where = await unet.describe.remote()  # capabilities report where the UNet runs, not this CPU replica
        self.model = ModelFacts(
            Path(config.model_path), config.model_id, device=where["device"], dtype=where["dtype"], lora=config.lora
        )
        self.redis = _redis(config.redis_url)
        limits = config.limits
        self.store = RedisSessionStore(
            self.redis,
            self.model,
            limits.session_ttl_s,
            limits.max_sessions,
            limits.max_sessions_per_token,
            prefix=config.key_prefix,
        )
        self.engine = Engine(self.model, limits, self.store, body=self._body)
        self.scheduler = FairScheduler(config.session_workers, limits.max_steps_per_token, limits.max_queued_steps)
        self.replica = serve.get_replica_context().replica_id.unique_id
        prepare_process()
        for preset in he.PRESETS.values():  # SEAL's precomputation, once here rather than in a user's first step
            he.EvaluationContext(he.preset_parameter_bytes(preset), preset)

    def _body(self, call: BodyCall):
        # runs in a scheduler worker thread, never on the replica's event loop, so waiting here is allowed
        from ray.exceptions import GetTimeoutError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        try:
            return self.unet.run.remote(call).result(timeout_s=self.config.limits.session_ttl_s)
        except (
            RayActorError,
            ReplicaUnavailableError,
            DeploymentUnavailableError,
            BackPressureError,
            GetTimeoutError,
        ) as e:
            # nothing of the step was kept (the session is committed only after the update): the client retries it
            raise UNetUnavailable(f"the UNet tier could not take this step ({type(e).__name__}); retry it") from None

    async def capabilities(self) -> tuple:
        return ("ok", self.model.capabilities(self.config.limits))

    async def open_session(self, token_id: str, session_id: str, frame: protocol.Frame) -> tuple:
        return await _outcome(asyncio.to_thread(self.engine.open_session, token_id, frame, session_id))

    async def step(self, token_id: str, session_id: str, frame: protocol.Frame) -> tuple:
        return await _outcome(self.scheduler.run(token_id, self._step, token_id, session_id, frame))

    def _step(self, token_id: str, session_id: str, frame: protocol.Frame) -> bytes:
        t0 = time.perf_counter()
        session = self.store.get(session_id, token_id)
        t_loaded = time.perf_counter()
        data = self.engine.step(session, frame)
        t_done = time.perf_counter()
        # the store's share of a step: loading (or checking) the session and writing its new state
        store_s = (t_loaded - t0) + self.store.last_commit_s()
        self._record(session_id, store_s, t_done - t0)
        return data

    def _record(self, session_id: str, store_s: float, step_s: float) -> None:
        """Metrics for operators and tests; never a reason to fail a step that is already committed."""
        import redis

        prefix, ttl_ms = self.config.key_prefix, int(self.config.limits.session_ttl_s * 1000)
        pipe = self.redis.pipeline()
        pipe.hincrby(served_by_key(prefix, session_id), self.replica, 1)
        pipe.pexpire(served_by_key(prefix, session_id), ttl_ms)
        _push_metric(pipe, step_metrics_key(prefix), f"{store_s:.6f} {step_s:.6f}")
        try:
            pipe.execute()
        except redis.RedisError as e:
            log.warning("could not record step metrics: %s", type(e).__name__)

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()


class RayBackend:
    """What the ingress's routes call: the session tier through its handle, the store for cheap checks."""

    def __init__(self, sessions, store: RedisSessionStore, attempts: int):
        self.sessions = sessions
        self.store = store
        self.attempts = max(1, attempts)
        self._capabilities: dict | None = None

    async def capabilities(self) -> dict:
        if self._capabilities is None:
            self._capabilities = await self._call("capabilities", lambda _sid: ())
        return self._capabilities

    async def open_session(self, token_id: str, frame: protocol.Frame) -> dict:
        # a fresh id per try: a replica lost after writing the session leaves an orphan that expires, never a clash
        return await self._call("open_session", lambda sid: (token_id, sid, frame))

    async def step_limit(self, token_id: str, session_id: str) -> int:
        return await asyncio.to_thread(self.store.step_limit, session_id, token_id)

    async def step(self, token_id: str, session_id: str, frame: protocol.Frame) -> tuple[bytes, int]:
        return await self._call("step", lambda sid: (token_id, sid, frame), session_id)

    async def close_session(self, token_id: str, session_id: str) -> None:
        await asyncio.to_thread(self.store.close, session_id, token_id)

    def close_token(self, token_id: str) -> str:
        return f"closed {self.store.close_token(token_id)} session(s)"

    def shutdown(self) -> None:
        pass

    async def _call(self, method: str, args_for, session_id: str | None = None):
        """``method(*args_for(routing id))`` on the session tier, routed by ``session_id`` (a fresh id per try when
        there is none yet), tried again on another replica when the one it went to is lost."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        lost = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
        delay = 0.2
        for attempt in range(self.attempts):
            sid = session_id if session_id is not None else new_session_id()
            try:
                handle = self.sessions.options(method_name=method, session_id=sid)
                answer = await handle.remote(*args_for(sid))
            except lost as e:
                log.warning("session tier call %s lost its replica (%s); try %d", method, type(e).__name__, attempt + 1)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            if answer[0] == "ok":
                return answer[1]
            _, status, code, detail, headers = answer
            raise ApiError(status, code, detail, headers)
        raise ApiError(
            503,
            "replica_unavailable",
            "the server lost the replica holding this work and none took over in time; retry the request",
            {"Retry-After": "1"},
        )


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, config: RayServeConfig, sessions):
        self.config = config
        self.sessions = sessions

    def __serve_build_asgi_app__(self):
        config = self.config
        tokens = TokenStore.load(Path(config.tokens_path))
        store = RedisSessionStore(
            _redis(config.redis_url),
            None,  # the ingress never loads a session, it only checks and closes them
            config.limits.session_ttl_s,
            config.limits.max_sessions,
            config.limits.max_sessions_per_token,
            prefix=config.key_prefix,
        )
        return create_http_app(RayBackend(self.sessions, store, config.step_attempts), tokens, config.limits)


def build_app(config: RayServeConfig):
    """The Serve application: Ingress -> SessionTier -> UNetTier, sized and batched as ``config`` says.

    Batching reaches the UNet tier as Serve's user_config only, so that changing it updates running replicas in
    place instead of replacing them."""
    batching = {"max_batch_size": config.max_batch_size, "batch_wait_s": config.batch_wait_s}
    config = replace(config, max_batch_size=0, batch_wait_s=0.0)
    unet = UNetTier.options(
        num_replicas=config.unet_replicas,
        ray_actor_options={"num_cpus": config.unet_cpus, "num_gpus": config.unet_gpus},
        user_config=batching,
        max_ongoing_requests=max(16, 2 * batching["max_batch_size"]),
    ).bind(config)
    sessions = SessionTier.options(
        num_replicas=config.session_replicas,
        ray_actor_options={"num_cpus": config.session_cpus},
        max_ongoing_requests=max(32, 4 * config.session_workers),
    ).bind(config, unet)
    return Ingress.options(num_replicas=config.ingress_replicas, ray_actor_options={"num_cpus": INGRESS_CPUS}).bind(
        config, sessions
    )


def app_builder(args: dict):
    """`serve deploy` entry point: ``import_path: hediff.backend.ray_serve:app_builder`` with the config as args."""
    return build_app(RayServeConfig.from_args(args))


def batch_sizes(redis_url: str, prefix: str = "hediff") -> list[int]:
    """The UNet tier's recent batch sizes, oldest first."""
    return [int(n) for n in _redis(redis_url).lrange(batch_sizes_key(prefix), 0, -1)]


def step_store_times(redis_url: str, prefix: str = "hediff") -> list[tuple[float, float]]:
    """(seconds in the session store, seconds in the session tier) of recent steps."""
    raw = _redis(redis_url).lrange(step_metrics_key(prefix), 0, -1)
    return [tuple(float(x) for x in item.split()) for item in raw]


def clear_metrics(redis_url: str, prefix: str = "hediff") -> None:
    client = _redis(redis_url)
    keys = list(client.scan_iter(f"{prefix}:metrics:*"))
    if keys:
        client.delete(*keys)


def served_sessions(redis_url: str, prefix: str = "hediff") -> dict[str, dict[str, int]]:
    """Session id -> {session-tier replica id -> steps of that session it took}, for sessions of the last TTL."""
    client = _redis(redis_url)
    out = {}
    for key in client.scan_iter(served_by_key(prefix, "*")):
        raw = client.hgetall(key)
        out[key.decode().rsplit(":", 1)[1]] = {k.decode(): int(v) for k, v in raw.items()}
    return out


@dataclass
class RunningRayBackend:
    url: str
    started_cluster: bool  # this process started the Ray cluster, so stopping the backend stops the cluster

    def stop(self) -> None:
        import ray

        serve.shutdown()
        if self.started_cluster:
            ray.shutdown()
        he.remove_stale_scratch_files()  # what a killed replica left behind


def cpus_requested(config: RayServeConfig) -> float:
    """Logical CPUs the deployments reserve (Ray places a replica only where its CPUs are free)."""
    return (
        INGRESS_CPUS * config.ingress_replicas
        + config.session_cpus * config.session_replicas
        + config.unet_cpus * config.unet_replicas
    )


def start_ray_backend(
    config: RayServeConfig,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8470,
    tls: TLSFiles | None = None,
    num_cpus: int | None = None,
    timeout_s: float = 180.0,
) -> RunningRayBackend:
    """Deploy the backend on Ray Serve and return once it answers. ``address``: None starts a local cluster in
    this process, "auto" joins the running one, anything else is a cluster address (ray://host:10001)."""
    import ray

    started = address is None and not ray.is_initialized()
    if started and num_cpus is None:
        # replicas mostly wait on each other: a small box gets enough logical CPUs to place all of them
        num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_requested(config)))
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if started else None, include_dashboard=False, log_to_driver=False)
    http = {"host": host, "port": port}
    if tls is not None:
        http.update(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
    serve.start(http_options=http)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    scheme = "https" if tls is not None else "http"
    url = f"{scheme}://{host}:{port}"
    running = RunningRayBackend(url=url, started_cluster=started)
    try:
        wait_until_ready(url, timeout_s, ca_file=tls.cert if tls is not None else None)
    except BaseException:
        running.stop()
        raise
    return running


def serve_config_file(config: RayServeConfig, host: str, port: int, tls: TLSFiles | None = None) -> dict:
    """A `serve deploy` config for this backend (``hediff serve --ray-config FILE`` writes it as YAML)."""
    http = {"host": host, "port": port}
    if tls is not None:
        http.update(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
    return {
        "http_options": http,
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "hediff.backend.ray_serve:app_builder",
                "args": config.to_args(),
            }
        ],
    }


def wait_until_ready(url: str, timeout_s: float = 120.0, ca_file: Path | None = None) -> None:
    """Block until the ingress answers its health route."""
    import ssl

    import httpx

    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray Serve backend at {url} did not become ready in {timeout_s:.0f} s")
        time.sleep(0.25)
