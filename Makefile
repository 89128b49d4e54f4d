# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
VENV := .venv
PY := $(VENV)/bin/python
ETTIN := $(VENV)/bin/ettin-jax
STAMP := $(VENV)/.installed
DEMO := runs/demo
# The demo runs on CPU (JAX would otherwise probe for the TPU runtime the `tpu` extra installs).
DEMO_ENV := JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu}

.PHONY: install demo demo-data test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tpu]'
	touch $(STAMP)

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
	@echo "== where everything is"
	@echo "recipe as run:    $(DEMO)/recipe.yaml"
	@echo "checkpoints:      $(DEMO)/encoder/checkpoints, $(DEMO)/decoder/checkpoints"
	@echo "metrics:          $(DEMO)/encoder/metrics.jsonl, $(DEMO)/decoder/metrics.jsonl (+ TensorBoard events/)"
	@echo "HuggingFace dirs: $(DEMO)/encoder/hf, $(DEMO)/decoder/hf"
	@echo "plot:             $(DEMO)/plots/training.png"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
