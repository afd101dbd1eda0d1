"""alignkit benchmarks: `python bench/run_all.py [--quick]` (see bench/run_all.py). Not tests; CI does not run them."""
