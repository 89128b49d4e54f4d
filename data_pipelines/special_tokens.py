"""The special tokens of a vocabulary, and the two layouts ettin-jax knows.

Ettin uses [CLS] as BOS and [SEP] as EOS: every document chunk is bracketed [CLS] ... [SEP].
Tokenizers trained by ettin-jax put the specials first (`PROJECT`); the ModernBERT/Ettin BPE
vocabulary has them at the end (`MODERNBERT`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. `mask` and `unk` are None when a checkpoint does not say."""

    pad: int
    cls: int
    sep: int
    mask: int | None = None
    unk: int | None = None

    @property
    def bos(self) -> int:
        """Beginning of a document: [CLS]."""
        return self.cls

    @property
    def eos(self) -> int:
        """End of a document: [SEP]."""
        return self.sep

    def as_dict(self) -> dict[str, int | None]:
        """{"pad": ..., "cls": ..., "sep": ..., "mask": ..., "unk": ...}."""
        return dataclasses.asdict(self)

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError naming the first id outside [0, vocab_size)."""
        for name, value in self.as_dict().items():
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"special token {name} id {value} is outside the vocabulary "
                                 f"[0, {vocab_size})")


PROJECT = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
MODERNBERT = SpecialTokens(pad=50283, unk=50280, cls=50281, sep=50282, mask=50284)


def with_special_tokens(first: Sequence[int], second: Sequence[int] | None,
                        specials: SpecialTokens, *, objective: str) -> np.ndarray:
    """The ids a member is given for one text (`first`) or a text pair, as training presents
    documents and as exported tokenizers add them (the one place this template lives):
    encoder ("mlm") [CLS] A [SEP] and [CLS] A [SEP] B [SEP]; decoder ("clm") [CLS] A and
    [CLS] A [SEP] B (no closing [SEP]: a prompt continues). Returns int32 ids.

    The decoder's single text follows Ettin's published decoders: through transformers,
    jhu-clsp/ettin-decoder-* tokenizers prepend [CLS] as BOS and append no [SEP]
    (huggingface/tokenizers#1828; the authors wanted "the BOS token always ... [but not] the
    EOS token", transformers#35946), although the raw tokenizer.json still appends [SEP]. No
    published source shows their pair layout; [SEP] between the texts is ours."""
    if objective not in ("mlm", "clm"):
        raise ValueError(f"objective must be 'mlm' or 'clm', got {objective!r}")
    parts: list[Sequence[int]] = [[specials.cls], first]
    if second is not None:
        parts += [[specials.sep], second]
    if objective == "mlm":
        parts.append([specials.sep])
    return np.concatenate([np.asarray(p, np.int64) for p in parts]).astype(np.int32)
