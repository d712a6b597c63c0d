"""gradproj: per-example loss gradients, seeded random projections, influence scores, analysis.

Stages, each knowing only those before it:
data -> models -> gradients -> projection -> params -> store -> scoredir -> influence -> analysis
(`extract` wires the first six into the extraction command.)
"""

__version__ = "0.1.0"
