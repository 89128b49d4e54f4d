"""The shared model: forward/backward for both objectives, what each token can see, dropout,
the sparse head, the precision policies, initialisation, logical axes and bad input."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat_params, randomized_model, run_hidden, run_logits, small_config
from flax import nnx

from ettin_jax.models import EttinModel
from ettin_jax.models.attention import local_window, visibility_mask
from ettin_jax.models.layers import tied_logits, truncated_normal
from ettin_jax.models.rope import document_positions
from pallas_kernels import pack_masked_tokens


def _logits(model, ids, segment_ids=None, positions=None):
    as_jax = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    return np.asarray(run_logits(model, as_jax(ids), as_jax(segment_ids), as_jax(positions)))


def _changed_positions(model, ids, j, rng, segment_ids=None):
    """Positions whose logits change when token j is replaced by another id."""
    other = ids.copy()
    other[:, j] = (ids[:, j] + 1 + rng.integers(0, 100)) % model.config.vocab_size
    diff = np.abs(_logits(model, ids, segment_ids) - _logits(model, other, segment_ids))
    return set(np.nonzero(diff.max(axis=(0, 2)) > 1e-6)[0].tolist())


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_forward_and_backward_are_finite(objective, rng):
    model = randomized_model(small_config(), objective, seed=int(rng.integers(1 << 30)))
    ids = jnp.asarray(rng.integers(0, 1024, (2, 45)))
    segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 15 + [0] * 10], 2, axis=0))
    targets = jnp.asarray(rng.integers(0, 1024, (2, 45)))

    def loss_fn(m):
        logits = m.logits(m(ids, segments, deterministic=False, dropout_rng=jax.random.key(1)))
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
        real = (segments != 0)[..., None]
        return jnp.sum(jnp.where(real, losses, 0.0)) / jnp.sum(real)

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    assert np.isfinite(float(loss)) and float(loss) > 0
    grad_leaves = jax.tree.leaves(nnx.state(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad_leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in grad_leaves) == len(grad_leaves)


def test_encoder_attends_both_ways_and_decoder_never_sees_the_future(rng):
    config = small_config(global_layers=(0, 1, 2, 3))  # all global: no window in the way
    ids = rng.integers(0, 1024, (1, 21))
    encoder = randomized_model(config, "mlm", seed=int(rng.integers(1 << 30)))
    decoder = randomized_model(config, "clm", seed=int(rng.integers(1 << 30)))
    for j in (0, 7, 20):
        assert _changed_positions(encoder, ids, j, rng) == set(range(21))
        assert _changed_positions(decoder, ids, j, rng) == set(range(j, 21))


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_local_layer_never_sees_past_the_window(objective, rng):
    # One local layer: a token reaches exactly the queries whose window contains it.
    config = small_config(num_layers=1, global_layers=(), local_attention=8)
    model = randomized_model(config, objective, seed=int(rng.integers(1 << 30)))
    left, right = local_window(8, causal=objective == "clm")
    assert (left, right) == ((3, 0) if objective == "clm" else (4, 4))
    ids = rng.integers(0, 1024, (1, 30))
    for j in (0, 13, 29):
        expected = {i for i in range(30) if i - left <= j <= i + right}
        assert _changed_positions(model, ids, j, rng) == expected


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_packed_documents_never_see_each_other(objective, rng):
    model = randomized_model(small_config(local_attention=8), objective, seed=int(rng.integers(1 << 30)))
    doc_a, doc_b = rng.integers(0, 1024, 17), rng.integers(0, 1024, 12)
    packed = np.concatenate([doc_a, doc_b, np.zeros(3, int)])[None]
    segments = np.array([[1] * 17 + [2] * 12 + [0] * 3])
    packed_logits = _logits(model, packed, segments)
    # Each document gives the same logits as when it runs alone (positions restart at 0).
    np.testing.assert_allclose(packed_logits[0, :17], _logits(model, doc_a[None])[0], atol=2e-5)
    np.testing.assert_allclose(packed_logits[0, 17:29], _logits(model, doc_b[None])[0], atol=2e-5)
    # And changing a token of one document changes nothing in the other.
    assert _changed_positions(model, packed, 20, rng, segments) <= set(range(17, 32))
    assert not _changed_positions(model, packed, 3, rng, segments) & set(range(17, 29))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_padding_is_nan_free_and_zero_in_attention(rng, impl):
    model = randomized_model(small_config(attention_impl=impl), "clm",
                             seed=int(rng.integers(1 << 30)))
    ids = jnp.asarray(rng.integers(0, 1024, (2, 16)))
    segments = jnp.asarray([[1] * 10 + [0] * 6, [0] * 16])  # second row all padding
    hidden = run_hidden(model, ids, segments)
    assert bool(jnp.all(jnp.isfinite(hidden)))
    q = jnp.asarray(rng.normal(size=(2, 16, 2, 64)), jnp.float32)
    from ettin_jax.models.attention import dot_product_attention

    out = dot_product_attention(q, q, q, segments, causal=True, window=None, impl=impl)
    assert bool(jnp.all(out[0, 10:] == 0)) and bool(jnp.all(out[1] == 0))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_visibility_mask_matches_a_plain_loop(rng):
    segments = rng.integers(0, 3, (2, 19))
    for causal in (False, True):
        for window in (None, (3, 2), (4, 0)):
            mask = np.asarray(visibility_mask(jnp.asarray(segments), causal=causal, window=window))
            for b in range(2):
                for i in range(19):
                    for j in range(19):
                        expected = (
                            segments[b, i] == segments[b, j] != 0
                            and (not causal or j <= i)
                            and (window is None or i - window[0] <= j <= i + window[1])
                        )
                        assert mask[b, 0, i, j] == expected


def test_positions_restart_per_document():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert np.asarray(document_positions(segments)).tolist() == expected


def test_dropout_only_in_training_and_reproducible(rng):
    model = randomized_model(small_config(), "mlm", seed=int(rng.integers(1 << 30)))
    ids = jnp.asarray(rng.integers(0, 1024, (2, 24)))
    evaluated = run_hidden(model, ids)
    np.testing.assert_array_equal(run_hidden(model, ids, deterministic=True), evaluated)
    a = run_hidden(model, ids, deterministic=False, dropout_rng=jax.random.key(1))
    b = run_hidden(model, ids, deterministic=False, dropout_rng=jax.random.key(1))
    c = run_hidden(model, ids, deterministic=False, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3 and float(jnp.abs(a - evaluated).max()) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        model(ids, deterministic=False)
    # Dropout sits after the attention output only: with rate 0 training equals evaluation.
    no_dropout = EttinModel(small_config(attention_output_dropout=0.0), "mlm", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(
        run_hidden(no_dropout, ids, deterministic=False, dropout_rng=jax.random.key(3)),
        run_hidden(no_dropout, ids),
    )


@pytest.mark.parametrize(("dtype", "precision"),
                         [("float32", "uniform"), ("bfloat16", "autocast")])
def test_sparse_head_equals_dense_head_at_masked_positions(rng, dtype, precision):
    model = randomized_model(small_config(dtype=dtype, precision=precision), "mlm",
                             seed=int(rng.integers(1 << 30)))
    ids = jnp.asarray(rng.integers(0, 1024, (3, 30)))
    hidden = run_hidden(model, ids)
    mask = rng.random((3, 30)) < 0.3
    packed = pack_masked_tokens(hidden, jnp.asarray(mask), 40)
    count = int(mask.sum())
    sparse = model.logits(packed.values)
    assert packed.values.dtype == sparse.dtype == jnp.float32  # autocast: fp32 rows and logits
    dense = np.asarray(model.logits(hidden))
    np.testing.assert_allclose(np.asarray(sparse)[:count], dense[mask], atol=1e-5)


@pytest.mark.parametrize(("precision", "logits_dtype"),
                         [("uniform", jnp.bfloat16), ("autocast", jnp.float32)])
def test_bf16_compute_keeps_fp32_params(rng, precision, logits_dtype):
    config = small_config(dtype="bfloat16", precision=precision)
    model = EttinModel(config, "clm", rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    reference = EttinModel(small_config(), "clm", rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(model, nnx.Param))
    assert {a.dtype for a in flat_params(model).values()} == {np.dtype("float32")}
    ids = jnp.asarray(rng.integers(0, 1024, (2, 20)))
    logits = run_logits(model, ids)
    assert logits.dtype == logits_dtype
    np.testing.assert_allclose(
        np.asarray(logits, np.float32), _logits(reference, np.asarray(ids)), atol=0.1
    )


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_precision_policies_are_one_network_in_fp32(rng, objective):
    """With dtype float32, precision "autocast" computes exactly what "uniform" does: hidden
    states, logits and parameter gradients, bit for bit."""
    seed = int(rng.integers(1 << 30))
    models = {p: randomized_model(small_config(precision=p, local_attention=8), objective, seed)
              for p in ("uniform", "autocast")}
    ids = jnp.asarray(rng.integers(0, 1024, (2, 29)))
    segments = jnp.asarray([[1] * 12 + [2] * 13 + [0] * 4, [1] * 29])

    def loss(model):
        logits = model.logits(model(ids, segments))
        return jnp.sum(jnp.tanh(logits) * (segments[..., None] != 0)), logits

    results = {p: nnx.jit(nnx.value_and_grad(loss, has_aux=True))(m) for p, m in models.items()}
    (u_loss, u_logits), u_grads = results["uniform"]
    (a_loss, a_logits), a_grads = results["autocast"]
    assert u_logits.dtype == a_logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a_logits), np.asarray(u_logits))
    np.testing.assert_array_equal(np.asarray(a_loss), np.asarray(u_loss))
    for (path, a), (_, u) in zip(nnx.to_flat_state(a_grads), nnx.to_flat_state(u_grads)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(u.get_value()),
                                      err_msg=str(path))


def _primitives(jaxpr) -> list:
    """Every equation of `jaxpr`, those of its sub-jaxprs (jit, custom_jvp, ...) included."""
    eqns = []
    for eqn in jaxpr.eqns:
        eqns.append(eqn)
        stack = list(eqn.params.values())
        while stack:
            value = stack.pop()
            if isinstance(value, (tuple, list)):
                stack.extend(value)
            elif hasattr(value, "eqns"):
                eqns.extend(_primitives(value))
            elif hasattr(getattr(value, "jaxpr", None), "eqns"):
                eqns.extend(_primitives(value.jaxpr))
    return eqns


def _forward_dtypes(model, ids) -> dict:
    """The dtypes of one forward (hidden states, then logits) from its jaxpr: the outputs, the
    (lhs, rhs, out) dtypes of every matmul and the dtypes of the adds of [B, S, hidden]."""
    graph, state = nnx.split(model)

    def forward(state, ids):
        m = nnx.merge(graph, state)
        hidden = m(ids)
        return hidden, m.logits(hidden)

    closed = jax.make_jaxpr(forward)(state, ids)
    eqns = _primitives(closed.jaxpr)
    stream_shape = (*ids.shape, model.config.hidden_size)
    return {
        "outputs": [var.aval.dtype for var in closed.jaxpr.outvars],
        "matmuls": collections.Counter(
            (e.invars[0].aval.dtype.name, e.invars[1].aval.dtype.name, e.outvars[0].aval.dtype.name)
            for e in eqns if e.primitive.name == "dot_general"),
        "stream_adds": {e.outvars[0].aval.dtype.name for e in eqns
                        if e.primitive.name == "add" and e.outvars[0].aval.shape == stream_shape},
    }


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_autocast_keeps_the_residual_stream_and_logits_fp32(rng, objective):
    """precision "autocast" (bf16): every matmul takes bf16 operands (weights and activations)
    and gives bf16, except the attention scores (fp32 accumulation inside attention) and the
    vocabulary projection (fp32 logits); every add on the residual stream [B, S, hidden] is
    fp32 and the hidden states are fp32. "uniform" runs the stream and the logits in bf16."""
    layers = 4
    ids = jnp.asarray(rng.integers(0, 1024, (2, 12)))
    found = {p: _forward_dtypes(EttinModel(small_config(dtype="bfloat16", precision=p,
                                                        num_layers=layers),
                                           objective, rngs=nnx.Rngs(0)), ids)
             for p in ("autocast", "uniform")}
    bf16, f32 = "bfloat16", "float32"
    # Per layer: Wqkv, attention scores, probabilities x values, Wo, Wi, MLP Wo; then the head
    # dense and the vocabulary projection.
    assert found["autocast"]["matmuls"] == {
        (bf16, bf16, bf16): 5 * layers + 1, (bf16, bf16, f32): layers + 1}
    assert found["uniform"]["matmuls"] == {(bf16, bf16, bf16): 5 * layers + 2,
                                           (bf16, bf16, f32): layers}
    assert found["autocast"]["stream_adds"] == {f32}
    assert found["uniform"]["stream_adds"] == {bf16}
    assert found["autocast"]["outputs"] == [jnp.float32, jnp.float32]
    assert found["uniform"]["outputs"] == [jnp.bfloat16, jnp.bfloat16]


def test_tied_logits_backward_runs_in_the_operand_dtype(rng):
    """The autocast vocabulary projection: bf16 operands, fp32 logits; the backward rounds the
    logits' gradient to bf16 (as torch autocast's bf16 logits have a bf16 gradient) and runs
    both backward matmuls in bf16, instead of autodiff's fp32 x bf16 matmuls."""
    x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.bfloat16)
    embedding = jnp.asarray(rng.normal(size=(11, 16)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32)
    logits, vjp = jax.vjp(tied_logits, x, embedding)
    d_x, d_embedding = vjp(g)
    assert logits.dtype == jnp.float32 and d_x.dtype == d_embedding.dtype == jnp.bfloat16
    x32, e32 = np.asarray(x, np.float32), np.asarray(embedding, np.float32)
    g16 = np.asarray(g.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(logits), x32 @ e32.T, rtol=1e-5, atol=1e-5)
    # Exact products of bf16 values summed in fp32, then one bf16 rounding (2**-8 relative).
    for got, want in ((d_x, g16 @ e32), (d_embedding, np.einsum("bsv,bsh->vh", g16, x32))):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8,
                                   atol=2**-8 * np.abs(want).max())
    backward = jax.make_jaxpr(vjp)(g)
    operands = {v.aval.dtype.name for e in _primitives(backward.jaxpr)
                if e.primitive.name == "dot_general" for v in e.invars}
    assert operands == {"bfloat16"}


def test_autocast_bf16_runs_the_pallas_kernels(rng):
    """Under autocast the attention kernels get q, k, v in the compute dtype (bf16), as under
    uniform: the Pallas flash attention gives the XLA attention's hidden states."""
    seed = int(rng.integers(1 << 30))
    hidden = {}
    ids = jnp.asarray(rng.integers(0, 1024, (2, 29)))
    segments = jnp.asarray([[1] * 12 + [2] * 13 + [0] * 4, [1] * 29])
    for impl in ("xla", "pallas"):
        config = small_config(dtype="bfloat16", precision="autocast", attention_impl=impl,
                              local_attention=8)
        hidden[impl] = np.asarray(run_hidden(randomized_model(config, "clm", seed), ids, segments))
    real = np.asarray(segments) != 0
    assert hidden["pallas"].dtype == np.float32
    # Both round attention probabilities and outputs to bf16 (eps 2**-7); the kernels
    # accumulate blockwise, so roundings differ now and then.
    scale = np.abs(hidden["xla"][real]).max()
    assert np.abs(hidden["pallas"] - hidden["xla"])[real].max() <= 2**-7 * scale


def test_megatron_init(rng):
    config = small_config(num_layers=3)
    params = flat_params(EttinModel(config, "mlm", rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    out_std = 0.02 / np.sqrt(2 * 3)
    # std of a normal truncated at +-2 sigma, from a plain numpy sample
    truncated = rng.normal(size=2_000_000)
    shrink = truncated[np.abs(truncated) <= 2].std()
    expectations = {
        ("embeddings", "tok_embeddings", "embedding"): 0.02,
        ("layers", 1, "attn", "Wqkv", "kernel"): 0.02,
        ("layers", 1, "mlp", "Wi", "kernel"): 0.02,
        ("head", "dense", "kernel"): 0.02,
        ("layers", 1, "attn", "Wo", "kernel"): out_std,
        ("layers", 1, "mlp", "Wo", "kernel"): out_std,
    }
    for path, std in expectations.items():
        value = params[path]
        assert np.abs(value).max() <= 2 * std * (1 + 1e-6), path
        assert abs(value.std() / (std * shrink) - 1) < 0.05, (path, value.std())
    for path, value in params.items():
        if path[-1] == "scale":
            assert np.all(value == 1.0), path
    assert np.all(params[("decoder_bias",)] == 0.0)
    assert ("layers", 0, "attn_norm", "scale") not in params
    assert ("layers", 1, "attn_norm", "scale") in params
    sample = np.asarray(truncated_normal(0.5)(jax.random.key(0), (100_000,)))
    assert abs(sample.std() / (0.5 * shrink) - 1) < 0.02


def test_every_parameter_has_logical_axes():
    model = EttinModel(small_config(), "clm", rngs=nnx.Rngs(0))
    known = {"vocab", "embed", "heads", "qkv", "mlp", "glu", "norm"}
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    count = 0
    for path, var in nnx.to_flat_state(specs):
        axes = tuple(var.get_value())
        shape = flat_params(model)[tuple(path)].shape
        assert len(axes) == len(shape) and set(axes) <= known, (path, axes)
        count += 1
    assert count == len(flat_params(model))


def test_encoder_and_decoder_share_parameter_names_and_shapes():
    config = small_config()
    enc = flat_params(EttinModel(config, "mlm", rngs=nnx.Rngs(0)))
    dec = flat_params(EttinModel(config, "clm", rngs=nnx.Rngs(0)))
    assert {k: v.shape for k, v in enc.items()} == {k: v.shape for k, v in dec.items()}


def test_bad_model_input_is_named(rng):
    model = EttinModel(small_config(), "mlm", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"token id 1024 is outside the vocabulary \[0, 1024\)"):
        model(jnp.asarray([[1, 2, 1024]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(jnp.asarray([[1, -1, 3]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        model(jnp.asarray([1, 2, 3]))
    with pytest.raises(ValueError, match="segment_ids shape"):
        model(jnp.asarray([[1, 2, 3]]), jnp.asarray([[1, 1]]))
    with pytest.raises(ValueError, match="must be integers"):
        model(jnp.asarray([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown objective 'mlmm'. Did you mean 'mlm'"):
        EttinModel(small_config(), "mlmm", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size 100 is not divisible by num_heads 3"),
        ({"global_layers": (0, 4)}, r"global_layers \[0, 4\] has indices \[4\] outside 0..3"),
        ({"local_attention": 7}, "local_attention must be an even number"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"attention_output_dropout": 1.5}, "attention_output_dropout must be in"),
        ({"precision": "autocat"}, "unknown precision 'autocat'. Did you mean 'autocast'"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_unavailable_attention_implementations_fail_clearly(rng):
    ids = jnp.asarray(rng.integers(0, 1024, (1, 8)))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        EttinModel(small_config(attention_impl="cudnn"), "mlm", rngs=nnx.Rngs(0))(ids)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_pallas_attention_gives_the_xla_model(rng, objective):
    """attention_impl="pallas" (flash-attention kernels, interpret mode on CPU) computes the
    same network as the dense XLA attention: hidden states and parameter gradients."""
    seed = int(rng.integers(1 << 30))
    models = {impl: randomized_model(small_config(attention_impl=impl, local_attention=8),
                                     objective, seed=seed) for impl in ("xla", "pallas")}
    ids = jnp.asarray(rng.integers(0, 1024, (2, 29)))
    segments = jnp.asarray([[1] * 12 + [2] * 13 + [0] * 4, [1] * 29])

    def loss(model):
        return jnp.sum(jnp.tanh(model(ids, segments)) * (segments[..., None] != 0))

    results = {impl: nnx.value_and_grad(loss)(model) for impl, model in models.items()}
    (xla_loss, xla_grads), (pallas_loss, pallas_grads) = results["xla"], results["pallas"]
    np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(xla_grads), nnx.to_flat_state(pallas_grads)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max(), err_msg=str(path))
