"""Captioner families, one module per family (``icsd``, ``tiny``, ``prefix``), and what they share
(:mod:`.base`: spec, family contract, built model, loss; :mod:`.text`; :mod:`.vision`;
:mod:`.cross_attention`; :mod:`.inference`). :mod:`icsd.backends.captioners` re-exports the API."""
