"""The train state: parameters, optimizer state and counters, as one pytree with explicit
shardings, and how it is created (initialised in place on the mesh, never gathered)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ettin_jax.models import EttinModel, ModelConfig
from ettin_jax.models.config import Objective
from ettin_jax.training.mesh import parameter_sharding, replicated
from ettin_jax.training.schedules import token_count

Params = dict[str, Any]  # nnx pure dict of the model's parameters


@struct.dataclass
class TrainState:
    """step: updates applied; params: fp32 master weights; opt_state: optax state;
    skipped: updates skipped for a non-finite loss or gradient; nonfinite_streak: of them in a
    row (reset by a finite step); phase_tokens: real tokens seen in the current phase, from
    which the step computes its learning rate (`schedules.token_count` form; checkpoints do not
    store it, their progress record does)."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    skipped: jax.Array
    nonfinite_streak: jax.Array
    phase_tokens: jax.Array


def model_graph(config: ModelConfig, objective: Objective) -> nnx.GraphDef:
    """The static structure of the model (no arrays), to merge with params in the step; the
    same for every mesh."""
    abstract = nnx.eval_shape(lambda: EttinModel(config, objective, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def params_shardings(config: ModelConfig, objective: Objective, mesh: Mesh) -> Params:
    """NamedSharding of every parameter (pure dict), from its logical axes and the rules."""
    return module_shardings(
        nnx.eval_shape(lambda: EttinModel(config, objective, rngs=nnx.Rngs(0))), mesh)


def module_shardings(abstract: nnx.Module, mesh: Mesh) -> Params:
    """NamedSharding of every parameter (pure dict) of any module built from the model's
    layers (`abstract`: from nnx.eval_shape), from its logical axes and the rules."""
    state = nnx.state(abstract)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)
    return jax.tree.map_with_path(
        lambda path, spec, shape: parameter_sharding(mesh, spec, shape.shape,
                                                     jax.tree_util.keystr(path)),
        specs, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def state_shardings(optimizer: optax.GradientTransformation, params_sharding: Params,
                    abstract_params: Params, mesh: Mesh) -> TrainState:
    """Shardings of a whole TrainState: optimizer moments follow their parameters, scalars
    are replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sharding = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, params_sharding,
        transform_non_params=lambda _: replicated(mesh),
    )
    scalar = replicated(mesh)
    return TrainState(step=scalar, params=params_sharding, opt_state=opt_sharding,
                      skipped=scalar, nonfinite_streak=scalar, phase_tokens=scalar)


def _new_state(config: ModelConfig, objective: Objective,
               optimizer: optax.GradientTransformation, seed: int,
               params: Params | None = None) -> TrainState:
    """A step-0 state: `params`, or parameters initialised from `seed`."""
    if params is None:
        params = nnx.to_pure_dict(nnx.state(EttinModel(config, objective, rngs=nnx.Rngs(seed))))
    zero = jnp.zeros([], jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params), skipped=zero,
                      nonfinite_streak=zero, phase_tokens=jnp.asarray(token_count(0)))


def init_state_shardings(config: ModelConfig, objective: Objective,
                         optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The shardings of a TrainState on `mesh` (nothing is allocated)."""
    param_sharding = params_shardings(config, objective, mesh)
    abstract = jax.eval_shape(lambda: _new_state(config, objective, optimizer, 0)).params
    return state_shardings(optimizer, param_sharding, abstract, mesh)


def init_state(config: ModelConfig, objective: Objective, optimizer: optax.GradientTransformation,
               mesh: Mesh, *, seed: int, params: Params | None = None) -> tuple[TrainState,
                                                                             TrainState]:
    """A fresh TrainState on `mesh` and its shardings. Parameters are initialised from `seed`
    directly into their shards, or taken from `params` (weights-only restore)."""
    shardings = init_state_shardings(config, objective, optimizer, mesh)
    param_sharding = shardings.params
    if params is None:
        state = jax.jit(lambda: _new_state(config, objective, optimizer, seed),
                        out_shardings=shardings)()
    else:
        placed = jax.device_put(params, param_sharding)
        state = jax.jit(lambda p: _new_state(config, objective, optimizer, seed, p),
                        out_shardings=shardings)(placed)
    return state, shardings


def abstract_state(shardings: TrainState, config: ModelConfig, objective: Objective,
                   optimizer: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint on this mesh."""
    shapes = jax.eval_shape(lambda: _new_state(config, objective, optimizer, 0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def placed_token_count(tokens: int, sharding: jax.sharding.Sharding) -> jax.Array:
    """`schedules.token_count(tokens)` as a global array on `sharding` (every process passes
    the same `tokens`)."""
    count = token_count(tokens)
    return jax.make_array_from_callback(count.shape, sharding, lambda index: count[index])


def at_phase_tokens(state: TrainState, tokens: int) -> TrainState:
    """`state` with its phase token count set to `tokens` (a new phase starts at 0)."""
    return state.replace(phase_tokens=placed_token_count(tokens, state.phase_tokens.sharding))
