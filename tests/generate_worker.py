"""Generation in a fresh process, for the multi-device test (the device count is fixed at start-up):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/generate_worker.py OUT.npz

Writes the tokens and images of `run` on the `varjax.config.micro()` model (seeded random
weights) and the device count.
"""

from __future__ import annotations

import sys

import numpy as np

LABELS = np.array([0, 1, 2, 3, 4, 5, 1000, 7])


def run(model) -> dict[str, np.ndarray]:
    import jax

    from varjax.generate import Sampling, generate

    with jax.default_matmul_precision("highest"):
        gen = generate(model, LABELS, Sampling(cfg=1.5, top_k=20, top_p=0.9), seed=11, return_images=True)
    out = {f"idx{s}": np.asarray(t) for s, t in enumerate(gen.tokens)}
    out["images"] = np.asarray(gen.images)
    return out


def main() -> None:
    import jax

    from varjax.config import micro
    from varjax.model import Model, init_params

    cfg = micro()
    out = run(Model(cfg, init_params(cfg, seed=0)))
    np.savez(sys.argv[1], devices=len(jax.devices()), **out)


if __name__ == "__main__":
    main()
