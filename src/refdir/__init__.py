"""refdir: the refusal direction in chat language models.

The data path reads top-down: load → format → cache activations → candidates → select →
intervene / orthogonalize → evaluate → report.
"""

from refdir.errors import RefdirError

__version__ = "0.1.0"
__all__ = ["RefdirError", "__version__"]
