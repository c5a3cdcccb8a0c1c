"""Studies built on training: the exact-against-approximate hypergradient comparison
(:mod:`~dyngap_jax.studies.compare`) and the paper's tables and figures (:mod:`~dyngap_jax.studies.report`)."""
