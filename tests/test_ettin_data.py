"""Chunking and masking as Ettin's data (issue 14 item 5): [SEP] only at a document's true end,
back-filled tails and counted skips, Bernoulli masking against transformers' own collator,
held-out MLM at 15%, mixture weights as token shares."""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np
import pytest
from conftest import ByteTokenizer

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.objectives import IGNORE, clm_labels, mlm_inputs
from data_pipelines.packing import (
    FORCED_SEP,
    ChunkStats,
    backfill_draw,
    chunk_sizes,
    ettin_split,
    packed_rows,
)
from data_pipelines.pipeline import make_batch_iterator
from data_pipelines.sources import mixture, open_source
from data_pipelines.special_tokens import PROJECT

CLS, SEP, MASK = PROJECT.cls, PROJECT.sep, PROJECT.mask
VOCAB = 300
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"


# --- the chunking rules -------------------------------------------------------------------------


def ettin_reference(doc, *, content, min_chunk, skip, draw):
    """Ettin's chunking written from its description (split_dataset_into_chunks_individual.py
    with --add_eos_token --backfill --backfill_no_duplicates, then bert24's loader):
    (encoder segments, decoder sequences, skipped token count)."""
    tokens = [int(t) for t in doc] + [SEP]  # --add_eos_token: EOS at the true end only
    pieces = [tokens[i:i + content] for i in range(0, len(tokens), content)]
    kept, skipped = [], 0
    for i, piece in enumerate(pieces):
        if len(piece) < skip and i != 0:  # -a: tiny chunks go, except the first
            skipped += len(piece)
            continue
        if len(piece) < min_chunk and i != 0:  # -m: back-fill from the previous chunk
            moved = draw(content - len(piece))  # np.random.randint(0, C - len)
            if moved:
                piece = kept[-1][-moved:] + piece
                kept[-1] = kept[-1][:-moved]
        kept.append(piece)
    decoder = [[CLS] + piece for piece in kept]  # the loader prepends [CLS]
    encoder = [d if d[-1] == SEP else d + [SEP] for d in decoder]  # ... and forces [SEP]
    return encoder, decoder, skipped


def _segments(rows):
    """[(encoder segment, forced flags, CLM labels)] of packed rows, checking the layout."""
    found = []
    for row in rows:
        ids, segments, positions = row["input_ids"], row["segment_ids"], row["positions"]
        labels = clm_labels(ids[None], segments[None], row[FORCED_SEP][None])[0]
        for s in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            found.append((ids[where].tolist(), row[FORCED_SEP][where].tolist(),
                          labels[where].tolist()))
    return found


def _decoder_labels(sequence):
    return sequence[1:] + [IGNORE]


@pytest.mark.parametrize("seq_len", [1024, 64, 37])
def test_ettin_chunking_matches_the_reference(seq_len, rng):
    content, min_chunk, skip = chunk_sizes(seq_len)
    lengths = [0, 1, 5, content - 1, content, content + 1, content + 40, 2 * content + 10,
               2 * content + 100, 2 * content + 600, 3 * content - 1, 3 * content,
               *rng.integers(1, 4 * content, 30)]
    documents = [rng.integers(5, VOCAB, n).astype(np.int32) for n in lengths]
    stats: dict[int, ChunkStats] = {}
    rows = list(packed_rows(grain.MapDataset.source(documents), seq_len=seq_len,
                            special=PROJECT, bins=3, chunking="ettin", seed=21, stats=stats))
    expected, skipped = [], 0
    for doc in documents:
        encoder, decoder, lost = ettin_reference(
            doc, content=content, min_chunk=min_chunk, skip=skip,
            draw=lambda high, doc=doc: backfill_draw(21, doc, high))
        skipped += lost
        for enc, dec in zip(encoder, decoder):
            forced = [0] * (len(enc) - 1) + [int(len(enc) > len(dec))]
            # Ettin's decoder targets, and nothing at (or predicting) the forced [SEP].
            labels = _decoder_labels(dec) + [IGNORE] * (len(enc) - len(dec))
            expected.append((enc, forced, labels))
    found = _segments(rows)
    assert sorted(found) == sorted(expected)
    # Every encoder segment ends with [SEP]; the decoder never learns a forced one.
    assert all(enc[0] == CLS and enc[-1] == SEP and SEP not in enc[1:-1] for enc, _, _ in found)
    for enc, forced, labels in found:
        assert (SEP in labels) == (not forced[-1])
    # Nothing lost but the counted skips: content kept + skipped = documents + their [SEP]s.
    kept = sum(len(enc) - 1 - forced[-1] for enc, forced, _ in found)
    assert kept + stats[0].skipped_tokens == sum(len(d) + 1 for d in documents)
    assert stats[0].skipped_tokens == skipped and stats[0].documents == len(documents)
    assert stats[0].tokens == sum(len(d) for d in documents) and stats[0].chunks == len(found)


def test_ettin_chunking_on_crafted_documents():
    """Concrete expected cuts at Ettin's phase-1 sizes (rows of 1024: C = 1022, -m 512 -a 32)."""
    content, min_chunk, skip = chunk_sizes(1024)
    assert (content, min_chunk, skip) == (1022, 512, 32)
    assert chunk_sizes(8192) == (8190, 512, 32)  # phases 2 and 3: Ettin's sizes too
    assert chunk_sizes(64) == (62, 32, 2) and chunk_sizes(16) == (14, 8, 0)  # small rows
    C = content

    def split(length, moved=None):
        def draw(high):
            assert moved is not None, "no back-fill expected"
            assert high == moved[0]
            return moved[1]
        return ettin_split(length, content=C, min_chunk=min_chunk, skip=skip, draw=draw)

    # 2C + 10 tokens + [SEP]: the 11-token tail is dropped, [SEP] with it.
    cut = split(2 * C + 10)
    assert cut.spans == ((0, C), (C, 2 * C)) and cut.skipped == 11 and cut.backfilled == 0
    assert not cut.ends_document(1, 2 * C + 10)
    # 2C + 600: the 601-token tail (600 + [SEP]) is long enough: kept as it is.
    cut = split(2 * C + 600)
    assert cut.spans == ((0, C), (C, 2 * C), (2 * C, 2 * C + 601)) and cut.skipped == 0
    assert [cut.ends_document(i, 2 * C + 600) for i in range(3)] == [False, False, True]
    # C + 1: the tail is the last token and [SEP] (2 < 32): dropped.
    cut = split(C + 1)
    assert cut.spans == ((0, C),) and cut.skipped == 2
    # C: only [SEP] is left over: dropped, the document has no end marker (as in Ettin's data).
    assert split(C).spans == ((0, C),) and split(C).skipped == 1
    # C - 1 and shorter: one chunk, [SEP] included; a first chunk is never dropped.
    assert split(C - 1).spans == ((0, C),) and split(5).spans == ((0, 6),)
    assert split(0).spans == ((0, 1),) and split(0).ends_document(0, 0)
    # 2C + 100: the 101-token tail takes r in [0, C - 101) tokens from the chunk before it.
    cut = split(2 * C + 100, moved=(C - 101, 300))
    assert cut.spans == ((0, C), (C, 2 * C - 300), (2 * C - 300, 2 * C + 101))
    assert cut.backfilled == 300 and cut.skipped == 0
    assert split(2 * C + 100, moved=(C - 101, 0)).spans == ((0, C), (C, 2 * C), (2 * C, 2 * C + 101))


def test_backfill_draws_are_seeded_uniform_and_deterministic(rng):
    documents = [rng.integers(5, VOCAB, 50).astype(np.int32) for _ in range(4000)]
    draws = np.array([backfill_draw(21, d, 10) for d in documents])
    assert draws.min() == 0 and draws.max() == 9  # [0, high), as np.random.randint
    from scipy.stats import chisquare

    assert chisquare(np.bincount(draws, minlength=10)).pvalue > 1e-3
    assert all(backfill_draw(21, d, 10) == r for d, r in zip(documents[:50], draws))
    other = np.array([backfill_draw(22, d, 10) for d in documents[:200]])
    assert np.mean(other != draws[:200]) > 0.7  # the data seed matters


def test_bracketed_chunking_is_unchanged_by_default(rng):
    documents = [rng.integers(5, VOCAB, n).astype(np.int32) for n in (3, 40, 100)]
    rows = list(packed_rows(grain.MapDataset.source(documents), seq_len=32, special=PROJECT,
                            bins=2))
    assert FORCED_SEP not in rows[0]
    assert DataConfig().chunking == "bracketed" and DataConfig().mlm_masking == "exact"


# --- the pipeline: same rows, true ends, determinism, resume ----------------------------------


@pytest.fixture(scope="module")
def marked_corpus(tmp_path_factory):
    """Documents ending with "~" (used nowhere else), of lengths that are never a multiple of
    the content size 62 (so a document's [SEP] is never dropped alone)."""
    path = tmp_path_factory.mktemp("marked")
    rng = np.random.default_rng(5)
    for i in range(60):
        n = int(rng.choice([rng.integers(1, 60), rng.integers(60, 300)]))
        n += n % 62 == 61
        text = "".join(rng.choice(list("abcdefgh "), n)) + "~"
        (path / f"{i:02d}.txt").write_text(text)
    return path


def _ettin(corpus, **fields):
    return DataConfig(sources=(SourceConfig(str(corpus)),), chunking="ettin", **fields)


def _batches(data, objective, n=4, **kwargs):
    options = {"seq_len": 64, "global_batch_size": 4, "seed": 21, "objective": objective,
               "tokenizer": ByteTokenizer()}
    iterator = make_batch_iterator(data, **{**options, **kwargs})
    return [next(iterator) for _ in range(n)], iterator


def test_pipeline_decoder_learns_sep_only_at_true_ends(marked_corpus):
    tilde = ByteTokenizer().encode("~")[0]
    data = _ettin(marked_corpus, mlm_masking="bernoulli")
    clm, iterator = _batches(data, "clm", 10)
    mlm, _ = _batches(data, "mlm", 10)
    true_ends = forced = 0
    for c, m in zip(clm, mlm):
        assert sorted(c) == sorted(m) == ["input_ids", "labels", "positions", "segment_ids"]
        # The pair's contract: the same packed rows.
        np.testing.assert_array_equal(c["segment_ids"], m["segment_ids"])
        np.testing.assert_array_equal(c["positions"], m["positions"])
        original = np.where(m["labels"] != IGNORE, m["labels"], m["input_ids"])
        np.testing.assert_array_equal(original, c["input_ids"])
        for r in range(c["input_ids"].shape[0]):
            ids, segments, labels = c["input_ids"][r], c["segment_ids"][r], c["labels"][r]
            for s in range(1, segments.max() + 1):
                where = np.flatnonzero(segments == s)
                chunk, targets = ids[where], labels[where]
                assert chunk[0] == CLS and chunk[-1] == SEP  # the encoder's form, both members
                assert targets[-1] == IGNORE
                if chunk[-2] == tilde:  # a document's true end: predicted
                    assert targets[-2] == SEP
                    true_ends += 1
                else:  # a forced [SEP]: nothing predicts it
                    assert targets[-2] == IGNORE and SEP not in targets
                    forced += 1
    assert true_ends > 5 and forced > 5, (true_ends, forced)
    stats = iterator.chunk_stats()[str(marked_corpus)]
    assert stats.documents > 0 and stats.backfilled_chunks > 0


def test_pipeline_is_deterministic_and_resumes_bit_identically(marked_corpus):
    data = _ettin(marked_corpus, mlm_masking="bernoulli")
    first, _ = _batches(data, "mlm", 5)
    again, _ = _batches(data, "mlm", 5)
    for a, b in zip(first, again):
        for key in a:
            assert a[key].tobytes() == b[key].tobytes()
    _, partial = _batches(data, "mlm", 2)
    state = partial.get_state()
    _, resumed = _batches(data, "mlm", 0)
    resumed.set_state(state)
    for expected in first[2:]:
        actual = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(expected[key], actual[key])


def test_data_config_validates_the_new_fields():
    from ettin_jax.config import load_recipe

    for field, value in [("chunking", "packed"), ("mlm_masking", "random"),
                         ("min_chunk_tokens", 0), ("skip_chunk_tokens", -1)]:
        with pytest.raises(ValueError, match=field):
            DataConfig(**{field: value})
    recipe = load_recipe(TINY, ["data.chunking=ettin", "data.mlm_masking=bernoulli",
                                "data.min_chunk_tokens=256", "data.skip_chunk_tokens=16"])
    assert (recipe.data.chunking, recipe.data.mlm_masking) == ("ettin", "bernoulli")
    assert (recipe.data.min_chunk_tokens, recipe.data.skip_chunk_tokens) == (256, 16)


# --- Bernoulli masking against transformers' DataCollatorForLanguageModeling ------------------


def _hf_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {name: i for i, name in enumerate(names)}
    vocab.update({f"t{i}": i for i in range(len(names), VOCAB)})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]")
    assert [tokenizer.convert_tokens_to_ids(n) for n in names] == [
        PROJECT.pad, PROJECT.unk, PROJECT.cls, PROJECT.sep, PROJECT.mask]
    assert len(tokenizer) == VOCAB
    return tokenizer


def _rows(rng, rows, seq):
    """Rows of [CLS] random ids [SEP], right-padded to `seq` (ids 0 and segment 0)."""
    ids = np.zeros((rows, seq), np.int32)
    segments = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        n = int(rng.integers(seq // 2, seq + 1))
        ids[r, :n] = rng.integers(5, VOCAB, n)
        ids[r, 0], ids[r, n - 1] = CLS, SEP
        segments[r, :n] = 1
    return ids, segments


def _outcomes(ids, masked_ids, labels):
    """Per-row selected counts, the [MASK]/random/unchanged split, and the random ids."""
    selected = labels != IGNORE
    new = masked_ids[selected]
    orig = ids[selected]
    is_mask = new == MASK
    is_random = ~is_mask & (new != orig)
    split = [int(is_mask.sum()), int(is_random.sum()), int((~is_mask & ~is_random).sum())]
    return selected.sum(1), split, new[is_random]


def test_bernoulli_masking_matches_transformers_collator(rng):
    import torch
    from scipy.stats import binom, chi2_contingency, chisquare
    from transformers import DataCollatorForLanguageModeling

    rows, seq, p = 3000, 64, 0.3
    ids, segments = _rows(rng, rows, seq)
    eligible = (segments != 0) & (ids >= 5)
    ours = mlm_inputs(ids, segments, seed=7, step=3, rows=np.arange(rows), mask_ratio=p,
                      special=PROJECT, vocab_size=VOCAB, masking="bernoulli")
    # Special tokens and padding are never selected.
    assert np.all(ours["labels"][~eligible] == IGNORE)
    np.testing.assert_array_equal(ours["input_ids"][~eligible], ids[~eligible])

    torch.manual_seed(0)
    collator = DataCollatorForLanguageModeling(_hf_tokenizer(), mlm=True, mlm_probability=p,
                                               return_tensors="pt")
    lengths = segments.sum(1)
    hf = collator([{"input_ids": ids[r, :lengths[r]].tolist()} for r in range(rows)])
    hf_ids = np.zeros_like(ids)
    hf_labels = np.full_like(ids, IGNORE)
    hf_ids[:, :hf["input_ids"].shape[1]] = hf["input_ids"].numpy()
    hf_labels[:, :hf["labels"].shape[1]] = hf["labels"].numpy()
    hf_ids[segments == 0] = 0
    assert np.all(hf_labels[~eligible] == IGNORE)  # transformers' rule, the same

    our_counts, our_split, our_random = _outcomes(ids, ours["input_ids"], ours["labels"])
    hf_counts, hf_split, hf_random = _outcomes(ids, hf_ids, hf_labels)
    # Selected per row: Binomial(eligible, p) for both (rows of equal eligibility pooled).
    n_eligible = eligible.sum(1)
    for counts in (our_counts, hf_counts):
        z = (counts - p * n_eligible) / np.sqrt(n_eligible * p * (1 - p))
        assert abs(z.mean()) < 4 / np.sqrt(rows) and abs(z.std() - 1) < 0.05
        common = n_eligible == np.bincount(n_eligible).argmax()
        k = counts[common]
        expected = binom.pmf(np.arange(n_eligible[common][0] + 1), n_eligible[common][0], p)
        observed = np.bincount(k, minlength=len(expected))
        keep = expected * len(k) >= 5
        obs = np.append(observed[keep], observed[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum()) * len(k)
        assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4
    table = np.array([np.bincount(our_counts, minlength=seq + 1),
                      np.bincount(hf_counts, minlength=seq + 1)])
    table = table[:, table.sum(0) >= 10]  # the same rows on both sides: same distribution
    assert chi2_contingency(table).pvalue > 1e-4
    # 80 / 10 / 10 (a random id may equal the original or be [MASK]: rare, in both alike).
    total = sum(our_split)
    assert abs(our_split[0] / total - 0.8) < 0.01 and abs(our_split[1] / total - 0.1) < 0.01
    assert chi2_contingency([our_split, hf_split]).pvalue > 1e-4
    # Random ids: uniform over the whole vocabulary, specials included, as transformers'.
    for random_ids in (our_random, hf_random):
        histogram = np.bincount(random_ids // 30, minlength=VOCAB // 30)
        assert chisquare(histogram).pvalue > 1e-4
    assert np.any(our_random < 5) and np.any(hf_random < 5)
    assert chi2_contingency([np.bincount(our_random // 30, minlength=10),
                             np.bincount(hf_random // 30, minlength=10)]).pvalue > 1e-4


def test_bernoulli_masking_is_a_function_of_seed_step_and_row(rng):
    ids, segments = _rows(rng, 6, 48)

    def run(step, rows, sl=slice(None)):
        return mlm_inputs(ids[sl], segments[sl], seed=5, step=step, rows=rows, mask_ratio=0.3,
                          special=PROJECT, vocab_size=VOCAB, masking="bernoulli")

    base = run(3, np.arange(6))
    np.testing.assert_array_equal(run(3, np.arange(6))["input_ids"], base["input_ids"])
    part = run(3, np.arange(2, 6), slice(2, None))  # another process's rows
    np.testing.assert_array_equal(part["labels"], base["labels"][2:])
    np.testing.assert_array_equal(part["input_ids"], base["input_ids"][2:])
    assert not np.array_equal(run(4, np.arange(6))["labels"], base["labels"])


# --- held-out evaluation at 15% -----------------------------------------------------------------


def test_heldout_mlm_batches_mask_15_percent_whatever_the_phase(monkeypatch):
    import jax

    from ettin_jax.config import load_recipe
    from ettin_jax.config.schema import MeshConfig
    from ettin_jax.training import evaluation
    from ettin_jax.training.mesh import make_mesh

    recipe = load_recipe(TINY, ["train.seq_len=64", "train.global_batch_size=8",
                                "data.mlm_mask_ratio=0.3"])
    assert recipe.data.mlm_mask_ratio == 0.3
    batches = evaluation.heldout_batches(recipe, "mlm", ByteTokenizer(), batches=2)
    for batch in batches:
        eligible = (batch["segment_ids"] != 0) & (batch["input_ids"] >= 5) | (
            batch["labels"] != IGNORE)
        np.testing.assert_array_equal((batch["labels"] != IGNORE).sum(1),
                                      np.round(0.15 * eligible.sum(1)))
    # The eval step's sparse head is sized for 15% too.
    seen = {}

    def fake_eval_step(graph, **kwargs):
        seen.update(kwargs)
        return lambda params, batch: {}

    monkeypatch.setattr(evaluation, "make_eval_step", fake_eval_step)
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    evaluation.make_evaluator(recipe, "mlm", ByteTokenizer(), mesh, {}, batches=1)
    assert seen["mlm_mask_ratio"] == evaluation.EVAL_MLM_MASK_RATIO == 0.15


# --- mixture weights are token shares -----------------------------------------------------------


def _write_source(path, rng, count, low, high, letter):
    path.mkdir()
    for i in range(count):
        (path / f"{i:03d}.txt").write_text(letter * int(rng.integers(low, high)))
    return path


def test_mixture_weights_are_token_shares(tmp_path, rng):
    tokenizer = ByteTokenizer()
    short = _write_source(tmp_path / "short", rng, 300, 5, 16, "s")
    long = _write_source(tmp_path / "long", rng, 200, 300, 701, "l")
    opened = [open_source(SourceConfig(str(short), weight=0.7), tokenizer),
              open_source(SourceConfig(str(long), weight=0.3), tokenizer)]
    mixed = mixture(opened, seed=3)
    tokens = np.zeros(2)
    for i in range(40_000):
        record = mixed[i]
        tokens[record["source"]] += len(record["tokens"])
    shares = tokens / tokens.sum()
    assert abs(shares[0] - 0.7) < 0.01, shares  # by documents it would be about 0.03


# The % columns of the data table of Ettin's paper and repository (assets/training_data.jpg):
# each component's share of a phase's tokens, rounded as printed there.
ETTIN_SHARES = {
    "pretrain": {"dclm": 49.1, "cc-head": 20.9, "starcoder": 15.5, "reddit": 4.7, "pes2o": 3.4,
                 "arxiv": 1.6, "stackexchange": 1.1, "tulu-flan": 1.0, "open-web-math": 0.7,
                 "algebraic-stackexchange": 0.7, "cc-news": 0.4, "wikipedia": 0.4, "books": 0.3},
    "extension": {"dclm-dolmino": 70.4, "starcoder": 15.4, "math-dolmino": 4.2, "pes2o": 3.3,
                  "reddit": 2.5, "arxiv": 1.6, "stackexchange-dolmino": 1.1, "tulu-flan": 1.0,
                  "books": 0.3, "wikipedia": 0.2},
    "decay": {"dclm-dolmino": 34.1, "code-repos": 26.5, "books": 13.8, "math-dolmino": 6.6,
              "tulu-flan": 5.4, "stackexchange-dolmino": 5.2, "arxiv": 3.9, "wikipedia": 3.9,
              "textbooks": 0.7},
}


def _mixture_shares(sources) -> dict[str, float]:
    """{component: % of the weights} of a phase's sources named data/ettin/<phase>/<component>."""
    total = sum(source.weight for source in sources)
    return {Path(source.path).name: 100 * source.weight / total for source in sources}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("ettin-*")))
def test_ettin_recipes_name_the_mixture_components_with_their_token_shares(recipe):
    from ettin_jax.config import load_recipe

    phases = load_recipe(ROOT / "recipes" / recipe).run_phases()
    names = ["decay"] if len(phases) == 1 else ["pretrain", "extension", "decay"]
    for name, phase in zip(names, phases):
        assert {Path(s.path).parent.name for s in phase.data.sources} == {name}
        shares = _mixture_shares(phase.data.sources)
        assert shares.keys() == ETTIN_SHARES[name].keys()
        for component, share in shares.items():
            assert share == pytest.approx(ETTIN_SHARES[name][component], abs=0.051), component


def test_the_decay_mixture_gets_its_token_shares(tmp_path, rng):
    """Ettin's decay mixture (the weights of recipes/ettin-150m.yaml) over components whose
    documents differ in length by up to 40x: over 6,000 documents every component gets its
    share of the tokens within one percentage point."""
    from ettin_jax.config import load_recipe

    sources = load_recipe(ROOT / "recipes" / "ettin-150m.yaml").run_phases()[2].data.sources
    tokenizer = ByteTokenizer()
    opened = []
    for index, source in enumerate(sources):
        low = int(rng.integers(5, 60))
        path = _write_source(tmp_path / Path(source.path).name, rng, 40, low,
                             low * int(rng.integers(2, 6)), "abcdefghi"[index])
        opened.append(open_source(SourceConfig(str(path), weight=source.weight), tokenizer))
    mixed = mixture(opened, seed=int(rng.integers(1 << 30)))
    tokens = np.zeros(len(sources))
    for i in range(6_000):
        record = mixed[i]
        tokens[record["source"]] += len(record["tokens"])
    realised = 100 * tokens / tokens.sum()
    expected = _mixture_shares(sources)
    errors = [share - expected[Path(source.path).name] for source, share in zip(sources, realised)]
    assert max(map(abs, errors)) < 1.0, errors


def test_mean_document_tokens_of_memory_and_prepared_sources(tmp_path, rng, monkeypatch):
    from data_pipelines import sources as sources_module
    from data_pipelines.prepare import prepare

    tokenizer = ByteTokenizer()
    path = _write_source(tmp_path / "docs", rng, 40, 10, 200, "x")
    exact = np.mean([len(p.read_text()) for p in path.iterdir()])
    assert open_source(SourceConfig(str(path)), tokenizer).mean_tokens() == pytest.approx(exact)
    # More documents than the sample: characters of all, tokens per character of a sample.
    monkeypatch.setattr(sources_module, "LENGTH_SAMPLE_DOCUMENTS", 8)
    assert open_source(SourceConfig(str(path)), tokenizer).mean_tokens() == pytest.approx(exact)
    manifest = prepare([SourceConfig(str(path))], tokenizer, tmp_path / "p", workers=1,
                       progress=False)
    prepared = open_source(SourceConfig(str(tmp_path / "p")), tokenizer)
    assert prepared.mean_tokens() == manifest["tokens"] / manifest["documents"]


def test_batch_iterator_reports_token_shares(tmp_path, rng):
    short = _write_source(tmp_path / "short", rng, 100, 5, 16, "s")
    long = _write_source(tmp_path / "long", rng, 100, 100, 201, "l")
    data = DataConfig(sources=(SourceConfig(str(short), weight=0.5),
                               SourceConfig(str(long), weight=0.5)), chunking="ettin")
    _, iterator = _batches(data, "clm", 30)
    shares = iterator.token_shares()
    assert set(shares) == {str(short), str(long)} and abs(shares[str(short)] - 0.5) < 0.1
    from data_pipelines.inspection import source_summary

    text = source_summary(iterator)
    assert str(short) in text and "token share" in text and "skipped" in text


# --- Ettin's published training order -----------------------------------------------------------


def test_a_published_order_is_replayed_in_order_row_by_row(tmp_path, rng):
    """`ettin-data-order`'s layout (phase folders of Parquet files with `input_ids`, bracketed,
    and `step`) read with `shuffle: false`, directly and through `data prepare`: batch k, row j
    is sample k * B + j when every sample fills a row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.prepare import prepare

    seq, rows = 24, 4
    samples = [rng.integers(5, 261, seq - 2) for _ in range(6 * rows)]
    for folder, first in (("checkpoint_000001", 0), ("checkpoint_000002", 3 * rows)):
        (tmp_path / "order" / folder).mkdir(parents=True)
        part = samples[first:first + 3 * rows]
        pq.write_table(pa.table({
            "input_ids": pa.array([[CLS, *s, SEP] for s in part], pa.list_(pa.uint32())),
            "step": [first // rows + i // rows + 1 for i in range(len(part))]}),
            tmp_path / "order" / folder / "steps_000001_to_000003.parquet", row_group_size=5)
    tokenizer = ByteTokenizer()
    order = str(tmp_path / "order" / "checkpoint_*" / "*.parquet")
    prepared = prepare([SourceConfig(order, field="input_ids")], tokenizer,
                       tmp_path / "prepared", workers=1, progress=False)
    # How training orders a source is not a setting of its preparation: the same one.
    assert prepare([SourceConfig(order, field="input_ids", shuffle=False)], tokenizer,
                   tmp_path / "prepared", workers=1, progress=False) == prepared
    for path in (order, str(tmp_path / "prepared")):
        source = SourceConfig(path, field="input_ids", shuffle=False)
        batches = make_batch_iterator(DataConfig(sources=(source,)), seq_len=seq,
                                      global_batch_size=rows, seed=5, objective="clm",
                                      tokenizer=tokenizer)
        for k in range(len(samples) // rows + 2):  # then the second epoch, in the same order
            batch = next(batches)
            for j in range(rows):
                expected = [CLS, *samples[(k * rows + j) % len(samples)], SEP]
                np.testing.assert_array_equal(batch["input_ids"][j], expected, f"{path} {k} {j}")
    shuffled = make_batch_iterator(DataConfig(sources=(SourceConfig(order, field="input_ids"),)),
                                   seq_len=seq, global_batch_size=rows, seed=5, objective="clm",
                                   tokenizer=tokenizer)
    assert not np.array_equal(next(shuffled)["input_ids"][0], [CLS, *samples[0], SEP])
