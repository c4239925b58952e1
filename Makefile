VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup test lint demo demo-finetune demo-umt demo-probe bench flops gpu-check clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) uninstall -y -q decord  # decord 0.6.0 and decord2 install the same package folder
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv and install everything

test: setup  ## the whole test suite (CPU)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -ra tests

lint: setup
	$(VENV)/bin/ruff check .

demo: setup  ## end-to-end: videos -> shards -> ZeRO-3 pretraining -> resume -> export
	bash scripts/demo.sh

demo-finetune: setup  ## progressive path: labelled clips -> pretrain -> fine-tune -> eval -> distil -> extract -> HF
	bash scripts/demo_finetune.sh

demo-umt: setup  ## UMT: tiny CLIP teacher (OpenAI layout) -> ZeRO pretraining -> resume -> export -> fine-tune
	bash scripts/demo_umt.sh

demo-probe: setup  ## motion clips -> MAE pretraining with the in-run probe -> vmae-probe: pretrained vs random init
	bash scripts/demo_probe.sh

bench: setup  ## CPU-sized benchmark suite
	$(PY) -m benchmarks --preset cpu --out reports/bench

gpu-check:  ## GPU checks in one command (exits 2 without CUDA); wheels from .whl (../shared/gpu/make_wheelhouse.sh)
	bash scripts/gpu_check.sh

flops: setup  ## analytic FLOPs table, all sizes, encoder-only vs dual
	$(PY) -m vmae_ds.flops_cli

clean:
	rm -rf $(VENV) runs reports demo_out demo_ft_out demo_umt_out demo_probe_out
