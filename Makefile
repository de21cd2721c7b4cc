# `make demo`: virtual environment, install, quick-start, then a second task
# started from the first task's prompt (SPoT-style transfer), and a summary.
# `make test`: install the test extras and run the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_runs
SOURCE_TASK := synthetic_majority_yesno
TARGET_TASK := synthetic_majority_truefalse
DEMO_STEPS ?= 300
PYTEST_ARGS ?= -n 2

.PHONY: venv demo test clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/t5x train --gin_file=runs/quickstart.gin --gin.MODEL_DIR=\"$(DEMO_DIR)/source\" \
	  --gin.MIXTURE_OR_TASK_NAME=\"$(SOURCE_TASK)\" --gin.TRAIN_STEPS=$(DEMO_STEPS)
	$(BIN)/t5x train --gin_file=runs/quickstart.gin --gin_file=prompts/from_file.gin \
	  --gin.MODEL_DIR=\"$(DEMO_DIR)/target_from_source\" \
	  --gin.MIXTURE_OR_TASK_NAME=\"$(TARGET_TASK)\" --gin.TRAIN_STEPS=$(DEMO_STEPS) \
	  --gin.PROMPT_FILE=\"$(DEMO_DIR)/source/numpy_checkpoints/checkpoint_$(DEMO_STEPS)/encoder.prompt.prompt.prompt\"
	$(BIN)/t5x train --gin_file=runs/quickstart.gin --gin.MODEL_DIR=\"$(DEMO_DIR)/target_from_scratch\" \
	  --gin.MIXTURE_OR_TASK_NAME=\"$(TARGET_TASK)\" --gin.TRAIN_STEPS=$(DEMO_STEPS)
	$(BIN)/t5x curves $(DEMO_DIR)/source $(DEMO_DIR)/target_from_source \
	  $(DEMO_DIR)/target_from_scratch --png $(DEMO_DIR)/curves.png

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
