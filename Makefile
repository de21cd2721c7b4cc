# `make demo`: virtual environment, install, quick-start, then a second task
# started from the first task's prompt (SPoT-style transfer) and from scratch,
# evaluated every 10 steps, and a comparison (zero-shot score, mean score,
# steps to a threshold) with the curves as a PNG.
# `make test`: install the test extras and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_runs
# Same rule and answer words (less/more), other phrasing; neither task nor its
# words were in the tiny model's pretraining (tasks/synthetic.py).
SOURCE_TASK := synthetic_majority_count
TARGET_TASK := synthetic_majority_tally
DEMO_STEPS ?= 300
TARGET_STEPS ?= 100
TARGET_FLAGS = --gin.MIXTURE_OR_TASK_NAME=\"$(TARGET_TASK)\" --gin.TRAIN_STEPS=$(TARGET_STEPS) \
  --gin.train.eval_period=10
# loadfile: a module's tests on one worker, so its module-scoped fixtures (trained
# prompts, reference runs) are built once, not once per worker.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: venv demo test clean constraints

# constraints.txt: the exact versions the suite passed with (CI installs the same).
$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/t5x train --gin_file=runs/quickstart.gin --gin.MODEL_DIR=\"$(DEMO_DIR)/source\" \
	  --gin.MIXTURE_OR_TASK_NAME=\"$(SOURCE_TASK)\" --gin.TRAIN_STEPS=$(DEMO_STEPS) \
	  --gin.train.eval_period=50
	$(BIN)/t5x train --gin_file=runs/quickstart.gin --gin_file=prompts/from_file.gin \
	  --gin.MODEL_DIR=\"$(DEMO_DIR)/target_from_source\" $(TARGET_FLAGS) \
	  --gin.PROMPT_FILE=\"$(DEMO_DIR)/source/numpy_checkpoints/checkpoint_$(DEMO_STEPS)/encoder.prompt.prompt.prompt\"
	$(BIN)/t5x train --gin_file=runs/quickstart.gin \
	  --gin.MODEL_DIR=\"$(DEMO_DIR)/target_from_scratch\" $(TARGET_FLAGS)
	$(BIN)/t5x curves $(DEMO_DIR)/source $(DEMO_DIR)/target_from_source \
	  $(DEMO_DIR)/target_from_scratch --png $(DEMO_DIR)/curves.png --json $(DEMO_DIR)/summary.json

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# After upgrading a dependency in the venv and passing the tests: pin what passed.
constraints: venv
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | \
	  grep -v '^prompt-transfer' | sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
