"""The splinecompress command line (installed as the package ``splinecompress.cli``).

This folder sits at the top of the repository, but pyproject.toml maps it to ``splinecompress.cli`` so that no
top-level module named ``cli`` is ever installed.
"""
