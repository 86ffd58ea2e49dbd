"""An example icsd plugin package: one LLM backend, one text-to-image backend and one stage."""
