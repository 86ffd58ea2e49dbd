"""Development helpers for tests, benchmarks and dry runs; the pipeline never imports them."""
