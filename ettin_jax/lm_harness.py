"""lm-evaluation-harness model type `ettin-jax`: zero-shot and generative evaluation of either
member of a pair with our own JAX model (lm-eval 0.4.13).

    import ettin_jax.lm_harness  # registers "ettin-jax" with lm-eval
    lm_eval.simple_evaluate(model="ettin-jax", model_args="path=RUN_DIR/decoder",
                            tasks=["hellaswag"])
    ettin-jax lm-eval --model ettin-jax --model_args path=RUN_DIR/decoder --tasks hellaswag

model_args: `path` (a run directory, a member or step directory, or a HuggingFace directory
written by `ettin-jax export`), `member` (encoder | decoder; default: the one member `path`
holds), `batch_size` (sequences per forward pass), `max_length` (default 8192, the exported
config's max_position_embeddings, which lm-eval's `hf` backend reads), `add_bos_token`
(default True, as Ettin's evaluations: [CLS] starts every text), `max_gen_toks` (default 256,
as lm-eval's `hf`).

Decoder: the requests of lm-eval's `hf` backend on the exported decoder, computed the same
way: TemplateLM's tokenization (a continuation's ids are those of context + continuation
after the context's; texts bracketed as the exported tokenizer does,
`data_pipelines.special_tokens.with_special_tokens`), left truncation to max_length, rolling
windows for perplexity, greedy generation to max_gen_toks, EOS or a stop sequence (cut at
its first occurrence). Scoring runs one jit-compiled forward per batch, generation the KV
cache of `ettin_jax.models.decoding` (prompts of a batch are fed token by token past the
shortest one's bucketed prefill, so no row is ever padded inside the cache).

Encoder: the scoring of Ettin's lm-eval fork (orionw/lm-evaluation-harness, `is_encoder=True`,
`EncoderAsPseudoCausalLM` in lm_eval/models/utils.py at its last runnable commit b4b57281;
the fork's HEAD does not parse): a continuation's log-likelihood is the sum over its tokens
t_i, and a closing [SEP], of log p(t_i) at a [MASK] that follows the context and t_<i and is
itself followed by two more [MASK] and [SEP]:  [CLS] context t_<i [MASK] [MASK] [MASK] [SEP].
The context is encoded alone ([CLS] context, the fork's "drop the encoder's [SEP]"), the
continuation alone without specials (trailing spaces of the context move to it). Where the fork
has no behaviour this module extends it: an empty context is [CLS] alone (the fork stops in
a debugger), add_bos_token=False drops the [CLS] (the fork then drops the context's last real
token), loglikelihood_rolling scores the text and [SEP] as the continuation of [CLS], and rows
longer than max_length lose the oldest tokens after [CLS]. generate_until raises (an encoder
does not generate).

Shapes are bucketed (`bucket_length`: four sizes per octave from 16) and the batch is always
batch_size rows, so a run compiles a handful of programs, not one per request.

Bundled tasks (`ettin_jax/lm_eval_tasks`, `TASKS_DIR`): `bundled_next_line` and
`bundled_perplexity` on held-out Shakespeare, built offline. `ettin-jax lm-eval` finds them
from any directory (run_lm_eval_cli adds TASKS_DIR to lm-eval's include path, before a user's
--include_path, whose tasks win on a name clash); in Python, pass
`task_manager=ettin_jax.lm_harness.task_manager()` (or lm_eval.tasks.TaskManager(
include_path=TASKS_DIR)) to lm_eval.simple_evaluate.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)

from data_pipelines.special_tokens import with_special_tokens
from data_pipelines.tokenizers import SPECIAL_TOKEN_TEXT, Tokenizer
from ettin_jax.errors import ConfigError, did_you_mean
from ettin_jax.lm_eval_tasks import TASKS_DIR
from ettin_jax.models.decoding import decode_step, init_cache, prefill
from ettin_jax.models.transformer import EttinModel

log = logging.getLogger(__name__)

MODEL_TYPE = "ettin-jax"
MEMBER_OBJECTIVES = {"encoder": "mlm", "decoder": "clm"}
DEFAULT_MAX_LENGTH = 8192
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 8
# The fork's num_future_masks: the scored [MASK] is followed by this many more, then [SEP].
FUTURE_MASKS = 2
_MIN_BUCKET = 16
# Keys lm-eval itself adds to model_args (simple_evaluate's additional config).
_HARNESS_KEYS = ("max_batch_size", "device")
_MODEL_ARGS = ("path", "member", "batch_size", "max_length", "add_bos_token", "max_gen_toks")


def bucket_length(n: int, *, down: bool = False) -> int:
    """The padded size of a length n >= 1: 16 up to 16, then the next multiple of a quarter
    of the power of two <= n (20, 24, 28, 32, 40, 48, ...: at most 25% padding, four shapes
    per octave). down=True: the largest such size <= n instead (below 16, the largest power
    of two <= n)."""
    if n < 1:
        raise ValueError(f"a length must be >= 1, got {n}")
    if n < _MIN_BUCKET:
        return 1 << (n.bit_length() - 1) if down else _MIN_BUCKET
    step = 1 << (n.bit_length() - 3)
    return (n // step if down else -(-n // step)) * step


@register_model(MODEL_TYPE)
class EttinJaxLM(TemplateLM):
    """An lm-eval model that runs an ettin-jax encoder or decoder (see the module docstring
    for the model_args and how each member scores).

    Construct through lm-eval (`simple_evaluate(model="ettin-jax", model_args=...)`), with
    keyword arguments, or from a loaded model with `from_model`. Raises ConfigError naming the
    argument for an unknown or invalid model_arg, and CheckpointError when `path` holds no such
    member.
    """

    backend = "causal"

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict | None = None) -> EttinJaxLM:
        """The model of lm-eval's `--model_args` string; what lm-eval passes besides
        (`--batch_size`, `--device`, whose defaults it always passes) applies where the
        model_args do not say (a `batch_size` in model_args wins)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in args}
        return cls(**args, **extra)

    def __init__(self, path: str | None = None, member: str | None = None,
                 batch_size: int | str | None = None, max_length: int | None = None,
                 add_bos_token: bool = True, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 **harness: Any) -> None:
        super().__init__()
        unknown = sorted(set(harness) - set(_HARNESS_KEYS))
        if unknown:
            hints = "".join(did_you_mean(k, _MODEL_ARGS) for k in unknown)
            raise ConfigError(f"{MODEL_TYPE}: unknown model_args {', '.join(unknown)}.{hints} "
                              f"Valid: {', '.join(_MODEL_ARGS)}")
        if harness.get("device") not in (None, "cpu"):
            log.info("%s runs on JAX's default devices; device=%r is ignored", MODEL_TYPE,
                     harness["device"])
        if path is None:
            raise ConfigError(f"{MODEL_TYPE} needs model_args path=DIR (a run directory, a "
                              f"member directory or an exported HuggingFace directory)")
        model, tokenizer, member = _load(str(path), member)
        self._setup(model, tokenizer, member, source=str(path), batch_size=batch_size,
                    max_length=max_length, add_bos_token=add_bos_token,
                    max_gen_toks=max_gen_toks)

    @classmethod
    def from_model(cls, model: EttinModel, tokenizer: Tokenizer, *,
                   batch_size: int | str | None = None, max_length: int | None = None,
                   add_bos_token: bool = True,
                   max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> EttinJaxLM:
        """The lm-eval model of an already loaded member (its objective says which) and its
        tokenizer, with the same settings as the model_args. Raises ConfigError as __init__."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        member = {v: k for k, v in MEMBER_OBJECTIVES.items()}[model.objective]
        self._setup(model, tokenizer, member, source="<memory>", batch_size=batch_size,
                    max_length=max_length, add_bos_token=add_bos_token,
                    max_gen_toks=max_gen_toks)
        return self

    def _setup(self, model: EttinModel, tokenizer: Tokenizer, member: str, *, source: str,
               batch_size: int | str | None, max_length: int | None, add_bos_token: Any,
               max_gen_toks: Any) -> None:
        self.model = model
        self.ettin_tokenizer = tokenizer
        self.member = member
        self.source = source
        self.specials = tokenizer.special_tokens
        self._batch_size = _positive_int("batch_size", DEFAULT_BATCH_SIZE
                                         if batch_size is None else batch_size)
        self._max_length = _positive_int("max_length", DEFAULT_MAX_LENGTH
                                         if max_length is None else max_length)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if not isinstance(add_bos_token, bool):
            raise ConfigError(f"{MODEL_TYPE}: add_bos_token must be True or False, "
                              f"got {add_bos_token!r}")
        self.add_bos_token = add_bos_token
        shortest = 2 + FUTURE_MASKS + 1 if member == "encoder" else 2
        if self._max_length < shortest:
            raise ConfigError(f"{MODEL_TYPE}: max_length must be >= {shortest} for the "
                              f"{member}, got {self._max_length}")
        if member == "encoder" and self.specials.mask is None:
            raise ConfigError(f"{source}: the encoder's tokenizer has no [MASK] token")

    # lm-eval's model interface ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """[SEP], Ettin's EOS."""
        return self.specials.eos

    @property
    def prefix_token_id(self) -> int:
        """[CLS], Ettin's BOS: the context of an empty-context request and of rolling windows
        (lm-eval's `hf` takes the tokenizer's bos_token_id, which the export sets to [CLS])."""
        return self.specials.bos

    @property
    def max_length(self) -> int:
        """Longest input, in tokens."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Tokens generated when a task does not say."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Rows per forward pass (for the encoder: scored tokens)."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer for lm-eval's request-cache fingerprint."""
        return f"{MODEL_TYPE}:{self.source}:{self.member}"

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in results["config"]: the source, member and model size."""
        params = nnx.state(self.model, nnx.Param)
        count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        return {"model_source": self.source, "member": self.member,
                "model_num_parameters": count, "model_dtype": self.model.config.dtype}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """The ids of `string` as lm-eval's `hf` gets them from the exported tokenizer: with
        the member's special tokens ([CLS] text for the decoder, [CLS] text [SEP] for the
        encoder) when add_special_tokens, or when it is None and add_bos_token is set and the
        text does not already start with "[CLS]"."""
        if add_special_tokens is None:
            add_special_tokens = (self.add_bos_token
                                  and not string.startswith(SPECIAL_TOKEN_TEXT["cls"]))
        ids = self.ettin_tokenizer.encode(string)
        if add_special_tokens:
            ids = with_special_tokens(ids, None, self.specials,
                                      objective=MEMBER_OBJECTIVES[self.member])
        return [int(i) for i in ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self.ettin_tokenizer.decode(ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.member == "decoder":
            return super()._encode_pair(context, continuation)
        # The fork's encoder pair: context and continuation encoded apart, [SEP] closes the
        # continuation (and is scored).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        context_enc = self.tok_encode(context)
        if context_enc and context_enc[-1] == self.specials.eos:
            context_enc = context_enc[:-1]
        return context_enc, self._encoder_continuation(continuation)

    def _encoder_continuation(self, text: str) -> list[int]:
        return self.tok_encode(text, add_special_tokens=False) + [self.specials.eos]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) for
        each request's (context, continuation): the decoder's as lm-eval's `hf`, the
        encoder's by the fork's masked scoring (module docstring)."""
        if self.member == "decoder":
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        encoded = []
        for context, continuation in (req.args for req in requests):
            if context == "":
                pair = [self.prefix_token_id], self._encoder_continuation(continuation)
            else:
                pair = self._encode_pair(context, continuation)
            encoded.append(((context, continuation), *pair))
        return self._loglikelihood_tokens(encoded)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request's (text,). The decoder's, as lm-eval's `hf`: the
        tokens of tok_encode(text) ([CLS] first when add_bos_token, and scored too) after a
        [CLS] prefix, in windows of at most max_length tokens that predict each token once
        (`get_rolling_token_windows`, one token of context). The encoder's: the text's tokens
        and [SEP] as one continuation of [CLS] (each token scored with as much left context as
        max_length allows)."""
        totals = []
        for (text,) in (req.args for req in requests):
            if self.member == "decoder":
                windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
            else:
                # Every token is scored with as much left context as max_length allows.
                windows = [(None, [self.prefix_token_id], self._encoder_continuation(text))]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        if self.member == "encoder":
            results = self._masked_loglikelihoods(requests)
        else:
            results = self._causal_loglikelihoods(requests)
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of each request's (context, gen_kwargs), as lm-eval's `hf`:
        the context left-truncated to max_length - max_gen_toks tokens, generation until EOS,
        max_gen_toks tokens or a stop sequence of gen_kwargs["until"] (the text is cut at the
        first one). Raises ConfigError for the encoder, and for sampling (do_sample or a
        temperature > 0)."""
        from lm_eval.models.utils import (
            Collator,
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        if self.member == "encoder":
            tasks = sorted({getattr(r, "task_name", None) or "?" for r in requests})
            raise ConfigError(
                f"{MODEL_TYPE}: the encoder cannot run generate_until requests (task(s) "
                f"{', '.join(tasks)}): it scores multiple-choice, loglikelihood and "
                f"loglikelihood_rolling tasks only; evaluate generation with the decoder")
        collator = Collator([req.args for req in requests],
                            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
                            group_by="gen_kwargs", group_fn=lambda args: args[1])
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise ConfigError(f"{MODEL_TYPE}: generation is greedy only; the task asks for "
                                  f"sampling ({all_kwargs[0]})")
            until = handle_stop_sequences(kwargs.pop("until", None),
                                          eos=SPECIAL_TOKEN_TEXT["sep"])
            max_new = int(kwargs.pop("max_gen_toks"))
            context_room = self.max_length - max_new
            if context_room < 1:
                raise ConfigError(f"{MODEL_TYPE}: max_gen_toks {max_new} leaves no room for "
                                  f"the context in max_length {self.max_length}")
            # An empty prompt (no text, no BOS) starts from [CLS] (`hf` cannot generate).
            prompts = [self.tok_encode(c)[-context_room:] or [self.prefix_token_id]
                       for c in contexts]
            for context, kwargs_in, ids in zip(contexts, all_kwargs,
                                               self._greedy(prompts, max_new, until)):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs_in), text)
        return collator.get_original(results)

    # Computation ---------------------------------------------------------------------

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of rows in batches of batch_size, longest first (similar lengths share a
        padded shape)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _causal_loglikelihoods(self, requests: list) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request with an empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                                 f"max_length {self.max_length}")
            full = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((full[:-1], full[1:], len(continuation)))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for batch in self._batches([len(r[0]) for r in rows]):
            seq = bucket_length(max(len(rows[i][0]) for i in batch))
            window = min(seq, bucket_length(max(rows[i][2] for i in batch)))
            inputs = np.full((self.batch_size, seq), self.specials.pad, np.int32)
            lengths = np.ones(self.batch_size, np.int32)
            targets = np.zeros((self.batch_size, window), np.int32)
            scored = np.zeros((self.batch_size, window), bool)
            for r, i in enumerate(batch):
                ids, next_ids, n = rows[i]
                inputs[r, :len(ids)] = ids
                lengths[r] = len(ids)
                targets[r, window - n:] = next_ids[len(ids) - n:]
                scored[r, window - n:] = True
            logp, greedy = _causal_scores(self.model, jnp.asarray(inputs), jnp.asarray(lengths),
                                          jnp.asarray(targets))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for r, i in enumerate(batch):
                results[i] = (float(logp[r][scored[r]].sum()), bool(greedy[r][scored[r]].all()))
        return results

    def _masked_loglikelihoods(self, requests: list) -> list[tuple[float, bool]]:
        masks = [self.specials.mask] * (1 + FUTURE_MASKS) + [self.specials.eos]
        rows = []  # (request index, ids, scored position, target)
        for index, (_, context, continuation) in enumerate(requests):
            for i, target in enumerate(continuation):
                ids = list(context) + list(continuation[:i])
                excess = len(ids) + len(masks) - self.max_length
                if excess > 0:  # keep [CLS], drop the oldest tokens after it
                    keep = 1 if ids[0] == self.specials.bos else 0
                    ids = ids[:keep] + ids[keep + excess:]
                rows.append((index, ids + masks, len(ids), target))
        sums = np.zeros(len(requests))
        all_greedy = np.ones(len(requests), bool)
        for batch in self._batches([len(r[1]) for r in rows]):
            seq = bucket_length(max(len(rows[i][1]) for i in batch))
            inputs = np.full((self.batch_size, seq), self.specials.pad, np.int32)
            lengths = np.ones(self.batch_size, np.int32)
            positions = np.zeros(self.batch_size, np.int32)
            targets = np.zeros(self.batch_size, np.int32)
            for r, i in enumerate(batch):
                _, ids, position, target = rows[i]
                inputs[r, :len(ids)] = ids
                lengths[r], positions[r], targets[r] = len(ids), position, target
            logp, greedy = _masked_scores(self.model, jnp.asarray(inputs), jnp.asarray(lengths),
                                          jnp.asarray(positions), jnp.asarray(targets))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for r, i in enumerate(batch):
                sums[rows[i][0]] += logp[r]
                all_greedy[rows[i][0]] &= bool(greedy[r])
        return [(float(s), bool(g)) for s, g in zip(sums, all_greedy)]

    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]
                ) -> list[list[int]]:
        """The greedy continuation ids of each prompt (at most max_new, EOS excluded), stopped
        once EOS comes or its text holds a stop sequence. One batch of at most batch_size.

        The cache's fill length is shared by the rows: the bucketed length of the shortest
        prompt is prefilled at once, then every row is fed one token per step, its own prompt
        token while it has one, else its last prediction (a row's predictions count from its
        last prompt token on)."""
        count = len(prompts)
        rows = prompts + [prompts[0]] * (self.batch_size - count)
        lengths = np.array([len(p) for p in rows])
        longest = int(lengths.max())
        ids = np.full((self.batch_size, longest), self.specials.pad, np.int32)
        for r, prompt in enumerate(rows):
            ids[r, :len(prompt)] = prompt
        position = bucket_length(int(lengths.min()), down=True)
        # The last new token is never fed back: the cache needs one slot less.
        cache = init_cache(self.model, self.batch_size, bucket_length(longest + max_new - 1))
        logits, cache = prefill(self.model, jnp.asarray(ids[:, :position]), cache)
        generated: list[list[int]] = [[] for _ in range(count)]
        done = [False] * count
        while True:
            predicted = np.asarray(_argmax(logits))
            for r in range(count):
                if done[r] or position < lengths[r]:
                    continue
                token = int(predicted[r])
                if token == self.specials.eos:
                    done[r] = True
                    continue
                generated[r].append(token)
                text = self.tok_decode(generated[r])
                done[r] = len(generated[r]) >= max_new or any(s and s in text for s in until)
            if all(done):
                return generated
            prompt_token = ids[:, min(position, longest - 1)]
            feed = np.where(position < lengths, prompt_token, predicted).astype(np.int32)
            logits, cache = decode_step(self.model, jnp.asarray(feed), cache)
            position += 1


@nnx.jit
def _causal_scores(model: EttinModel, inputs: jax.Array, lengths: jax.Array,
                   targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Right-padded inputs [B, T] (row b holds lengths[b] tokens), targets [B, K]: the next
    tokens of the last K positions of each row. Returns their float32 log-probabilities and
    whether each is the argmax, both [B, K] (positions before a row's start are garbage)."""
    seq, window = inputs.shape[1], targets.shape[1]
    segment_ids = (jnp.arange(seq)[None] < lengths[:, None]).astype(jnp.int32)
    hidden = model(inputs, segment_ids)
    index = jnp.maximum(lengths[:, None] - window + jnp.arange(window)[None], 0)
    hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
    logits = model.logits(hidden).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return token_logp, jnp.argmax(logits, axis=-1) == targets


@nnx.jit
def _masked_scores(model: EttinModel, inputs: jax.Array, lengths: jax.Array,
                   positions: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Right-padded encoder inputs [B, T]: the float32 log-probability of targets[b] at
    position positions[b] of row b, and whether it is the argmax, both [B]."""
    seq = inputs.shape[1]
    segment_ids = (jnp.arange(seq)[None] < lengths[:, None]).astype(jnp.int32)
    hidden = model(inputs, segment_ids)
    hidden = jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]
    logits = model.logits(hidden).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return token_logp, jnp.argmax(logits, axis=-1) == targets


@jax.jit
def _argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{MODEL_TYPE}: {name} must be a positive integer, got {value!r}")
    return value


def _load(path: str, member: str | None) -> tuple[EttinModel, Tokenizer, str]:
    """The member's model and tokenizer from `path`; member None: the one member it holds."""
    from ettin_jax.finetune.trainer import source_members
    from ettin_jax.inference import load_model

    if member is not None and member not in MEMBER_OBJECTIVES:
        raise ConfigError(f"{MODEL_TYPE}: member must be encoder or decoder, got {member!r}."
                          f"{did_you_mean(str(member), MEMBER_OBJECTIVES)}")
    held = source_members(path)
    if member is None:
        if len(held) != 1:
            raise ConfigError(f"{path} holds both members ({', '.join(held)}); pass model_args "
                              f"member=encoder or member=decoder")
        member = held[0]
    model, tokenizer = load_model(Path(path), member)  # type: ignore[arg-type]
    return model, tokenizer, member


def run_lm_eval_cli(argv: list[str]) -> int:
    """Runs lm-eval's own command line (`lm-eval ...`, lm_eval.__main__.cli_evaluate) on
    `argv` (the arguments after the program name) with the `ettin-jax` model type registered
    and the bundled tasks on the include path (`with_bundled_tasks`). As lm-eval, arguments
    without a subcommand mean `run`. Returns the exit status: 0 after an evaluation (or
    --help), argparse's 2 for bad arguments; errors of the model (ConfigError, CheckpointError)
    and of lm-eval propagate."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        with _tables_without_fork(), _bundled_tasks_included():
            cli_evaluate()
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


@contextlib.contextmanager
def _tables_without_fork() -> Iterator[None]:
    """lm-eval prints its result tables with pytablewriter, whose dataproperty extractor
    formats the cells in a process pool of os.fork()ed workers: in a process running JAX's
    threads a fork can deadlock (JAX warns). Here one worker formats them in-process."""
    try:
        from dataproperty import DataPropertyExtractor
    except ImportError:
        yield
        return
    init = DataPropertyExtractor.__init__

    def single_worker(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.max_workers = 1

    DataPropertyExtractor.__init__ = single_worker
    try:
        yield
    finally:
        DataPropertyExtractor.__init__ = init


def with_bundled_tasks(include_path: str | Path | Sequence[str | Path] | None
                       ) -> list[str | Path]:
    """lm-eval's include path (None, one path or a list, as TaskManager takes it) with TASKS_DIR
    first, then the given paths in order (lm-eval lets a later path's task override an earlier
    one of the same name: a user's own task wins). TASKS_DIR appears once."""
    if include_path is None:
        given: list[str | Path] = []
    elif isinstance(include_path, (str, Path)):
        given = [include_path]
    else:
        given = list(include_path)
    return [TASKS_DIR, *(p for p in given if Path(p).resolve() != TASKS_DIR)]


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None,
                 **kwargs: Any):
    """An lm_eval.tasks.TaskManager that knows the bundled tasks as well as lm-eval's own and
    those under `include_path`; kwargs go to TaskManager (e.g. include_defaults=False, which
    skips indexing lm-eval's 200+ task folders)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=with_bundled_tasks(include_path), **kwargs)


@contextlib.contextmanager
def _bundled_tasks_included() -> Iterator[None]:
    """Every lm_eval TaskManager made inside gets the bundled tasks (`with_bundled_tasks`):
    lm-eval's --include_path takes one folder, and its subcommands build their TaskManager
    themselves."""
    import inspect

    from lm_eval.tasks.manager import TaskManager  # the class, whatever wraps it

    init = TaskManager.__init__
    signature = inspect.signature(init)

    def including(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["include_path"] = with_bundled_tasks(bound.arguments.get("include_path"))
        init(*bound.args, **bound.kwargs)

    TaskManager.__init__ = including
    try:
        yield
    finally:
        TaskManager.__init__ = init
