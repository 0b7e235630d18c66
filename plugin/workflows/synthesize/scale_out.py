"""``synthesize --ray``: the same run rendered by a pool of Ray actors, one engine each.

The driver (the process that runs ``synthesize``) reads the slides, collects the donors,
backgrounds and reference tiles, and plans every tile exactly as a single-process run:
the donor order, each tile's background ranking and its seed. It cuts the plan into the
same engine calls (:func:`~histosynth.workflows.synthesize.tile_plan.plan_batches`) and
hands them to Ray Data: ``map_batches`` over an actor pool (``ActorPoolStrategy``), where
each actor loads the engine once and, per call, composes its tiles (placement, colour
match, and a generated background where a donor fits no real one) and renders them. The outcomes
come back to the driver in plan order; it alone writes the run folder, each tile
committed atomically as it arrives, so a run cut off anywhere is finished by
``--resume``, which plans only the missing tiles.

Same inputs, seed and device type → the same tiles (sha256) as a single-process run:
both run :func:`~histosynth.workflows.synthesize.tile_plan.compose_tile` and the same
batches. On the CPU "the same device" includes the thread count (kernels sum in an order
that depends on it): an actor runs ``cpus_per_worker`` threads.

Ray restarts an actor that dies (``max_restarts``) and re-runs its call
(``max_task_retries``); past those, the run stops with what is committed and
``--resume`` completes it. ``HISTOSYNTH_TEST_KILL_WORKER_AT=<tile>:<marker file>`` kills
the actor rendering that tile once (the marker records it), for the fault tests.

A shape run's vessel-mask ControlNet (``--controlnet``) is loaded by each actor from
the folder the driver resolved (and checked against the actor's engine again): on a
cluster of several machines that folder must be on a shared file system.

The planned calls and their outcomes travel through Ray as pickled bytes that this run
made itself; nothing a user hands over is unpickled.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histosynth.integration.errors import InputError
from histosynth.integration.tiles import Background, Donor, ReferenceTile, SlideSource

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.inpaint import CompositeResult
    from histosynth.workflows.synthesize.settings import SynthesisSettings
    from histosynth.workflows.synthesize.tile_plan import SkippedTile

log = logging.getLogger(__name__)

__all__ = ["RayOptions", "connect", "render_on_ray"]

#: Restarts of a dead actor, and re-runs of its call, before the run stops.
MAX_RESTARTS = 3
KILL_ENV = "HISTOSYNTH_TEST_KILL_WORKER_AT"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to render.

    ``address``: ``"auto"`` (the cluster this machine belongs to, ``ray start``),
    ``"local"`` (start a Ray instance on this machine for the run), or a cluster address
    (``host:6379``, ``ray://host:10001``); an already initialised Ray is used as it is.
    ``workers``: actors, each with its own engine; ``gpus_per_worker``: GPUs each actor
    holds (``None``: 1 when the cluster has GPUs, else 0); ``cpus_per_worker``: CPUs each
    actor holds.
    """

    address: str = "auto"
    workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int):
            raise InputError(f"--workers must be a whole number, not {self.workers!r}")
        if not 1 <= self.workers <= 4096:
            raise InputError(f"--workers must be in [1, 4096], not {self.workers}")
        for name, value in (
            ("--gpus-per-worker", self.gpus_per_worker),
            ("the CPUs per worker", self.cpus_per_worker),
        ):
            if value is not None and not (np.isfinite(value) and 0 <= value <= 64):
                raise InputError(f"{name} must be in [0, 64], not {value!r}")
        if not isinstance(self.address, str) or not self.address.strip():
            raise InputError("--ray needs 'auto', 'local' or a cluster address")


def connect(options: RayOptions) -> RayOptions:
    """Ray initialised for ``options.address`` (unless it already is); the options with
    ``gpus_per_worker`` resolved from the cluster's resources."""
    try:
        import ray
    except ImportError:
        raise InputError(
            "--ray needs Ray: pip install 'histosynth[ray]' (or 'ray[data]')"
        ) from None
    if not ray.is_initialized():
        try:
            if options.address == "local":
                # "local": always a new instance, never a cluster of `ray start`
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=options.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"no Ray cluster at {options.address!r} ({first}); start one with "
                "'ray start --head', or use --ray local for this machine",
                item="--ray",
            ) from None
    gpus = float(ray.cluster_resources().get("GPU", 0))
    wanted = options.gpus_per_worker
    if wanted is None:
        wanted = 1.0 if gpus >= 1 else 0.0
    if wanted * options.workers > gpus:
        raise InputError(
            f"{options.workers} worker(s) × {wanted:g} GPU need {wanted * options.workers:g} "
            f"GPUs; the Ray cluster has {gpus:g}",
            item="--gpus-per-worker",
        )
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if options.cpus_per_worker * options.workers > cpus:
        raise InputError(
            f"{options.workers} worker(s) need {options.cpus_per_worker * options.workers:g} "
            f"CPUs; the Ray cluster has {cpus:g}",
            item="--workers",
        )
    return replace(options, gpus_per_worker=wanted)


# --------------------------------------------------------------------------- what travels


@dataclass
class Outcome:
    """What an actor sends back for one planned tile: its pixels and composite, or why
    it cannot be made."""

    index: int
    image: np.ndarray | None = None
    composite: CompositeResult | None = None  # inpaint
    background: int | None = None  # index into the backgrounds; None: generated
    generated_background: np.ndarray | None = None
    skip: SkippedTile | None = None


@dataclass
class PlannedCall:
    """One engine call of the plan: its tiles, their donors and (inpaint) the
    backgrounds each tries, in turn."""

    indices: list[int]
    donors: list[int]
    orders: list[list[int]]
    #: shape mode: each tile's target outline (a drawn one with its tile, read here)
    targets: list[Any] = field(default_factory=list)


@dataclass
class RenderedCall:
    """What an actor returns for one :class:`PlannedCall`. Both travel pickled, as bytes:
    a binary column Arrow stores as it is (a Python object column makes Ray Data warn and
    fall back to its own pickling)."""

    outcomes: list[Outcome]


def _detached(items: Sequence[Any]) -> list[Any]:
    """Donors / backgrounds without their slide readers (open files stay on the driver)."""
    sources: dict[int, SlideSource] = {}
    out = []
    for item in items:
        source = item.source
        if id(source) not in sources:
            sources[id(source)] = replace(source, reader=None)
        out.append(replace(item, source=sources[id(source)]))
    return out


def _detached_target(target: Any) -> Any:
    """A shape target whose background (a drawn one's tile) has no slide reader."""
    if target.background is None:
        return target
    (background,) = _detached([target.background])
    return replace(target, background=background)


class TileRenderer:
    """A Ray actor: one engine, loaded in ``__init__``; ``__call__`` makes one planned
    engine call (a batch of one row, the call's tiles)."""

    def __init__(
        self, engine_spec: dict[str, Any], run: SynthesisSettings, shared: Any, threads: int = 1
    ) -> None:
        import ray
        import torch

        # CPU kernels sum in an order that depends on the thread count: the actor uses
        # as many threads as it holds CPUs, and equals a single-process run that does
        torch.set_num_threads(threads)

        from histosynth.synthesis.engine import load_engine
        from histosynth.workflows.synthesize.tile_plan import load_adapter_for

        if isinstance(shared, ray.ObjectRef):
            shared = ray.get(shared)
        self.donors, self.backgrounds, self.references = shared
        spec = dict(engine_spec)
        adapter = spec.pop("adapter", None)
        controlnet = spec.pop("controlnet", None)
        self.engine = load_engine(**spec)
        if adapter:
            load_adapter_for(self.engine, adapter)
        self.controlnet = None
        if controlnet:  # the driver's ControlNet, from its folder (checked again here)
            from histosynth.synthesis.controlnet_library import load_controlnet

            self.controlnet, _ = load_controlnet(controlnet, self.engine.transformer)
        self.run = run
        if run.places_donors and not run.whole_tile:
            self.pipeline = self.engine.inpaint_pipeline()
        else:
            self.pipeline = self.engine.variation_pipeline()
        self.pipeline.set_progress_bar_config(disable=True)
        self.kill_at = _kill_request()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rendered = [
            pickle.dumps(RenderedCall(self.render(pickle.loads(call))), protocol=5)
            for call in batch["call"]
        ]
        return {"rendered": _object_array(rendered)}

    def render(self, call: PlannedCall) -> list[Outcome]:
        from histosynth.workflows.synthesize.tile_plan import (
            SkippedTile,
            compose_tile,
            render_inpaint,
            render_shape,
            render_variation,
        )

        indices = call.indices
        if self.kill_at is not None and self.kill_at[0] in indices:
            marker = Path(self.kill_at[1])
            if not marker.exists():
                marker.write_text(f"killed the worker rendering tile {self.kill_at[0]}\n")
                os._exit(1)
        run = self.run
        if run.mode == "variation":
            refs = [self.references[d] for d in call.donors]
            images = render_variation(self.pipeline, refs, indices, run)
            return [Outcome(i, image=image) for i, image in zip(indices, images, strict=True)]
        position = {id(b): k for k, b in enumerate(self.backgrounds)}
        if run.mode == "shape":
            from histosynth.workflows.synthesize.shape_plan import compose_shape_tile

            planned = [
                compose_shape_tile(i, self.donors[d], target, self.backgrounds, order, run)
                for i, d, order, target in zip(
                    indices, call.donors, call.orders, call.targets, strict=True
                )
            ]
        else:
            planned = [
                compose_tile(i, self.donors[d], self.backgrounds, order, run, self.engine)
                for i, d, order in zip(indices, call.donors, call.orders, strict=True)
            ]
        made = [p for p in planned if not isinstance(p, SkippedTile)]
        if not made:
            images = iter([])
        elif run.mode == "shape":
            images = iter(render_shape(self.pipeline, made, run, self.controlnet))
        else:
            images = iter(render_inpaint(self.pipeline, made, run))
        out = []
        for p in planned:
            if isinstance(p, SkippedTile):
                out.append(Outcome(p.index, skip=p))
                continue
            real = id(p.background) in position
            out.append(
                Outcome(
                    p.index,
                    image=next(images),
                    composite=p.composite,
                    background=position[id(p.background)] if real else None,
                    generated_background=None if real else p.background.image,
                )
            )
        return out


def _object_array(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _kill_request() -> tuple[int, str] | None:
    value = os.environ.get(KILL_ENV, "")
    if not value:
        return None
    index, _, marker = value.partition(":")
    return int(index), marker


# --------------------------------------------------------------------------- the driver


def render_on_ray(
    options: RayOptions,
    engine_spec: dict[str, Any],
    run: SynthesisSettings,
    calls: Iterable[list[int]],
    donor_of: Callable[[int], int],
    orders: Callable[[int], list[int]],
    donors: Sequence[Donor],
    backgrounds: Sequence[Background],
    references: dict[int, ReferenceTile],
    targets: Callable[[int], Any] | None = None,
) -> Iterator[Outcome]:
    """Render the planned engine calls on Ray and yield each tile's :class:`Outcome` in
    plan order. ``donor_of(i)``: tile i's donor; ``orders(i)``: the backgrounds it
    tries, in turn (inpaint, shape); ``targets(i)``: its target outline (shape; a drawn
    one's tile is read here, where the slides are open)."""
    import ray
    import ray.data

    rows = [
        {
            "call": pickle.dumps(
                PlannedCall(
                    list(call),
                    [donor_of(i) for i in call],
                    [orders(i) for i in call] if run.places_donors else [],
                    [_detached_target(targets(i)) for i in call] if targets else [],
                ),
                protocol=5,
            )
        }
        for call in calls
    ]
    if not rows:
        return
    shared = ray.put((_detached(donors), _detached(backgrounds), references))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the command's own bar counts the tiles
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)
    kill = os.environ.get(KILL_ENV, "")
    with warnings.catch_warnings():
        # max_restarts / max_task_retries still go through ray_remote_args (deprecated
        # in 2.60, kept until 2.64: pyproject caps Ray below it); Ray Data's own default
        # restarts a crashing actor forever
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            TileRenderer,
            batch_size=1,  # one row = one planned engine call
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            fn_constructor_kwargs={
                "engine_spec": engine_spec,
                "run": run,
                "shared": shared,
                "threads": max(1, int(options.cpus_per_worker)),
            },
            num_gpus=options.gpus_per_worker or None,
            num_cpus=options.cpus_per_worker,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS,
            **({"runtime_env": {"env_vars": {KILL_ENV: kill}}} if kill else {}),
        )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for data in batch["rendered"]:
            rendered = pickle.loads(data)
            yield from rendered.outcomes
