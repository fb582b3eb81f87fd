# Convenience targets; each one is what the README's quick start runs.
.PHONY: setup demo test bench weights
setup:
	bash .ci/bootstrap setup
demo:
	bash .ci/bootstrap demo
test:
	bash .ci/bootstrap test
bench:
	.venv/bin/python -m benchmarks.model_complexity
weights:
	.venv/bin/python -m benchmarks.train_shipped_weights
