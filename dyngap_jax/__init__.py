"""dyngap-jax: LFM (Facilitating Multimodal Classification via Dynamically Learning Modality Gap) in JAX."""
from dyngap_jax import alpha, hypergrad, losses, metrics

__version__ = "0.1.0"
__all__ = ["alpha", "hypergrad", "losses", "metrics", "__version__"]
