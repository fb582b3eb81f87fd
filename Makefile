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
weights:  # long: hours per network on 2 CPU cores, resumable (run again to continue)
	for n in unet ms_unet msa_cpp_unet qchc_unet3d chs_net; do .venv/bin/python -m benchmarks.train_real_weights --network $$n && .venv/bin/python -m benchmarks.train_real_weights --network $$n --export || exit 1; done
	.venv/bin/python -m benchmarks.real_data --store-in-weights
