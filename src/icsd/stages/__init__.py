"""One module per pipeline stage; each exposes ``run(cfg, run_dir) -> StageResult``.

A stage reads only what earlier stages wrote in the run directory (through :mod:`icsd.records`
and :mod:`icsd.store`) and never imports another stage.
"""
