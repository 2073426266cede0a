# One entry point per job. `make demo` and `make test` are the README's quickstart.
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
RUN   ?= runs/digits
EPOCHS ?= 10
ARTIFACTS ?= artifacts/digits
PORT  ?= 3000

.PHONY: setup demo serve test test-all models export gpu-check clean

setup: $(VENV)/.installed                ## create .venv with the CPU stack, Ray Data and test tools

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[cpu,dev,ray]'
	touch $@

serve: setup                             ## the main job: build the digits artifacts if missing, then serve them over HTTP
	@if [ ! -f $(ARTIFACTS)/manifest.json ]; then $(MAKE) --no-print-directory demo; fi
	@echo "== serving $(ARTIFACTS) on http://localhost:$(PORT)  (try: curl -F image=@photo.jpg localhost:$(PORT)/classify)"
	RESDEPLOY_ARTIFACTS=$(ARTIFACTS) $(BIN)/bentoml serve serving.service:Classifier --port $(PORT)

demo: setup                              ## train (if needed), evaluate and export the default digits ResNet-20
	@echo "== train, evaluate and export ResNet-20 on the embedded digits"
	@if [ -f $(RUN)/best.pt ]; then echo "== $(RUN)/best.pt exists; skipping training (make clean to retrain)"; \
	else $(BIN)/resdeploy train --arch resnet20 --dataset digits --epochs $(EPOCHS) --out $(RUN); fi
	$(BIN)/resdeploy eval $(RUN)/best.pt --dataset digits --tta center --json $(RUN)/eval-center.json
	$(BIN)/resdeploy eval $(RUN)/best.pt --dataset digits --tta ten_crop --json $(RUN)/eval-ten_crop.json
	$(BIN)/resdeploy export $(RUN)/best.pt --out $(ARTIFACTS) --calib-data digits

export: setup                            ## export RUN/best.pt: every flavour (fp32, fp16, both int8 forms) behind the accuracy gate
	$(BIN)/resdeploy export $(RUN)/best.pt --out $(ARTIFACTS) --calib-data digits

gpu-check:                               ## on a GPU host with '.[gpu]': TensorRT vs ONNX Runtime on ARTIFACTS
	$(BIN)/python -m bench.gpu_check $(ARTIFACTS)

models: setup                            ## list architectures, parameters, GFLOPs
	$(BIN)/resdeploy models

test: setup                              ## the default test suite (what CI runs)
	$(BIN)/pytest

test-all: setup                          ## also the slow tests
	$(BIN)/pytest -m "slow or not slow"

clean:
	rm -rf runs/digits artifacts/digits .pytest_cache
