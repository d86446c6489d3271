"""Data parallel serving: several engine replicas (each on its own devices, each possibly tensor
parallel inside) behind one front door that balances requests.

    router = Router.build(model, params, EngineConfig(...), replicas=4, model_parallel=2)
    completions = router.generate(prompts, SamplingParams(max_tokens=64))

A request goes to the replica with the least outstanding work (prompt + max_tokens of its
unfinished requests), so long and short requests spread evenly. Replicas share nothing: each has
its own page pool and prefix cache. `step()` advances every replica that has work; JAX
dispatches asynchronously, so the replicas' devices run their steps concurrently while the host
schedules the next replica.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastattn.engine import Completion, Engine, EngineConfig
from fastattn.sampling import SamplingParams


class Router:
    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise ValueError("Router needs at least one engine")
        self.engines = list(engines)
        self._where: dict[int, tuple[int, int]] = {}  # global id -> (replica, engine's id)
        self._global: dict[tuple[int, int], int] = {}
        self._load = [0] * len(self.engines)  # outstanding tokens per replica
        self._cost: dict[int, int] = {}
        self._next_id = 0

    @classmethod
    def build(cls, model, params, config: EngineConfig = EngineConfig(), *, replicas: int,
              model_parallel: int = 1, devices=None, **engine_kwargs) -> Router:
        """`replicas` engines, each tensor parallel over `model_parallel` devices of its own
        (replica i takes devices [i * model_parallel, (i + 1) * model_parallel))."""
        import jax

        from fastattn.sharding import make_mesh

        devices = list(devices if devices is not None else jax.devices())
        if replicas < 1 or model_parallel < 1:
            raise ValueError(f"replicas={replicas} and model_parallel={model_parallel} must be "
                             ">= 1")
        if replicas * model_parallel > len(devices):
            raise ValueError(f"replicas={replicas} x model_parallel={model_parallel} needs "
                             f"{replicas * model_parallel} devices, only {len(devices)} exist")
        engines = []
        for i in range(replicas):
            mine = devices[i * model_parallel:(i + 1) * model_parallel]
            mesh = make_mesh(data=1, model=model_parallel, devices=mine)
            engines.append(Engine(model, params, config, mesh=mesh, **engine_kwargs))
        return cls(engines)

    def add_request(self, prompt, sampling: SamplingParams = SamplingParams()) -> int:
        (tokens, params), = self.engines[0]._prepare([prompt], sampling)
        return self._route(tokens, params)

    def _route(self, tokens: list[int], sampling: SamplingParams) -> int:
        """Queues a validated request on the least-loaded replica; returns its global id."""
        replica = min(range(len(self.engines)), key=lambda r: self._load[r])
        local = self.engines[replica]._enqueue(tokens, sampling)
        cost = len(tokens) + sampling.max_tokens * sampling.n
        gid = self._next_id
        self._next_id += 1
        self._where[gid] = (replica, local)
        self._global[(replica, local)] = gid
        self._cost[gid] = cost
        self._load[replica] += cost
        return gid

    def abort(self, request_id: int) -> None:
        if request_id in self._where:
            replica, local = self._where[request_id]
            self.engines[replica].abort(local)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def step(self) -> list[Completion]:
        """One step of every replica with work; the requests that finished, with global ids."""
        done = []
        for replica, engine in enumerate(self.engines):
            if not engine.has_unfinished():
                continue
            for c in engine.step():
                gid = self._global.pop((replica, c.request_id))
                del self._where[gid]
                self._load[replica] -= self._cost.pop(gid)
                c.request_id = gid
                done.append(c)
        return done

    def generate(self, prompts, sampling: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams()) -> list[Completion]:
        """Like `Engine.generate`, spread over the replicas; results in prompt order. Every
        request is validated (the replicas share model and config) before any is queued."""
        ids = [self._route(t, p) for t, p in self.engines[0]._prepare(prompts, sampling)]
        results: dict[int, Completion] = {}
        while len(results) < len(ids):
            for c in self.step():
                results[c.request_id] = c
        return [results[i] for i in ids]

    def metrics(self) -> list[dict]:
        return [e.metrics() for e in self.engines]
