# Two commands: `make demo` and `make test`. Both create .venv on first use and install the
# pinned stack (CPU or CUDA build of FBGEMM, whichever this machine can run).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
GPUS := $(if $(HAS_CUDA),$(shell nvidia-smi -L | wc -l),0)
FBGEMM := $(if $(HAS_CUDA),fbgemm-gpu==1.8.0,fbgemm-gpu-cpu==1.8.0)
# The demo runs 2 processes: on 2 GPUs when there are, else on the CPU (gloo).
NPROC := $(if $(HAS_CUDA),$(shell echo $$(( $(GPUS) < 2 ? $(GPUS) : 2 ))),2)
GPU_FLAG := $(if $(HAS_CUDA),--gpu $(NPROC),)

DEMO_DATA := data/taobao_synth
DEMO_CONFIG := configs/aitm_taobao.yaml
BEST_CONFIG := configs/aitm_taobao_best.yaml
# A short run of the seed's config: 300 steps of 1024 rows per rank (the seed's batch is 4096),
# scored; then the same run of the best config (the seed's plus the options the study kept).

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt $(FBGEMM)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[bench,test]"
	touch $@

$(DEMO_DATA)/_SUCCESS: | $(STAMP)
	$(PY) -m datasets.synthetic --out $(DEMO_DATA) --rows 400000 --eval-rows 100000

demo: $(STAMP) $(DEMO_DATA)/_SUCCESS
	torchx run dist.ddp -j 1x$(NPROC) $(GPU_FLAG) launch/train.py --config $(DEMO_CONFIG) --no-resume \
	    data_config.batch_size=1024
	torchx run dist.ddp -j 1x$(NPROC) $(GPU_FLAG) launch/score.py --config $(DEMO_CONFIG) \
	    --output runs/aitm_taobao/scores --metrics --overwrite
	torchx run dist.ddp -j 1x$(NPROC) $(GPU_FLAG) launch/train.py --config $(BEST_CONFIG) --no-resume \
	    data_config.batch_size=1024
	@echo "== $(DEMO_CONFIG), the seed's example =="
	@$(PY) -m launch.report runs/aitm_taobao/summary.json --scores runs/aitm_taobao/scores
	@echo "== $(BEST_CONFIG), the seed's plus the options the study kept =="
	@$(PY) -m launch.report runs/aitm_taobao_best/summary.json

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf runs $(DEMO_DATA)
