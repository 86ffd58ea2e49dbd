"""GPU-hours of the paper's COCO recipe per stage (the model lives in :mod:`icsd.cost_model`).

python benchmarks/cost_model.py > docs/cost.md          # = python -m icsd.cost_model
python benchmarks/cost_model.py --gpu-results gpu_all.json > docs/cost.md
"""

from __future__ import annotations

from icsd.cost_model import lines, main, markdown, project, totals

__all__ = ["lines", "main", "markdown", "project", "totals"]

if __name__ == "__main__":
    main()
