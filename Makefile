# Two commands on a fresh machine: `make demo` and `make test`. Both install first, from the
# committed lock (requirements.lock: the exact version of every package the tests passed with);
# `make lock` refreshes it from the newest versions setup.cfg allows.
VENV := .venv
PY := $(VENV)/bin/python
ETTIN := $(VENV)/bin/ettin-jax
STAMP := $(VENV)/.installed
LOCK := requirements.lock
DEMO := runs/demo
# The demo runs on CPU (JAX would otherwise probe for the TPU runtime the `tpu` extra installs).
DEMO_ENV := JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu}

.PHONY: install lock demo demo-data test bench clean

install: $(STAMP)

# PIP_CONSTRAINT also holds pip's build environments (setuptools) to the lock.
$(STAMP): setup.cfg pyproject.toml $(LOCK) requirements-nodeps.txt
	python3 -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(PY) -m pip install --quiet --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(PY) -m pip install --quiet -e '.[test,tpu]'
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# Resolve setup.cfg's requirements afresh in a scratch environment and record every version.
lock:
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install --quiet '.[test,tpu]'
	{ echo "# Exact versions \`make install\` and CI install (pip constraints). Refresh: make lock."; \
	  echo "# Resolved on Linux x86_64, Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())')."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude ettin-jax; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv build *.egg-info

# The bundled corpus, prepared: a tokenizer, then ArrayRecord shards of the train and held-out
# splits (rerunning skips what is done; `data prepare` resumes an interrupted run).
$(DEMO)/tokenizer/tokenizer.model: $(STAMP)
	$(DEMO_ENV) $(ETTIN) tokenizer train --vocab-size 1024 --out $(DEMO)/tokenizer

$(DEMO)/data/manifest.json: $(DEMO)/tokenizer/tokenizer.model
	$(DEMO_ENV) $(ETTIN) data prepare bundled --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data
	$(DEMO_ENV) $(ETTIN) data prepare bundled:heldout --tokenizer $(DEMO)/tokenizer \
	    --out $(DEMO)/heldout

demo-data: $(DEMO)/data/manifest.json

# The main job: the tiny pair through Ettin's three phases (resumes if interrupted), then
# everything a user does with a trained pair.
demo: $(DEMO)/data/manifest.json
	@echo "== train the tiny encoder and decoder: pretrain -> extension -> decay"
	$(DEMO_ENV) $(ETTIN) train recipes/tiny.yaml --run-dir $(DEMO)
	@echo "== evaluate both on the held-out split"
	$(DEMO_ENV) $(ETTIN) eval $(DEMO)
	@echo "== export both to HuggingFace transformers, plot the curves"
	$(DEMO_ENV) $(ETTIN) export $(DEMO)
	$(DEMO_ENV) $(ETTIN) plot $(DEMO)
	@echo "== the encoder fills in a mask, the decoder continues a prompt"
	$(DEMO_ENV) $(ETTIN) fill-mask $(DEMO) "    def __init__([MASK], name):"
	$(DEMO_ENV) $(ETTIN) generate $(DEMO) "class Parser(object):" --max-new-tokens 48 \
	    --temperature 0.7 --top-p 0.9
	@echo "== fine-tune both on the bundled task: comedy, history or tragedy? (chance 1/3)"
	$(DEMO_ENV) $(ETTIN) finetune $(DEMO) --task bundled-genre
	@echo "== fine-tune both as bi-encoders: a docstring finds its function's code (chance nDCG@10 ~0.01)"
	$(DEMO_ENV) $(ETTIN) finetune $(DEMO) --task retrieval:bundled-code-search
	@echo "== zero-shot with lm-eval, offline: the next line of a held-out play among 4 (chance 1/4), bits per byte"
	$(DEMO_ENV) $(ETTIN) lm-eval --model ettin-jax --model_args path=$(DEMO),member=encoder \
	    --tasks bundled_corpus --batch_size 64 --output_path $(DEMO)/lm_eval/encoder
	$(DEMO_ENV) $(ETTIN) lm-eval --model ettin-jax --model_args path=$(DEMO),member=decoder \
	    --tasks bundled_corpus --batch_size 64 --output_path $(DEMO)/lm_eval/decoder
	@echo "== encoder vs decoder, side by side"
	$(DEMO_ENV) $(ETTIN) compare $(DEMO)
	@echo "== where everything is"
	@echo "recipe as run:    $(DEMO)/recipe.yaml"
	@echo "checkpoints:      $(DEMO)/encoder/checkpoints, $(DEMO)/decoder/checkpoints"
	@echo "metrics:          $(DEMO)/encoder/metrics.jsonl, $(DEMO)/decoder/metrics.jsonl (+ TensorBoard events/)"
	@echo "HuggingFace dirs: $(DEMO)/encoder/hf, $(DEMO)/decoder/hf"
	@echo "plot:             $(DEMO)/plots/training.png"
	@echo "fine-tuning:      $(DEMO)/finetune/{bundled-genre,bundled-code-search}/{encoder,decoder}/seed0 (+ summary.json)"
	@echo "zero-shot:        $(DEMO)/lm_eval/{encoder,decoder}/*/results_*.json"
	@echo "comparison:       $(DEMO)/report/report.md, $(DEMO)/report/report.png"

test: install
	$(PY) -m pytest -q

# The accelerator tables of docs/benchmarks.md in under 8 minutes on a GPU or TPU (attention per
# implementation; ettin-150m and ettin-1b train steps), written into its "Accelerator" section.
# Without an accelerator: a tiny CPU version of the same code paths, as an example.
bench: install
	$(PY) benchmarks/accelerator.py --write

clean:
	rm -rf $(VENV) build *.egg-info
