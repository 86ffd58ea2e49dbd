"""Run shard tasks on Ray (extra ``[ray]``): one actor per worker, the model loaded once per actor.

Actors write the same parts, shards and done-markers as the inline executor (the run directory
must be on a path every node sees). A task whose actor dies (node lost, OOM) is retried on a
fresh actor; done tasks are never rerun because the driver skipped them before dispatch. A task
that raises follows the executors' one failure policy (see :mod:`icsd.executor`): nothing queued is
dispatched any more, tasks running on other actors finish, the actors are ended whatever happens,
and the error raised names the shard.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .executor import ShardTask, WorkerFactory

MAX_TASK_RETRIES = 3


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install 'icsd[ray]'") from None
    return ray


def connect(address: str | None, workers: int) -> Any:
    """Attach to a running cluster (``auto`` or ``ray://...``) or start a local one."""
    ray = _import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = max(workers, 1)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot connect to Ray at {address or 'a new local instance'}: {exc}") from None
    return ray


def _actor_class(ray: Any) -> Any:
    @ray.remote(max_restarts=0, max_task_retries=0)
    class ShardActor:
        def __init__(self, factory: WorkerFactory, index: int) -> None:
            self.worker = factory(index)
            self.node = socket.gethostname()

        def run(self, task: ShardTask) -> dict[str, Any]:
            result = self.worker(task, lambda n: None)
            return {**result, "_node": self.node, "_pid": os.getpid()}

    return ShardActor


def run_ray(
    todo: Sequence[ShardTask], factory: WorkerFactory, *, workers: int, address: str | None, bar: Any
) -> list[dict[str, Any]]:
    ray = connect(address, workers)
    resources = dict(getattr(factory, "ray_resources", None) or {"num_cpus": 1})
    if resources.get("num_gpus") and not ray.cluster_resources().get("GPU"):
        resources.pop("num_gpus")  # a cluster without GPUs: run on CPUs instead of waiting forever
    actor_cls = _actor_class(ray).options(**resources)
    n = max(1, min(workers, len(todo)))
    actors: dict[int, Any] = {}
    queue = list(todo)
    attempts: Counter[str] = Counter()
    in_flight: dict[Any, tuple[int, ShardTask]] = {}
    results: list[dict[str, Any]] = []
    failure: tuple[ShardTask, BaseException] | None = None

    def submit(slot: int) -> None:
        if queue:
            task = queue.pop(0)
            in_flight[actors[slot].run.remote(task)] = (slot, task)

    try:
        for slot in range(n):
            actors[slot] = actor_cls.remote(factory, slot)
            submit(slot)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            slot, task = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                attempts[task.key] += 1
                if failure is not None:
                    continue
                if attempts[task.key] > MAX_TASK_RETRIES:
                    lost = RuntimeError(f"failed {attempts[task.key]} times on lost workers")
                    lost.__cause__ = exc
                    failure = (task, lost)
                    queue.clear()
                    continue
                queue.insert(0, task)
                ray.kill(actors[slot])
                actors[slot] = actor_cls.remote(factory, slot)
                submit(slot)
                continue
            except Exception as exc:  # the worker raised: RayTaskError carries the original as .cause
                failure = failure or (task, getattr(exc, "cause", None) or exc)
                queue.clear()  # nothing queued starts; tasks in flight on other actors finish
                continue
            results.append(result)
            bar.update(task.size)
            submit(slot)
    finally:
        for actor in actors.values():
            ray.kill(actor)
    if failure is not None:
        from .executor import shard_failure

        task, error = failure
        raise shard_failure(task.key, error) from error
    nodes = Counter(r.get("_node", "?") for r in results)
    for node, count in sorted(nodes.items()):
        bar.write(f"  node {node}: {count} shard(s)")
    return results
