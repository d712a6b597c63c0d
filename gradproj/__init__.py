"""gradproj: per-example loss gradients, seeded random projections, influence scores, analysis.

The package is a pipeline of stages, each importing only those before it, under the front ends
(`cli`, `extract`, `plan`, `query`). The stage list and the import rule have one home,
docs/architecture.md ("Stages and front ends"), which tests/test_architecture.py checks.
"""

__version__ = "0.1.0"
