"""The method contract: how a generative family plugs into the one generic trainer.

A family is a subclass of `Method` in one module plus one line in `methods/registry.py`.
The trainer owns the loop, the mesh, data, checkpoints and logs; the method owns its
networks, optimizers and objective. Everything the trainer compiles is a pure function of
its arguments, so it can be jit-compiled with shardings and the state donated.

Every hook a family may offer is declared here, with its default. The trainer, the CLI,
`t2i eval`, `t2i reconstruct` and `t2i ablate` read these declarations and never branch on
a family's name. A subclass that defines a public method whose name is close to a hook's
but not equal (`validation_stat`, `reconstruction`) is refused when the class is created:
a misspelt hook would otherwise switch a feature off in silence.

Frozen weights (a pretrained text encoder, latent diffusion's autoencoder, a perceptual
loss's network) are not part of the `TrainState`: `load_frozen` returns them once, the run
stores them once, and the trainer passes them to `init`, `train_step`, `sample`,
`reconstruct` and `validation_stats` as their own pytree, never EMA-averaged.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from t2i_jax import precision
from t2i_jax import remat as rematerialise
from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods import microbatches as mb
from t2i_jax.methods.text_conditioning import TextConditioner
from t2i_jax.text.setup import TextSetup

PyTree = Any
Frozen = dict[str, PyTree]  # frozen network name -> its params


@flax.struct.dataclass
class TrainState:
    """All a run needs to continue, as one pytree of arrays.

    `params`, `ema_params` and `opt_state` are dicts keyed by player ("model" for one
    network; "generator" and "discriminator" for a GAN), so a family with several players
    and optimizers uses the same state, loop and checkpoints. `ema_params` holds the
    players that sample; frozen weights are never here.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree

    @classmethod
    def create(
        cls,
        params: dict[str, PyTree],
        optimizers: dict[str, optax.GradientTransformation],
        ema: Sequence[str] | None = None,
        param_dtype: Any = jnp.float32,
    ) -> TrainState:
        """Step 0: params in `param_dtype`; every player's optimizer state and the EMA
        copies of `ema` (default: all) in float32 (t2i_jax/precision.py)."""
        ema = list(params) if ema is None else ema
        full = precision.cast(params, jnp.float32)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=precision.cast(params, param_dtype),
            ema_params={name: full[name] for name in ema},
            opt_state={name: optimizers[name].init(full[name]) for name in params},
        )


def shapes_of(tree: PyTree) -> PyTree:
    """jax.ShapeDtypeStruct of every array leaf."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def ema_update(ema: PyTree, params: PyTree, step: jax.Array, decay: float) -> PyTree:
    """EMA with the usual warm-up, (1 + step) / (10 + step), so short runs track too."""
    rate = jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, ema, 1.0 - rate)


@dataclasses.dataclass(frozen=True)
class Update:
    """The result of one player's gradient step."""

    params: PyTree
    opt_state: PyTree
    loss: jax.Array
    aux: Any
    grad_norm: jax.Array


def gradient_update(
    loss_fn: Callable[..., tuple[jax.Array, Any]],
    params: PyTree,
    opt_state: PyTree,
    optimizer: optax.GradientTransformation,
    examples: PyTree,
    *args,
    microbatches: int = 1,
) -> Update:
    """The train-step skeleton every player shares: the gradient of
    `loss_fn(params, examples, rows, *args) -> (mean loss, aux)`, the optimizer's update
    (clipping, weight decay and frozen-group masks are part of the optimizer), applied.

    `examples` is the pytree of per-example arrays (leading axis: the batch) the loss reads;
    with `microbatches` = K > 1 it is split into K microbatches whose gradients are averaged
    in a `lax.scan` (methods/microbatches.py), `rows` telling the loss which rows it has.
    The optimizer runs in float32 whatever the params' dtype (precision.py).
    """
    if microbatches == 1:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, examples, mb.WHOLE, *args
        )
        grads = precision.cast(grads, jnp.float32)
    else:

        def accumulate(total, inputs):
            index, microbatch = inputs
            rows = mb.Rows(index, microbatches)
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, microbatch, rows, *args
            )
            total = jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads)
            return total, (loss, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        inputs = (jnp.arange(microbatches), mb.split(examples, microbatches))
        total, (losses, auxes) = jax.lax.scan(accumulate, zeros, inputs)
        grads = jax.tree.map(lambda t: t / microbatches, total)
        loss, aux = jnp.mean(losses), mb.merge(auxes)
    full = precision.cast(params, jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, full)
    new_params = optax.apply_updates(full, updates)
    return Update(
        params=jax.tree.map(lambda new, old: new.astype(old.dtype), new_params, params),
        opt_state=opt_state,
        loss=loss,
        aux=aux,
        grad_norm=optax.tree.norm(grads),
    )


def next_state(
    state: TrainState, params: dict[str, PyTree], opt_state: dict[str, PyTree], ema_decay: float
) -> TrainState:
    """The state after one step: new params and optimizer states, the EMA of the players
    `state.ema_params` holds, the step counter advanced."""
    players = precision.cast({name: params[name] for name in state.ema_params}, jnp.float32)
    return state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_update(state.ema_params, players, state.step, ema_decay),
        opt_state=opt_state,
    )


@dataclasses.dataclass(frozen=True)
class SampleOption:
    """One keyword of a family's `sample`, declared for the CLI (`--name-with-dashes`), the
    Python API and `t2i eval`'s record of what it sampled with.

    Attributes:
      name: the keyword of `sample`.
      type: float, int or str (the CLI parses with it).
      help: one line for `t2i sample --help`.
      config_key: the dotted config key giving the run's default ("diffusion.guidance").
      choices: the allowed values, if a closed set.
      absent: the default for a run whose config predates `config_key` (None: required).
    """

    name: str
    type: type
    help: str
    config_key: str
    choices: tuple | None = None
    absent: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default(self, config: ml_collections.ConfigDict) -> Any:
        node: Any = config
        for part in self.config_key.split("."):
            if self.absent is not None and part not in node:
                return self.absent
            node = node[part]
        return node


# Hooks with a default that a family may replace; misspellings of these are refused.
OPTIONAL_HOOKS = (
    "check_config",
    "load_frozen",
    "frozen_shapes",
    "reconstruct",
    "validation_stats",
)
REQUIRED_HOOKS = ("init", "train_step", "sample")
DECLARATIONS = ("curves", "sample_options", "validation_metrics")


class Method:
    """A generative family. `batch` follows the batch contract (docs/architecture.md):
    {"image": float32[B, H, W, 3] in [-1, 1], "tokens": int32[B, L], "mask": bool[B, L]}.

    Subclasses implement `init`, `train_step` and `sample`, set the class attributes they
    need, and override any optional hook below. `__init__(config, text)` gets the run's
    config and its `TextSetup` (text/setup.py); a subclass calls it first.
    """

    # The logged metrics the progress bar shows, the report plots and `t2i ablate` tables.
    curves: ClassVar[tuple[str, ...]] = ("loss",)
    # The keywords `sample` takes besides (params, captions, rng, frozen).
    sample_options: ClassVar[tuple[SampleOption, ...]] = ()

    def __init__(self, config: ml_collections.ConfigDict, text: TextSetup):
        check_execution(config)
        self.config = config
        self.compute_dtype = dtype_setting(config, "compute_dtype")
        self.param_dtype = dtype_setting(config, "param_dtype")
        self.remat = train_setting(config, "remat")
        self.microbatches = train_setting(config, "grad_accum_steps")
        text = dataclasses.replace(text, encoder=self.network(text.encoder))
        self.text_setup = text
        self.conditioner = TextConditioner(text)

    def network(self, module: nn.Module) -> nn.Module:
        """A trained network as the run computes it: in `train.compute_dtype`, under
        `train.remat` (remat.configure). Every family builds its networks through this."""
        return rematerialise.configure(module, dtype=self.compute_dtype, remat=self.remat)

    def update(
        self,
        loss_fn: Callable[..., tuple[jax.Array, Any]],
        params: PyTree,
        opt_state: PyTree,
        optimizer: optax.GradientTransformation,
        examples: PyTree,
        *args,
    ) -> Update:
        """`gradient_update` with the run's `train.grad_accum_steps` microbatches."""
        return gradient_update(
            loss_fn, params, opt_state, optimizer, examples, *args, microbatches=self.microbatches
        )

    def new_state(
        self,
        params: dict[str, PyTree],
        optimizers: dict[str, optax.GradientTransformation],
        ema: Sequence[str] | None = None,
    ) -> TrainState:
        """`TrainState.create` with the run's `train.param_dtype`."""
        return TrainState.create(params, optimizers, ema, param_dtype=self.param_dtype)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_contract(cls)

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """One-line ConfigErrors for the family's own section, before a run writes anything.
        Reads files only to check they exist and fit (e.g. another run it builds on)."""

    def load_frozen(self) -> Frozen:
        """The frozen networks' params as host arrays ({} for none), read once when a run
        starts; the run stores them and later reads its own copy (`runs/frozen_store.py`).
        The default: a frozen text encoder's."""
        return self.conditioner.load_frozen()

    def frozen_shapes(self) -> Frozen:
        """`load_frozen()`'s shapes and dtypes (jax.ShapeDtypeStruct), for compiling a train
        step without weights (train/preflight.py). The default loads them; a family whose
        frozen weights come from another run derives them from that run's config instead."""
        return shapes_of(self.load_frozen())

    # -- the three required hooks ------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict, frozen: Frozen | None = None) -> TrainState:
        """Every trained network's params and optimizer state (batch gives shapes only)."""
        raise NotImplementedError

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update (of every player); returns the new state and scalar metrics."""
        raise NotImplementedError

    def sample(
        self,
        params: PyTree,
        captions: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        **options,
    ) -> jax.Array:
        """Images float32[B, H, W, 3] in [-1, 1] for captions = {"tokens", "mask"}, from the
        EMA params; `options` are the declared `sample_options` (None: the config's)."""
        raise NotImplementedError

    # -- optional hooks ----------------------------------------------------------------------
    def reconstruct(self, params: PyTree, batch: dict, frozen: Frozen | None = None) -> jax.Array:
        """Images in [-1, 1] rebuilt from `batch["image"]` (autoencoders; `t2i reconstruct`)."""
        raise NotImplementedError

    def validation_stats(
        self, params: PyTree, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ) -> dict[str, jax.Array]:
        """Sums over one validation batch (jit-compiled), added across batches and turned
        into numbers by `validation_metrics`. Run every `train.eval_every` steps."""
        raise NotImplementedError

    def validation_metrics(self, totals: dict) -> dict[str, float]:
        """The validation numbers (logged as val_<name>) from the summed stats."""
        raise NotImplementedError

    # -- what the trainer and the commands ask -----------------------------------------------
    @classmethod
    def offers(cls, hook: str) -> bool:
        """Whether the family replaces the optional hook's default."""
        if hook not in OPTIONAL_HOOKS:
            raise ValueError(f"{hook!r} is not an optional hook; choose {OPTIONAL_HOOKS}")
        return getattr(cls, hook) is not getattr(Method, hook)

    @classmethod
    def sample_defaults(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """Each sample option's value from the run's config."""
        return {o.name: o.default(config) for o in cls.sample_options}

    @classmethod
    def recorded_options(cls, recorded: dict[str, Any]) -> dict[str, Any]:
        """Sample options as an older record gives them: an option declared since (one
        with an `absent` value) takes what the record's sampling did without it."""
        added = {o.name: o.absent for o in cls.sample_options if o.absent is not None}
        return {**{k: v for k, v in added.items() if k not in recorded}, **recorded}

    @classmethod
    def options_in_effect(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options that change what `sample` draws with these values (a family drops
        those its chosen sampler ignores): two records sampled alike when these match."""
        return dict(options)

    @classmethod
    def check_sample_options(cls, options: dict[str, Any]) -> None:
        """One-line errors for an option the family does not take or a value off its
        choices."""
        declared = {o.name: o for o in cls.sample_options}
        for name, value in options.items():
            if name not in declared:
                raise UserError(
                    f"sample option '{name}' does not apply to {cls.__name__}; its options: "
                    f"{sorted(declared) or 'none'}"
                )
            choices = declared[name].choices
            if choices is not None and value not in choices:
                raise UserError(f"sample option {name}={value!r}: choose from {choices}")


def _positional(fn) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def check_contract(cls: type) -> None:
    """TypeError for a family class that breaks the contract: a misspelt hook, a hook
    whose signature drops the trainer's arguments, validation stats without metrics, or a
    sample option the `sample` signature does not take."""
    hooks = (*REQUIRED_HOOKS, *OPTIONAL_HOOKS, *DECLARATIONS)
    for name, value in vars(cls).items():
        if name.startswith("_") or name in hooks or not callable(value):
            continue
        close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.85)
        if close:
            raise TypeError(
                f"{cls.__name__}.{name} looks like the hook '{close[0]}' misspelt; rename it "
                "(or give a helper a name unlike any hook's)"
            )
    # The hooks the trainer calls with positional arguments (check_config, load_frozen and
    # frozen_shapes take none beyond the class or instance).
    for name in (*REQUIRED_HOOKS, "reconstruct", "validation_stats"):
        mine = getattr(cls, name)
        if mine is getattr(Method, name):
            continue
        wanted = _positional(getattr(Method, name))  # **options of sample are the family's
        if _positional(mine)[: len(wanted)] != wanted:
            raise TypeError(
                f"{cls.__name__}.{name}{inspect.signature(mine)} must take "
                f"{', '.join(wanted)} in this order"
            )
    if (cls.validation_stats is Method.validation_stats) != (
        cls.validation_metrics is Method.validation_metrics
    ):
        raise TypeError(f"{cls.__name__}: validation_stats and validation_metrics go together")
    takes = inspect.signature(cls.sample).parameters
    for option in cls.sample_options:
        if option.name not in takes:
            raise TypeError(
                f"{cls.__name__}.sample_options declares '{option.name}', which "
                f"{cls.__name__}.sample does not take"
            )


# The `train` keys every family reads here, and their values in runs made before them.
EXECUTION_DEFAULTS = {
    "compute_dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",
    "grad_accum_steps": 1,
}


def train_setting(config: ml_collections.ConfigDict, key: str) -> Any:
    return config.train.get(key, EXECUTION_DEFAULTS[key])


def dtype_setting(config: ml_collections.ConfigDict, key: str) -> Any:
    """The jnp dtype named by `train.<key>` (a ConfigError for an unknown name)."""
    return precision.dtype_named(train_setting(config, key), f"train.{key}")


def check_execution(config: ml_collections.ConfigDict) -> None:
    """One-line ConfigErrors for the dtypes, remat mode and microbatch count."""
    dtype_setting(config, "compute_dtype")
    dtype_setting(config, "param_dtype")
    mode = train_setting(config, "remat")
    if mode not in rematerialise.REMAT:
        raise ConfigError(f"train.remat={mode!r}: choose {', '.join(rematerialise.REMAT)}")
    k = train_setting(config, "grad_accum_steps")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"train.grad_accum_steps must be a positive int, got {k!r}")
    batch = config.train.batch_size
    if batch % k:
        raise ConfigError(f"train.grad_accum_steps={k} does not divide train.batch_size={batch}")


def check_method_config(method_cls: type[Method], config: ml_collections.ConfigDict) -> None:
    """The run's execution settings and the family's config check, with any non-ConfigError
    turned into a ConfigError."""
    check_execution(config)
    try:
        method_cls.check_config(config)
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"config for method '{config.method}': missing key {e}") from None
