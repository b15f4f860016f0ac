"""Run the JAX STDE code (sail-sg/stde) on an instance given in a ``.npz`` file.

Executed by the Python of an environment with STDE's requirements (``jax``,
``dm-haiku``, ``optax``, ``ml_collections``, ``pydantic``, ...), not by this
library's: it imports only numpy, jax and the STDE checkout at ``--stde-path``,
and calls STDE's own ``stde.train.train`` with the settings of its two-body
Allen-Cahn script (``scripts/insep.sh``: 100 points per step, hard constraint
``(1 - |x|^2) n(x)``, no boundary loss, MLP 4x128 tanh, Adam lr 1e-3 decayed
linearly to 0 over ``--epochs`` steps, sparse STDE with ``--rand-batch-size``
coordinates).

Two changes of inputs only, no change of STDE's code:

* the coefficients ``c_i`` are the instance file's instead of an unseeded
  ``np.random.randn(1, d)`` (STDE uses ``c_0 .. c_{d-2}``; the last is padding);
* ``Config.save_params`` (STDE's checkpoint hook, called with the parameters
  every ``test_cfg.save_every`` steps) is replaced by one that keeps the
  parameters and the time, so that the final network can be evaluated here on
  the instance's held-out points and the steps can be timed without the
  compilation of the first one.

Three shims for current releases (STDE's requirements pin no versions; checked with
jax 0.10, pydantic 2.14): ``jax.tree_leaves`` (removed from jax) is aliased to
``jax.tree_util.tree_leaves``; the coefficients are set past pydantic's check of
undeclared fields, as STDE's ``main.py`` sets them under older pydantic; and the
speed that ``train`` parses from tqdm's log after its loop may be unreadable
("?it/s") for very short runs, which is ignored once the last step has run. The
package ``folx`` (imported by ``stde.operators``) is needed besides the listed ones.

Prints one line ``STDE <json>``: steps, the training wall time (and the epoch times of the
first and last step's hook, to line it up with another process), the final
relative L2 error on the instance's points and on ``--n-test`` points drawn by
STDE's own sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    """Train once and print the result line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--stde-path", required=True)
    ap.add_argument("--instance", required=True, help=".npz with coeffs, x_eval, u_eval")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--rand-batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=20000)
    args = ap.parse_args()
    sys.path.insert(0, args.stde_path)

    import haiku as hk
    import jax
    import jax.numpy as jnp
    import numpy as np
    import stde.equations as eqns
    from absl import flags
    from absl import logging as absl_logging
    from stde import train as stde_train
    from stde.config import Config
    from stde.model import PINN

    if not hasattr(jax, "tree_leaves"):  # removed in jax 0.6; STDE's train.py calls it
        jax.tree_leaves = jax.tree_util.tree_leaves
    data = np.load(args.instance)
    dim = data["x_eval"].shape[1]
    # train() reads its speed back from the absl log file, as STDE's main.py sets it up
    flags.FLAGS(sys.argv[:1])
    absl_logging.use_absl_handler()
    absl_logging.get_absl_handler().use_absl_log_file("absl_logging", data_dir(args.instance))

    cfg = Config()
    eqn_cfg = cfg.eqn_cfg
    eqn_cfg.name = "AllenCahnTwobody"
    eqn_cfg.dim = dim
    eqn_cfg.batch_size = eqn_cfg.batch_size_boundary = 100
    eqn_cfg.enforce_boundary = True
    eqn_cfg.boundary_weight = 0.0
    eqn_cfg.hess_diag_method = "sparse_stde"
    eqn_cfg.rand_batch_size = args.rand_batch_size
    # STDE's main.py assigns it the same way; pydantic >= 2.10 refuses an undeclared field
    object.__setattr__(eqn_cfg, "coeffs", np.concatenate([data["coeffs"], [0.0]])[None, :])
    cfg.gd_cfg.epochs = args.epochs
    cfg.gd_cfg.lr = args.lr
    cfg.gd_cfg.lr_decay = "linear"
    cfg.test_cfg.n_points = cfg.test_cfg.batch_size = 200  # its own test set: we evaluate below
    cfg.test_cfg.eval_every = args.epochs + 1  # no evaluation inside the timed loop
    cfg.test_cfg.show_stats = False
    cfg.test_cfg.data_on_gpu = False
    cfg.test_cfg.save_every = max(args.epochs - 1, 1)  # the hook runs at step 0 and the last
    cfg.rng_seed = args.seed
    np.random.seed(args.seed)

    seen: dict[int, float] = {}
    seen_epoch: dict[int, float] = {}  # time.time(): comparable with another process's clock
    kept: dict = {}

    def keep(self, params, step: int) -> None:
        jax.block_until_ready(params)
        seen[step] = time.perf_counter()
        seen_epoch[step] = time.time()
        kept["params"] = params

    Config.save_params = keep
    t0 = time.perf_counter()
    try:
        stde_train.train(cfg, False, 0, False)
    except (ValueError, IndexError):
        # after the loop, train() parses its speed from tqdm's last log line, which for
        # very short runs reads "?it/s"; the training itself has finished if the hook saw
        # the last step
        if max(seen, default=-1) != args.epochs - 1:
            raise
    total_s = time.perf_counter() - t0

    eqn = eqns.AllenCahnTwobody
    model = hk.multi_transform(lambda: PINN(
        eqn=eqn, eqn_cfg=cfg.eqn_cfg, model_cfg=cfg.model_cfg).init_for_multitransform())
    u_fn = jax.jit(lambda p, x: model.apply.u(p, None, x, None))

    def rel_l2(x, ref) -> float:
        pred = np.concatenate([np.asarray(u_fn(kept["params"], jnp.asarray(xb)))
                               for xb in np.array_split(x, max(1, len(x) // 500))])
        return float(np.linalg.norm(pred - ref) / np.linalg.norm(ref))

    x_eval = data["x_eval"].astype(np.float32)
    sampler = eqn.get_sample_domain_fn(cfg.eqn_cfg)
    x_own, _, _, _, _ = sampler(args.n_test, 1, jax.random.PRNGKey(10_000 + args.seed))
    u_own = np.asarray(eqn.sol(x_own, None, cfg.eqn_cfg))
    # the instance as STDE defines it: its exact solution at our points against ours
    u_stde = np.asarray(eqn.sol(jnp.asarray(data["x_eval"]), None, cfg.eqn_cfg))
    mismatch = float(np.abs(u_stde - data["u_eval"]).max() / np.abs(data["u_eval"]).max())
    first, last = min(seen), max(seen)
    timed = (seen[last] - seen[first]) / max(last - first, 1)  # s per step after the first
    print("STDE " + json.dumps(dict(
        steps=args.epochs, s_per_step=timed, train_s=timed * args.epochs, total_s=total_s,
        first_step_time=seen_epoch[first], last_step_time=seen_epoch[last],
        final_rel_l2=rel_l2(x_eval, data["u_eval"]),
        exact_solution_mismatch=mismatch,
        final_rel_l2_stde_points=rel_l2(np.asarray(x_own), u_own), n_stde_points=args.n_test,
        jax=jax.__version__, devices=str(jax.devices()))), flush=True)


def data_dir(path: str) -> str:
    """The folder of ``path`` (STDE's absl log goes there)."""
    import os

    return os.path.dirname(os.path.abspath(path))


if __name__ == "__main__":
    main()
