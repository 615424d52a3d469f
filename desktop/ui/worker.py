"""The generation worker: a FIFO of jobs run one after another on a QThread, reporting through signals.

The window never calls the engine itself. It submits :class:`Job` s; this worker (moved to its own QThread) connects
through ``services.connect`` (one cached ``HEDiffusion`` per server, model and split), runs the generation with a
``threading.Event`` for cancellation, adds every finished image to the gallery *before* announcing it, and emits
signals that Qt delivers to the window's thread as queued events.

The public methods (``submit``, ``cancel_current``, ``remove_pending``, ``shutdown`` ...) are called from the GUI
thread; they only touch the lock-protected queue state and never block on a running generation, except
``shutdown``, which waits for the thread to end.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, QThread, Signal, Slot

log = logging.getLogger(__name__)

# Started workers, until shut down: a strong reference keeps a running QThread from being garbage-collected (Qt
# aborts the process when a running QThread is destroyed), and lets the process stop them all on exit.
_live_workers: set[GenerationWorker] = set()


def shutdown_all_workers(timeout_ms: int = 30_000) -> None:
    for worker in list(_live_workers):
        worker.shutdown(timeout_ms)


atexit.register(shutdown_all_workers)


@dataclass
class Job:
    params: object  # desktop.core.engine.GenerationParams
    server_id: str
    model: str
    id: int = 0
    cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is written for the user (shown as is); anything else is a bug, reported
    generically (its text could hold anything)."""
    from hediff.common.errors import HEDiffusionError

    return (HEDiffusionError,)


class GenerationWorker(QObject):
    jobStarted = Signal(int)
    stepUpdate = Signal(object)  # desktop.core.engine.StepUpdate
    jobSaved = Signal(int, str)  # job id, the gallery PNG of its image (before jobFinished)
    jobFinished = Signal(int, object)  # job id, GenerationResult (already in the gallery)
    jobFailed = Signal(int, str)  # job id, a message for the user
    jobCancelled = Signal(int)
    queueChanged = Signal()
    notice = Signal(str)  # something the user should know that is not a failure (e.g. the gallery could not save)

    def __init__(self, services):
        super().__init__()
        self._services = services
        self._lock = threading.Condition()
        self._pending: deque[Job] = deque()
        self._current: Job | None = None
        self._next_id = 1
        self._stopping = False
        self._invalidate = False
        self._connections: dict[tuple[str, str, str], object] = {}  # touched only on the worker thread
        self._thread: QThread | None = None

    # --- lifecycle (GUI thread) ---

    def start(self) -> QThread:
        """Move this worker to a new QThread and start processing jobs."""
        if self._thread is not None:
            return self._thread
        thread = QThread()
        thread.setObjectName("hediff-generation")
        self.moveToThread(thread)
        thread.started.connect(self._run)
        self._thread = thread
        _live_workers.add(self)
        thread.start()
        return thread

    @property
    def thread_running(self) -> bool:
        return self._thread is not None and self._thread.isRunning()

    def shutdown(self, timeout_ms: int = 120_000) -> bool:
        """Drop pending jobs, cancel the running one (it stops within one step), wait for the thread, close
        connections. Safe to call more than once. True when the thread has ended."""
        with self._lock:
            self._stopping = True
            dropped = bool(self._pending)
            self._pending.clear()
            if self._current is not None:
                self._current.cancel.set()
            self._lock.notify_all()
        if dropped:
            self.queueChanged.emit()
        thread = self._thread
        if thread is None:
            return True
        thread.quit()
        ended = bool(thread.wait(timeout_ms))
        if ended:
            _live_workers.discard(self)
        else:
            log.error("the generation thread did not stop within %d ms", timeout_ms)
        return ended

    # --- queue (GUI thread) ---

    def submit(self, params, server_id: str, model: str) -> int:
        """Queue a generation; returns its job id. Raises RuntimeError after shutdown."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the generation worker has shut down")
            job = Job(params=params, server_id=server_id, model=str(model), id=self._next_id)
            self._next_id += 1
            self._pending.append(job)
            self._lock.notify_all()
        self.queueChanged.emit()
        return job.id

    def cancel_current(self) -> int | None:
        """Ask the running job to stop (it ends as cancelled within one step). Returns its id, or None."""
        with self._lock:
            if self._current is None:
                return None
            self._current.cancel.set()
            return self._current.id

    def remove_pending(self, job_id: int) -> bool:
        with self._lock:
            for job in self._pending:
                if job.id == job_id:
                    self._pending.remove(job)
                    break
            else:
                return False
        self.queueChanged.emit()
        return True

    def move_pending(self, job_id: int, offset: int) -> bool:
        """Move a queued job ``offset`` places (negative: sooner); the queue's only reordering besides
        ``reorder_pending``. False when the job is not queued or cannot move that way."""
        with self._lock:
            ids = [j.id for j in self._pending]
            if job_id not in ids:
                return False
            i = ids.index(job_id)
            j = max(0, min(len(ids) - 1, i + offset))
            if i == j:
                return False
            ids.insert(j, ids.pop(i))
        return self.reorder_pending(ids)

    def reorder_pending(self, ids: list[int]) -> bool:
        """Put the queued jobs in this order (ids of jobs no longer queued are ignored, queued jobs missing from
        ``ids`` keep their place at the end)."""
        with self._lock:
            by_id = {j.id: j for j in self._pending}
            order = [by_id.pop(i) for i in ids if i in by_id]
            order += [j for j in self._pending if j.id in by_id]
            if [j.id for j in order] == [j.id for j in self._pending]:
                return False
            self._pending = deque(order)
        self.queueChanged.emit()
        return True

    def current_job(self) -> Job | None:
        with self._lock:
            return self._current

    def pending_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._pending)

    def is_busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._pending)

    def invalidate_connections(self) -> None:
        """Servers or tokens changed: reconnect before the next job (the running one keeps its connection)."""
        with self._lock:
            self._invalidate = True

    # --- the worker thread ---

    @Slot()
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._pending and not self._stopping:
                        self._lock.wait()
                    if self._stopping:
                        break
                    job = self._pending.popleft()
                    self._current = job
                    invalidate, self._invalidate = self._invalidate, False
                if invalidate:
                    self._close_connections()
                self.queueChanged.emit()
                self._process(job)
                with self._lock:
                    self._current = None
                self.queueChanged.emit()
        finally:
            self._close_connections()
            thread = QThread.currentThread()
            if thread is not None:
                thread.quit()

    def _process(self, job: Job) -> None:
        from hediff.desktop.core.engine import GenerationCancelled

        self.jobStarted.emit(job.id)
        server_name = job.server_id
        try:
            if job.cancel.is_set():
                raise GenerationCancelled("cancelled before it started")
            server = self._server(job.server_id)
            server_name = server.name
            hd = self._connection(server, job)
            if job.cancel.is_set():
                raise GenerationCancelled("cancelled before it started")
            key = None
            if job.params.encryption != "none":
                key = self._services.key_for_generation(job.params)
            result = _generate(hd, job.params, self.stepUpdate.emit, job.cancel, key)
        except GenerationCancelled:
            self.jobCancelled.emit(job.id)
            return
        except expected_errors() as e:
            self._forget_on_auth_error(e, job)
            self.jobFailed.emit(job.id, f"{server_name}: {e}")
            return
        except Exception as e:  # a bug or an environment problem; no message text (it could hold anything)
            log.error("generation job %d failed with %s", job.id, type(e).__name__)
            log.debug("generation failure details", exc_info=True)
            self.jobFailed.emit(job.id, f"{server_name}: unexpected error ({type(e).__name__}); see the log")
            return
        try:
            settings = self._services.settings
            entry = self._services.gallery.add(
                result,
                bool(getattr(settings, "embed_prompt_in_png", False)),
                remember_prompt=bool(getattr(settings, "remember_prompt", False)),
                model=job.model,
            )
            self.jobSaved.emit(job.id, str(entry.image_path))
        except Exception as e:  # noqa: BLE001 - the result stays on screen even if it could not be stored
            log.error("could not add job %d to the gallery: %s", job.id, type(e).__name__)
            self.notice.emit(f"The image of job #{job.id} could not be saved to the gallery: {e}")
        self.jobFinished.emit(job.id, result)

    def _server(self, server_id: str):
        for server in self._services.settings.servers:
            if server.id == server_id:
                return server
        raise ValueError(f"the server {server_id!r} is no longer configured; choose another one")

    def _connection(self, server, job: Job):
        key = (server.id, job.model, job.params.split)
        hd = self._connections.get(key)
        if hd is None:
            # one connection per server: a different model or split replaces it (a local backend holds a model)
            for old in [k for k in self._connections if k[0] == server.id]:
                _close_quietly(self._connections.pop(old))
            hd = self._services.connect(server, job.model, job.params.split)
            self._connections[key] = hd
        return hd

    def _forget_on_auth_error(self, error: BaseException, job: Job) -> None:
        """A refused token stays refused: drop that connection so a corrected token is picked up."""
        if getattr(error, "status", None) in (401, 403):
            for key in [k for k in self._connections if k[0] == job.server_id]:
                _close_quietly(self._connections.pop(key))

    def _close_connections(self) -> None:
        while self._connections:
            _, hd = self._connections.popitem()
            _close_quietly(hd)


def _close_quietly(hd) -> None:
    try:
        hd.close()
    except Exception as e:  # noqa: BLE001 - closing is best effort
        log.warning("closing a backend connection failed: %s", type(e).__name__)


def _generate(hd, params, on_step, cancel: threading.Event, key):
    """``hd.generate`` with a stored device key, or a fresh key per generation when ``key`` is None."""
    return hd.generate(params, on_step=on_step, cancel=cancel, key=key)
