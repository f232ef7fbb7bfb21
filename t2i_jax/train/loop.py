"""The one generic training loop: any `Method` on any registered data set.

train_and_evaluate(config, workdir) prepares the data and tokenizer, builds the mesh,
initialises (or restores) the state, runs jit-compiled train steps with the batch split
on `data`, and writes checkpoints, logs, sample grids and the report. A run killed at any
point continues from its latest checkpoint when started again with the same command.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from t2i_jax import config as config_lib
from t2i_jax import rng, sharding
from t2i_jax.checkpoint import Checkpointer
from t2i_jax.data import sources
from t2i_jax.errors import ConfigError, NonFiniteError, UserError, writing
from t2i_jax.grid import save_grid
from t2i_jax.methods import registry
from t2i_jax.methods.base import Frozen, Method, TrainState
from t2i_jax.runs import frozen_store
from t2i_jax.runs.loading import abstract_state, batch_spec, check_meta, run_meta
from t2i_jax.runs.sampling import make_sampler, sample_images
from t2i_jax.text import cache as text_cache
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext, TextSetup, params_digest
from t2i_jax.train import (
    input_pipeline,
    multihost,
    nonfinite,
    report,
    throughput,
    workdir_lock,
)
from t2i_jax.train.logging import MetricWriter, last_perf, read_metrics
from t2i_jax.train.validation import make_validator

log = logging.getLogger(__name__)


class _StopOnSignal:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag checked between steps.

    `agreed()` is the flag as every process sees it: a signal that reached one host stops
    all of them after the same step, so they save one consistent checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # Not the main thread: leave signals alone.
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def agreed(self) -> str | None:
        if multihost.any_process(self.requested is not None):
            return self.requested or "a signal to another process"
        return None

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Preempted(Exception):
    """Raised after the checkpoint on a stop signal is written; the CLI exits non-zero."""


def noise_stream(seed: int, rollbacks: int) -> jax.Array:
    """The training noise: the run's own stream, another one after each rollback (a
    non-finite streak on the same noise would likely repeat)."""
    return rng.stream_key(seed, "noise" if not rollbacks else f"noise/rollback-{rollbacks}")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    text = config_lib.to_json(config)
    if os.path.exists(path):
        with open(path) as f:
            old = config_lib.from_json(f.read())
        old_flat, new_flat = config_lib.flatten(old), config_lib.flatten(config)
        changed = sorted(
            k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k)
        )
        if changed:
            log.warning("config differs from the run's saved config in: %s", ", ".join(changed))
    tmp = path + ".tmp"
    with writing(path):
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def reads_cached_features(config, text: TextSetup) -> bool:
    """Whether a run's batches carry its frozen encoder's cached features (over data sets with
    one caption per image; with several, the step encodes the drawn caption)."""
    return text.frozen and config.text.get("cache_features", True)


def _text_feature_cache(config, builder, text: TextSetup, split: str = "train"):
    """The frozen encoder's features of `split`, built once per data set and encoder."""
    if not reads_cached_features(config, text):
        return None
    if sources.has_several_captions(builder):  # the caption is drawn per step
        print(
            f"note: {builder.name} has several captions per image: text features are "
            "computed in the step, not cached"
        )
        return None
    key = text_cache.cache_key(
        text.name,
        repr(text.encoder),
        text.weights_digest or params_digest(text.pretrained),
        text.tokenizer.digest(),
        f"max_len {text.max_len}",
        builder.info.full_name,
    )
    encode = jax.jit(lambda p, t, m: text.encoder.apply({"params": p}, t, m))
    params = jax.tree.map(jnp.asarray, text.pretrained)

    def encode_batch(tokens, mask):
        feats = encode(params, tokens, mask)
        return {"pooled": np.asarray(feats.pooled), "seq": feats.seq}

    return text_cache.open_or_build(
        os.path.join(builder.data_dir, "text_features"),
        split,
        key,
        captions=lambda: sources.split_captions(builder, split),
        tokenize=lambda captions: text.tokenizer.encode(captions, text.max_len),
        encode=encode_batch,
    )


PROMPTS = 8  # grid rows when the config names no prompts


@dataclasses.dataclass(frozen=True)
class TrainFunctions:
    """A method's init and train step, jit-compiled with the mesh's shardings, and the
    run's frozen weights placed on the mesh (every call's last argument)."""

    init_fn: Callable  # jit: (key, frozen) -> TrainState
    # jit: (state, batch, key, frozen) -> (state, metrics), state donated; under
    # `train.skip_nonfinite` the metrics include nonfinite.NONFINITE (train/nonfinite.py).
    step_fn: Callable
    abstract_state: TrainState  # ShapeDtypeStructs with shardings (restore target)
    batch_sharding: jax.sharding.NamedSharding
    frozen: Frozen

    def init(self, key: jax.Array) -> TrainState:
        return self.init_fn(key, self.frozen)

    def train_step(self, state: TrainState, batch: dict, key: jax.Array):
        return self.step_fn(state, batch, key, self.frozen)


def _place_frozen(frozen: Frozen, replicated) -> Frozen:
    """Frozen weights replicated on the mesh; abstract ones (`Method.frozen_shapes`, for a
    compile without weights) only get the sharding."""

    def place(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
        return jax.device_put(x, replicated)

    return jax.tree.map(place, frozen)


def step_function(method: Method, config: ml_collections.ConfigDict) -> Callable:
    """The train step the trainer compiles: the method's, under the non-finite guard when
    `train.skip_nonfinite` is on."""
    if config.train.get("skip_nonfinite", True):
        return nonfinite.guard(method.train_step)
    return method.train_step


def compile_functions(
    method: Method, config: ml_collections.ConfigDict, mesh, frozen: Frozen | None = None
) -> TrainFunctions:
    """eval_shape the state, then jit init with out_shardings and the step with donation
    of the state (never of the frozen weights, which every step reads)."""
    replicated = sharding.replicated(mesh)
    frozen = _place_frozen(frozen or {}, replicated)
    target = abstract_state(method, config, mesh, frozen)
    state_sharding = jax.tree.map(lambda s: s.sharding, target)
    batch_sharding = sharding.batch_sharding(mesh)
    spec = batch_spec(config)

    def init(key, frozen):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
        return nn.unbox(method.init(key, zeros, frozen))  # logical axes read by abstract_state

    init_fn = jax.jit(init, in_shardings=(replicated, replicated), out_shardings=state_sharding)
    step_fn = jax.jit(
        step_function(method, config),
        in_shardings=(state_sharding, batch_sharding, replicated, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    return TrainFunctions(
        init_fn=init_fn,
        step_fn=step_fn,
        abstract_state=target,
        batch_sharding=batch_sharding,
        frozen=frozen,
    )


def train_step_flops(
    method: Method, fns: TrainFunctions, config, text_features: dict | None = None
) -> float:
    """FLOPs of one train step, all devices (XLA's cost analysis of the lowered step:
    tracing is shared with the first call, nothing extra is compiled). The cost analysis
    counts a loop's body once, so a step accumulating K microbatches is counted as the
    one-batch step it equals (lowered, not compiled, once more). `text_features`: the
    per-example spec of the cached features the run's batches carry (the step then reads
    them instead of running the frozen encoder on the batch's tokens)."""
    spec = batch_spec(config, text_features)
    batch = sharding.abstract_with_sharding(spec, fns.batch_sharding)
    key = jax.random.key(0)
    step_fn = fns.step_fn
    if method.microbatches > 1:
        whole = copy.copy(method)
        whole.microbatches = 1
        step_fn = jax.jit(step_function(whole, config))
    return throughput.step_flops(step_fn.lower(fns.abstract_state, batch, key, fns.frozen))


def _throughput_meter(
    method: Method, fns: TrainFunctions, config, mesh, text_features: dict | None
) -> throughput.Throughput:
    """FLOPs of one step (of the batches the run reads) and the device's peak."""
    flops = train_step_flops(method, fns, config, text_features)
    peak, source = throughput.device_peak(mesh.devices.flat[0])
    log.info("train step: %.4g FLOPs; device peak %.4g FLOP/s (%s)", flops, peak, source)
    return throughput.Throughput(config.train.batch_size, flops, mesh.size, peak)


def _streak_reached(streak: nonfinite.Streak, unread: list[tuple], limit: int) -> bool:
    """Reads the skip flags of `unread` (step, metrics) in order; True once `limit` steps in
    a row were skipped (the steps after it are not read)."""
    for step, metrics in unread:
        if streak.record(step, metrics) and streak.in_a_row == 1:
            log.warning("step %d skipped: %s non-finite", step, ", ".join(streak.bad_metrics))
        if streak.in_a_row >= limit:
            return True
    return False


# (method, config, builder, tokenizer, frozen=) -> params -> {name: value}, or None (off):
# measures of the EMA parameters logged every train.eval_every steps, built by a higher
# layer (eval/training_probe.py) and handed in.
ProbeFactory = Callable[..., Callable[[object], dict] | None]


class _RunClock:
    """Wall-clock minutes of a run: since `started`, plus `offset_min` (before a resume),
    less the time spent inside `paused()`."""

    def __init__(self, started: float, *, offset_min: float, excluded_s: float = 0.0):
        self.started, self.offset_min, self.excluded = started, offset_min, excluded_s

    @contextlib.contextmanager
    def paused(self):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.excluded += time.monotonic() - t0

    def minutes(self) -> float:
        return self.offset_min + (time.monotonic() - self.started - self.excluded) / 60


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices=None,
    show_progress=True,
    probe: ProbeFactory | None = None,
) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    config_lib.validate(config)
    registry.check_names(config)
    primary = jax.process_index() == 0
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir is not a directory: {workdir}")
    mesh = sharding.make_mesh(devices, config)
    log.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())
    shards = sharding.batch_shards(mesh)
    if config.train.batch_size % shards:  # before anything is written
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by the mesh's "
            f"{shards} batch shards (mesh.data x mesh.fsdp)"
        )
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.hold(workdir, enabled=primary):  # one job writes a workdir
        return _train(config, workdir, mesh=mesh, show_progress=show_progress, probe=probe)


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh,
    show_progress,
    probe: ProbeFactory | None,
) -> dict:
    started = time.monotonic()
    primary = jax.process_index() == 0
    builder = sources.prepare_for_run(config.data)
    text = build_text(config, TextContext(workdir, builder, config.seed))
    method = registry.build_method(config, text)
    # Before config.json: a refused resume (other BERT weights, no VAE run) changes no file.
    frozen = frozen_store.load_or_create(workdir, method, write=True)
    tokenizer = text.tokenizer
    # Before config.json too: a refused probe setting changes no file.
    probe_setup = time.monotonic()
    probe_fn = probe and probe(method, config, builder, tokenizer, frozen=frozen)
    probe_setup = time.monotonic() - probe_setup
    if primary:
        _write_config(config, workdir)
    feature_cache = _text_feature_cache(config, builder, text)
    loader = input_pipeline.make_loader(
        builder.as_data_source("train"),
        tokenizer,
        global_batch_size=config.train.batch_size,
        max_len=config.text.max_len,
        seed=rng.stream_seed(config.seed, "data"),
        worker_count=config.data.workers,
        name=f"{config.data.name}/train",
        features=feature_cache,
        several_captions=sources.has_several_captions(builder),
        random_flip=config.data.get("random_flip", False),
    )
    data_iter = iter(loader)

    fns = compile_functions(method, config, mesh, frozen)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.train.keep_checkpoints,
        async_save=config.train.get("async_checkpoints", False),
    )
    writer = MetricWriter(workdir, enabled=primary)
    try:

        def resume(data_iter) -> tuple[TrainState, dict]:
            """(state, meta) of the newest readable checkpoint, `data_iter` moved to its
            position (unreadable newer ones moved aside, checkpoint.py), else of step 0;
            the log cut there."""
            restored = checkpointer.restore_newest(
                fns.abstract_state,
                data_iter,
                set_aside=True,
                check_meta=lambda meta, where: check_meta(meta, config, where),
            )
            if restored is None:
                writer.truncate_after(0)  # rows of a run killed before its first save
                return fns.init(rng.stream_key(config.seed, "params")), {}
            writer.truncate_after(restored.step)
            log.info("resumed from step %d", restored.step)
            return restored.state, restored.meta

        state, meta = resume(data_iter)
        # Minutes of this run so far: those logged before a resume, then this process's
        # (less the time spent probing, which a run without the probe would not spend).
        logged = read_metrics(workdir, perf=True) if primary else []
        clock = _RunClock(
            started, offset_min=last_perf(logged, "elapsed_min") or 0.0, excluded_s=probe_setup
        )
        guarded = config.train.get("skip_nonfinite", True)
        max_skips = config.train.get("max_consecutive_skips", 10)
        streak = nonfinite.Streak(total=meta.get("skipped_steps", 0))
        rollbacks = meta.get("rollbacks", 0)
        noise = noise_stream(config.seed, rollbacks)
        # No prompts in the config (imported data): the first validation captions.
        prompts = list(config.sample.prompts) or sources.first_captions(builder, PROMPTS)
        step = int(sharding.to_host(state.step))
        total = config.train.steps

        validate = make_validator(
            method,
            config,
            builder,
            tokenizer,
            batch_sharding=fns.batch_sharding,
            features=lambda: _text_feature_cache(config, builder, text, "validation"),
            frozen=fns.frozen,
        )
        eval_every = config.train.get("eval_every", 0)
        sampler = make_sampler(method)  # Compiled once, reused for every grid.
        curves = method.curves  # The metrics a method plots and shows.

        def sample_grid(at_step: int) -> str:
            images = sample_images(
                sampler,
                state.ema_params,
                fns.frozen,
                tokenizer,
                prompts,
                per_prompt=config.sample.per_prompt,
                rng=rng.stream_key(config.seed, "sample"),
                max_len=config.text.max_len,
            )
            path = os.path.join(workdir, "samples", f"step_{at_step}.png")
            if primary:
                save_grid(path, images, prompts)
            return path

        def counters() -> dict:
            """Saved with each checkpoint: what it is of (checked when read) and counters."""
            meta = run_meta(config)
            if guarded:
                meta.update(skipped_steps=streak.total, rollbacks=rollbacks)
            return meta

        last_metrics: dict = {}
        progress = tqdm(
            total=total,
            initial=step,
            disable=not (primary and show_progress),
            dynamic_ncols=True,
            desc="train",
        )
        meter = _throughput_meter(
            method, fns, config, mesh, feature_cache and feature_cache.example_spec()
        )
        pending = None  # (step, metrics) of a dispatched step whose skip flag is unread
        with _StopOnSignal() as stop:
            while step < total:
                batch = input_pipeline.to_global(next(data_iter), fns.batch_sharding)
                state, metrics = fns.train_step(state, batch, rng.step_key(noise, step))
                step += 1
                meter.step()
                progress.update(1)
                log_now = step % config.train.log_every == 0 or step == total
                if guarded:
                    # The previous step's flag (done by now: the loop runs one step ahead);
                    # this one's too when it is logged, since logging waits for it anyway.
                    unread = [pending] if pending is not None else []
                    pending = (step, metrics)
                    if log_now:
                        unread.append(pending)
                        pending = None
                    if _streak_reached(streak, unread, max_skips):
                        if rollbacks:
                            raise NonFiniteError(
                                f"training stopped at step {streak.last_bad_step}: "
                                f"{streak.describe()}, after its one rollback; the "
                                f"checkpoints in {checkpointer.directory} are as they were"
                            )
                        checkpointer.wait()
                        log.warning("%s: rolling back", streak.describe())
                        # As if restarted there (its counters too), on another noise stream.
                        data_iter = iter(loader)
                        state, meta = resume(data_iter)
                        step = int(sharding.to_host(state.step))
                        log.warning("rolled back to step %d on another noise stream", step)
                        streak = nonfinite.Streak(total=meta.get("skipped_steps", 0))
                        pending = None
                        rollbacks += 1
                        noise = noise_stream(config.seed, rollbacks)
                        progress.reset(total=total)
                        progress.update(step)
                        meter.measure()  # restarts its timing window
                        continue
                row, perf = {}, None
                if log_now:
                    host = sharding.to_host(metrics)
                    row = {k: float(v) for k, v in host.items() if k != nonfinite.NONFINITE}
                    if int(host.get(nonfinite.NONFINITE, 0)):  # a skipped step's NaNs
                        row = {k: v for k, v in row.items() if math.isfinite(v)}
                    if streak.total:
                        row["skipped_steps"] = float(streak.total)
                    perf = meter.measure()  # the host waited for the step just above
                if eval_every and (step % eval_every == 0 or step == total):
                    if validate is not None:
                        row.update(validate(state.ema_params))
                    if probe_fn is not None:
                        with clock.paused():
                            row.update(probe_fn(state.ema_params))
                if row:
                    perf = {**(perf or {}), "elapsed_min": clock.minutes()}
                    last_metrics = row
                    writer.write(step, row, perf=perf)
                    shown = {k: f"{row[k]:.4f}" for k in curves if k in row}
                    if perf and "images_per_sec" in perf:
                        shown["img/s"] = f"{perf['images_per_sec']:.1f}"
                        shown["mfu"] = f"{perf['mfu']:.1%}"
                    progress.set_postfix(**shown)
                stopped = stop.agreed()
                if step % config.train.checkpoint_every == 0 or step == total or stopped:
                    checkpointer.save(step, state, data_iter, counters())
                if step % config.train.sample_every == 0 and step != total:
                    sample_grid(step)
                if stopped and step < total:
                    progress.close()
                    raise Preempted(
                        f"stopped by {stopped} at step {step}; checkpoint "
                        "saved, run the same command to resume"
                    )
        progress.close()

        grid = sample_grid(step)
        if primary:
            path = report.write_report(
                workdir, config, final_step=step, grid_path=grid, prompts=prompts, curves=curves
            )
            log.info("report: %s", path)
        return last_metrics
    finally:  # also on errors: a save in flight completes
        checkpointer.close()
        writer.close()
