"""gradproj: per-example loss gradients, seeded random projections, influence scores, analysis.

Stages, each knowing only those before it:
data -> models -> gradients -> projection -> store -> influence -> analysis
"""

__version__ = "0.1.0"
