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
import jax
import jax.numpy as jnp
import ml_collections
import optax

from t2i_jax.errors import ConfigError, UserError
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
    ) -> TrainState:
        """Step 0: every player's optimizer state; EMA copies of `ema` (default: all)."""
        ema = list(params) if ema is None else ema
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params={name: params[name] for name in ema},
            opt_state={name: optimizers[name].init(params[name]) for name in params},
        )


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
    *args,
) -> Update:
    """The train-step skeleton every player shares: the gradient of
    `loss_fn(params, *args) -> (loss, aux)`, the optimizer's update (clipping, weight decay
    and frozen-group masks are part of the optimizer), applied."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return Update(
        params=optax.apply_updates(params, updates),
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
    players = {name: params[name] for name in state.ema_params}
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
    """

    name: str
    type: type
    help: str
    config_key: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default(self, config: ml_collections.ConfigDict) -> Any:
        node: Any = config
        for part in self.config_key.split("."):
            node = node[part]
        return node


# Hooks with a default that a family may replace; misspellings of these are refused.
OPTIONAL_HOOKS = ("check_config", "load_frozen", "reconstruct", "validation_stats")
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
        self.config = config
        self.text_setup = text
        self.conditioner = TextConditioner(text)

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

    def sample_defaults(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """Each sample option's value from the run's config."""
        return {o.name: o.default(config) for o in self.sample_options}

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
    # The hooks the trainer calls with positional arguments (check_config and load_frozen
    # take none beyond the class or instance).
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


def check_method_config(method_cls: type[Method], config: ml_collections.ConfigDict) -> None:
    """The family's config check, with any non-ConfigError turned into a ConfigError."""
    try:
        method_cls.check_config(config)
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"config for method '{config.method}': missing key {e}") from None
