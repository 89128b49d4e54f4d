"""A real prepared TFDS copy of GLUE, offline: GLUE's own TSV layouts for every task, turned
into glue/<task> by TFDS's GLUE builder (a fake download manager hands it local folders), so the
preparation and its parsing are TFDS's. Used by the `glue_dir` fixture (conftest.py)."""

from __future__ import annotations

import os
import zlib

import numpy as np

from ettin_jax.finetune.tasks import GLUE_TASKS, TaskSpec

WORDS = ("the", "king", "a", "fool", "sword", "love", "night", "crown", "jest", "storm",
         "is", "was", "not", "Rome", "café", "naïve", "'quoted'", "it's")


def sentence(rng, low=1, high=9) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high))))


# --- GLUE from a prepared TFDS copy ------------------------------------------------------------
# GLUE's own TSV files per task: (folder, file per split, header, row(text, pair, label)).
# TFDS's GLUE builder turns them into glue/<task>; the fake download manager hands it these
# folders instead of downloading, so the preparation and its parsing are TFDS's.
_MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"]
_GLUE_TSV = {
    "cola": ("CoLA", None, lambda t, p, y: ["gj04", y, "", t]),
    "sst2": ("SST-2", ["sentence", "label"], lambda t, p, y: [t, y]),
    "qqp": ("QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda t, p, y: ["7", "1", "2", t, p, y]),
    "stsb": ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                       "sentence1", "sentence2", "score"],
             lambda t, p, y: ["0", "news", "f", "2012", "0", "s", "s", t, p, y]),
    "mnli": ("MNLI", _MNLI_HEADER, lambda t, p, y: ["0", "1", "1e", "fiction", t, p, y]),
    "qnli": ("QNLI", ["index", "question", "sentence", "label"], lambda t, p, y: ["0", t, p, y]),
    "rte": ("RTE", ["index", "sentence1", "sentence2", "label"], lambda t, p, y: ["0", t, p, y]),
}
_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv"}


def _glue_label_text(task: str, spec: TaskSpec, rng) -> tuple[str, int | float]:
    """A label as GLUE's TSV writes it and the value the task should read."""
    if spec.labels is None:
        value = round(float(rng.uniform(0, 5)), 3)
        return f"{value:.3f}", value
    index = int(rng.integers(0, len(spec.labels)))
    if task in ("mnli", "qnli", "rte"):
        return spec.labels[index], index  # names
    return str(index), index  # 0/1


def _write_glue(root, task: str, rng) -> dict[str, list[tuple]]:
    spec = GLUE_TASKS[task]
    expected = {}
    if task == "mrpc":
        # MRPC comes from Microsoft's files: train (BOM + header) holds train and dev rows,
        # the dev ids pick the dev ones.
        header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
        rows, dev_ids = [], []
        expected = {"train": [], "validation": []}
        for n in range(12):
            text, pair = sentence(rng), sentence(rng)
            label = int(rng.integers(0, 2))
            rows.append(f"{label}\t{100 + n}\t{200 + n}\t{text}\t{pair}")
            split = "validation" if n % 3 == 0 else "train"
            if split == "validation":
                dev_ids.append(f"{100 + n}\t{200 + n}")
            expected[split].append((text, pair, label))
        (root / "mrpc_train.tsv").write_bytes(("\ufeff" + header + "\n"
                                               + "\n".join(rows) + "\n").encode("utf-8"))
        (root / "mrpc_dev_ids.tsv").write_text("\n".join(dev_ids) + "\n")
        (root / "mrpc_test.tsv").write_text(header + "\n0\t1\t2\ta\tb\n")
        return expected
    folder, header, row = _GLUE_TSV[task]
    directory = root / folder
    directory.mkdir()
    for split in ("train", *spec.eval_splits):
        lines = [] if header is None else ["\t".join(header)]
        expected[split] = []
        for _ in range(int(rng.integers(3, 8))):
            text = sentence(rng)
            pair = sentence(rng) if spec.pair_field else None
            label_text, label = _glue_label_text(task, spec, rng)
            lines.append("\t".join(row(text, pair, label_text)))
            expected[split].append((text, pair, label))
        (directory / _SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")
    # Unlabelled test files, as GLUE ships them.
    test_header = ["index", "sentence1", "sentence2"] if task == "mnli" else \
        ["index", spec.text_field] + ([spec.pair_field] if spec.pair_field else [])
    test_row = "\t".join(["0"] + ["some text"] * (len(test_header) - 1))
    tests = ("test_matched.tsv", "test_mismatched.tsv") if task == "mnli" else ("test.tsv",)
    for name in tests:
        (directory / name).write_text("\t".join(test_header) + "\n" + test_row + "\n")
    return expected


def prepare_glue_copy(root):
    """A TFDS data_dir under `root` holding glue/<task> for the eight presets, prepared by
    TFDS's GLUE builder (array_record) from tiny GLUE-layout files; and what each split
    holds: (data_dir, {task: {split: [(text, pair, label)]}})."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.text import glue

    class OfflineGlue(glue.Glue, skip_registration=True):
        name = "glue"  # prepared as glue/<config>, read back by TFDS's registered builder

        def __init__(self, *, local_dir: str, **kwargs):
            self._local_dir = local_dir
            super().__init__(**kwargs)

        def _split_generators(self, dl_manager):
            local = self._local_dir

            class Downloads:
                def download_and_extract(self, url):
                    return local

                def download(self, urls):
                    return {key: os.path.join(local, f"mrpc_{key}.tsv") for key in urls}

            return super()._split_generators(Downloads())

    rng = np.random.default_rng(zlib.crc32(b"glue_dir"))
    data_dir = root / "tfds"
    expected = {}
    for task in GLUE_TASKS:
        source = root / "raw" / task
        source.mkdir(parents=True)
        expected[task] = _write_glue(source, task, rng)
        OfflineGlue(local_dir=str(source), config=task, data_dir=str(data_dir),
                    file_format="array_record").download_and_prepare()
    assert tfds.builder("glue/cola", data_dir=str(data_dir)).is_prepared()
    return data_dir, expected


