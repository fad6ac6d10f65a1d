"""mislib: the library behind the MIS-Ground notebooks.

One module per pipeline stage (volumes, geometry, render, questions, semsam, inference,
scoring, analysis, plots), plus :mod:`mislib.paths` (every folder the project writes to),
:mod:`mislib.config` (profiles and stage configuration hashes) and a small CLI
(``python -m mislib --help``).
"""

__version__ = "0.1.0"
