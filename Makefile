# The two commands of the README:
#   make demo   set up, then run the quick grid (embedded model, all five methods, local Ray) and print the table
#   make test   set up, then run the whole test suite
VENV := .venv
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/smartkv-bench submit --grid jobs/quick.yaml

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15

clean:
	rm -rf $(VENV) results/quick
