"""The merge actor(s): sum Fisher shards, solve the coefficient, update and persist the strategy.

With K > 1 actors each owns a slice of the adapted modules (module i -> actor i mod K). A global
coefficient is then solved in two phases: every actor returns its partial (num, den) sums, the
client adds them and divides, and every actor merges its modules with that one α. Elementwise
strategies (MagMax, TIES, DARE) and per-module α need no second phase.

State files: each actor writes ``stats/shard<k>-task<t>.safetensors`` atomically after merging task
t; the run's state.json (written afterwards by the trainer) names the files of the last committed
task, and :meth:`MergeShard.sync` reloads exactly those after a crash or a resume.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import ray

from pm_ray.core.coefficient import Alpha, add_partials
from pm_ray.core.fisher import FisherShard
from pm_ray.core.strategies import MergeStrategy, TaskUpdate, build_strategy
from pm_ray.core.tensors import TensorDict


def shard_keys(keys: list[str], num_shards: int) -> list[list[str]]:
    ordered = sorted(keys)
    return [ordered[k::num_shards] for k in range(num_shards)]


class MergeShard:
    """One slice of the merge state (plain class; wrapped with ray.remote below)."""

    def __init__(self, strategy: str, options: dict[str, Any], shard: int, num_shards: int, stats_dir: str) -> None:
        self.strategy_name, self.options = strategy, dict(options)
        self.shard, self.num_shards = shard, num_shards
        self.stats_dir = Path(stats_dir)
        self.strategy: MergeStrategy = self._build()
        self.fisher: dict[int, FisherShard] = {}  # by data-parallel rank, summed in rank order
        self.fisher_task = 0
        self.fisher_mean: TensorDict | None = None  # F_t of fisher_task, from all ranks' shards
        self._fisher_buffers: TensorDict = {}  # the last F_t's tensors, written over by the next

    def sync(self, completed: int, state_file: str | None) -> int:
        """Make the in-memory state that of the last committed task (idempotent)."""
        if self.strategy.num_tasks != completed:
            self.strategy = self._build()
            if completed:
                if state_file is None:
                    raise ValueError(
                        f"merge shard {self.shard}: {completed} tasks completed but no state file recorded"
                    )
                self.strategy.load(state_file)
        self.fisher, self.fisher_task, self.fisher_mean = {}, 0, None
        return self.strategy.num_tasks

    def _build(self) -> MergeStrategy:
        """The strategy, told it may update θ̂ in place: the shard hands out no result of its merge
        but α and the state file, and current() returns copies through Ray."""
        strategy = build_strategy(self.strategy_name, **self.options)
        strategy.in_place = True
        return strategy

    def add_fisher(self, task: int, sums: TensorDict, count: int, rank: int = 0) -> None:
        """Rank `rank`'s Fisher sums for `task`. They are added in rank order when the task is merged,
        not in arrival order: float addition of three or more shards depends on the order, and the
        arrival order varies from run to run."""
        if self.fisher_task != task:
            self.fisher, self.fisher_task = {}, task
        self.fisher[rank] = FisherShard(sums=sums, count=count)
        self.fisher_mean = None

    def _update(self, task: int, delta: TensorDict, extras: dict[str, Any] | None = None) -> TaskUpdate:
        fisher = None
        if self.strategy.needs_fisher:
            if not self.fisher or self.fisher_task != task:
                raise ValueError(f"merge shard {self.shard}: no Fisher received for task {task}")
            if self.fisher_mean is None:  # once a task: the two-phase solve asks for it twice
                self.fisher_mean = self._mean_fisher()
            fisher = self.fisher_mean
        return TaskUpdate(task=task, delta=delta, fisher=fisher, extras=extras or {})

    def _mean_fisher(self) -> TensorDict:
        """F_t from the ranks' shards in rank order, written into the last task's F tensors (nothing
        else holds them)."""
        self._fisher_buffers = FisherShard.mean_of(
            [self.fisher[r] for r in sorted(self.fisher)], out=self._fisher_buffers
        )
        return self._fisher_buffers

    def partials(self, task: int, delta: TensorDict) -> dict[str, tuple[float, float]]:
        return self.strategy.partials(self._update(task, delta))

    def merge(
        self, task: int, delta: TensorDict, alpha: Alpha | None, extras: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        result = self.strategy.merge(self._update(task, delta, extras), alpha=alpha)
        path = self.stats_dir / f"shard{self.shard}-task{task}.safetensors"
        self.strategy.save(path)
        return {"alpha": result.alpha, "state_file": str(path)}

    def current(self) -> tuple[TensorDict, TensorDict]:
        return self.strategy.merged, self.strategy.start

    def num_tasks(self) -> int:
        return self.strategy.num_tasks

    def node_id(self) -> str:
        """The Ray node this shard lives on (placement diagnostics; also a liveness ping)."""
        return ray.get_runtime_context().get_node_id()


RemoteMergeShard = ray.remote(num_cpus=0, max_restarts=0)(MergeShard)

ShardPlacement = Literal["default", "spread"]


def actor_name(run_name: str, shard: int, generation: int = 0) -> str:
    """A shard recreated after its actor died takes the next generation's name: the GCS keeps
    resolving the dead actor's name (to the dead actor) while the driver that created it lives."""
    return f"pm-ray-merge:{run_name}:{shard}" + (f":g{generation}" if generation else "")


def _create_shard(
    name: str,
    strategy: str,
    options: dict[str, Any],
    shard: int,
    num_shards: int,
    stats_dir: str,
    placement: ShardPlacement,
) -> Any:
    return RemoteMergeShard.options(
        name=name, get_if_exists=True, scheduling_strategy=_shard_scheduling(shard, placement)
    ).remote(strategy, options, shard, num_shards, stats_dir)


def _shard_scheduling(shard: int, placement: ShardPlacement) -> Any:
    """spread: shard k on the k-th node alive now (by node id, modulo the node count). Neither Ray's
    "SPREAD" nor a soft node affinity placed these actors, which need no resources (num_cpus=0),
    reliably: in the 2-node test each put both shards on one node. A hard affinity can only fail when
    that node dies, and then :func:`ensure_merge_actors` recreates the shard on a node still alive."""
    if placement == "default":
        return "DEFAULT"
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return NodeAffinitySchedulingStrategy(node_id=nodes[shard % len(nodes)], soft=False)


def create_merge_actors(
    run_name: str,
    strategy: str,
    options: dict[str, Any],
    num_shards: int,
    stats_dir: str,
    placement: ShardPlacement = "default",
) -> list[Any]:
    """Named actors for this run (get_if_exists: a second driver of the same run reuses them)."""
    return [
        _create_shard(actor_name(run_name, k), strategy, options, k, num_shards, stats_dir, placement)
        for k in range(num_shards)
    ]


def ensure_merge_actors(
    run_name: str,
    strategy: str,
    options: dict[str, Any],
    num_shards: int,
    stats_dir: str,
    placement: ShardPlacement = "default",
    timeout_s: float = 120.0,
) -> list[tuple[str, Any]]:
    """(name, handle) of a live actor for every shard, recreating the shards that died since the
    driver created them, e.g. with their node. They have max_restarts=0 (a restarted actor would come
    back empty and answer as if it held the state), so a worker group that Ray Train restarts calls
    this first; :meth:`MergeClient.sync` then reloads a recreated shard from the state files of the
    last committed task.

    Shard k's generations are tried in order: a live one is used, a dead one (RayActorError) passes
    to the next, a free name gets a new actor. A recreated shard is owned by the caller (the new
    rank-0 worker) and dies with it, or with its last handle (named or not, a non-detached actor is
    reference counted): the caller keeps the handles while it uses the shards. An actor on a node
    that died but is not yet declared dead does not answer: it is pinged again until it is."""
    deadline = time.monotonic() + timeout_s
    shards: list[tuple[str, Any]] = []
    for k in range(num_shards):
        generation = 0
        while True:
            name = actor_name(run_name, k, generation)
            try:
                handle = ray.get_actor(name)
            except ValueError:  # a free name
                handle = _create_shard(name, strategy, options, k, num_shards, stats_dir, placement)
            try:
                ray.get(handle.node_id.remote(), timeout=10)
                shards.append((name, handle))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"merge shard {name}: no live actor within {timeout_s:.0f} s ({err})") from err
                if isinstance(err, ray.exceptions.RayActorError):
                    generation += 1
    return shards


class MergeClient:
    """Used by the trainer workers: routes modules to shards and runs the two-phase solve."""

    def __init__(
        self,
        run_name: str,
        num_shards: int,
        strategy: str,
        options: dict[str, Any],
        names: list[str] | None = None,
        handles: list[Any] | None = None,
    ) -> None:
        """The shards' actors: ``handles``, else those named ``names`` (both from
        :func:`ensure_merge_actors`), else the driver's (:func:`create_merge_actors`)."""
        names = names or [actor_name(run_name, k) for k in range(num_shards)]
        self.handles = handles or [ray.get_actor(name) for name in names]
        self.num_shards = num_shards
        self.strategy = build_strategy(strategy, **options)  # what it is (flags), and its α solve

    def _split(self, tensors: TensorDict) -> list[TensorDict]:
        return [{key: tensors[key] for key in keys} for keys in shard_keys(list(tensors), self.num_shards)]

    def sync(self, completed: int, state_files: list[str]) -> None:
        files = state_files or [None] * self.num_shards
        if len(files) != self.num_shards:
            raise ValueError(f"state.json records {len(files)} merge shard files but merge.shards={self.num_shards}")
        ray.get([h.sync.remote(completed, f) for h, f in zip(self.handles, files)])

    def add_fisher(self, task: int, fisher: FisherShard, rank: int = 0) -> None:
        parts = self._split(fisher.sums)
        ray.get([h.add_fisher.remote(task, part, fisher.count, rank) for h, part in zip(self.handles, parts)])

    def alpha(self, task: int, delta: TensorDict) -> Alpha:
        """P&M's α_t for this task from all shards' partials (phase one), without merging."""
        partials = ray.get([h.partials.remote(task, part) for h, part in zip(self.handles, self._split(delta))])
        return self.strategy.solve_alpha(add_partials(*partials))

    def merge(self, task: int, delta: TensorDict, extras: dict[str, Any] | None = None) -> dict[str, Any]:
        """Phase two: every shard merges its modules with the one global α (or its own α's).

        ``extras`` entries that are per-module tensor dicts (e.g. TRM's merged delta) are split
        by shard like the delta; other entries go to every shard as they are.
        """
        parts = self._split(delta)
        alpha: Alpha | None = None
        if self.strategy.solves_line_alpha and self.strategy.global_alpha and not extras:
            alpha = self.alpha(task, delta)
        shard_extras: list[dict[str, Any]] = [{} for _ in parts]
        for name, value in (extras or {}).items():
            split = self._split(value) if isinstance(value, dict) else [value] * self.num_shards
            for k in range(self.num_shards):
                shard_extras[k][name] = split[k]
        results = ray.get(
            [h.merge.remote(task, part, alpha, ex) for h, part, ex in zip(self.handles, parts, shard_extras)]
        )
        if alpha is None and isinstance(results[0]["alpha"], dict):
            alpha = {key: value for r in results for key, value in r["alpha"].items()}
        elif alpha is None:
            alpha = results[0]["alpha"]
        return {"alpha": alpha, "state_files": [r["state_file"] for r in results]}

    def node_ids(self) -> list[str]:
        """The Ray node of each shard, by shard index."""
        return ray.get([h.node_id.remote() for h in self.handles])

    def current(self) -> tuple[TensorDict, TensorDict]:
        merged: TensorDict = {}
        start: TensorDict = {}
        for m, s in ray.get([h.current.remote() for h in self.handles]):
            merged.update(m)
            start.update(s)
        return merged, start
