"""lm-evaluation-harness tasks that need no download, built from the bundled corpus's held-out
plays (data_pipelines/corpus): the task YAMLs of this folder, their datasets made by
`ettin_jax.lm_eval_tasks.bundled` (lm-eval's `custom_dataset: !function`).

- `bundled_next_line` (multiple choice, acc and acc_norm): three consecutive lines of a speech
  from Macbeth or Twelfth Night, then the true next line among four; the three distractors are
  lines of the same play from elsewhere. 400 examples; chance 1/4.
- `bundled_perplexity` (loglikelihood_rolling: word_perplexity, byte_perplexity,
  bits_per_byte): 100 passages of the same two plays.

Both have the tag `bundled_corpus` (`--tasks bundled_corpus` runs the two). lm-eval finds them
through its include path: `ettin-jax lm-eval` adds this folder itself; in Python,
`ettin_jax.lm_harness.task_manager()` or `lm_eval.tasks.TaskManager(include_path=TASKS_DIR)`.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
NEXT_LINE_TASK = "bundled_next_line"
PERPLEXITY_TASK = "bundled_perplexity"
TAG = "bundled_corpus"
