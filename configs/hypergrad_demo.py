"""Every hypergradient method on a quadratic bilevel problem with a closed-form answer.

Run:  python -m scripts.hypergrad_demo --config configs/hypergrad_demo.py
      python -m scripts.hypergrad_demo --config configs/hypergrad_demo.py --config.problem.condition=1000

The exact methods (cg, dense, finite_difference) should agree with the closed form to ~1e-6;
the approximations show how far each one is on this problem and what it costs in HVPs.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.alpha = 0.3
    c.problem = ml_collections.ConfigDict({"dim": 50, "condition": 30.0})
    c.ghadimi_wang_draws = 64  # the estimator is random: report the mean of this many draws
    c.methods = ml_collections.ConfigDict(
        {
            "cg": {"operator": "plain", "tol": 1e-8, "maxiter": 200},
            "cg_normal": {"operator": "normal", "damping": 0.0, "tol": 1e-8, "maxiter": 400},
            "cg_damped": {"operator": "damped", "damping": 1e-2, "damping_mode": "absolute"},
            "dense": {},
            "identity": {},
            "neumann": {"num_terms": 20},
            "neumann_100": {"num_terms": 100},
            "ghadimi_wang": {"num_terms": 20},
            "lfm_code": {"reduction": "cross"},
            "lfm_code_first_tensor": {"reduction": "first_tensor_mean"},
            "unrolled": {"num_steps": 20, "inner_lr": 0.02},
            "unrolled_200": {"num_steps": 200, "inner_lr": 0.02},
            "finite_difference": {"eps": 1e-4},
        }
    )
    return c
