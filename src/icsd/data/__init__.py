"""The paper's data sets (``icsd data``: catalogue, downloads, layout checks) and the export of a
run's product (``icsd export``). ``quickstart/`` holds the bundled offline sample data."""
