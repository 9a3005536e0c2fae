"""Checked by pyright in CI (not run by pytest): the public signatures reach type checkers.

Each line marked `pyright: ignore[...]` must be an error; pyright's
`reportUnnecessaryTypeIgnoreComment` (pyproject.toml) turns an ignore that
suppresses nothing into an error, so a signature hidden from type checkers
(a `**kwargs` wrapper, a signature made at import) fails CI.
"""

import jax.numpy as jnp
import optax

import galore_optax as go

go.galore_adamw(1e-3, rnk=8)  # pyright: ignore[reportCallIssue]
go.galore_adamw8bit(1e-3, realign_moments=True)  # pyright: ignore[reportCallIssue]
go.apollo_mini(1e-3, rank=4)  # pyright: ignore[reportCallIssue]
go.adamw_8bit(1e-3, weigth_decay=0.1)  # pyright: ignore[reportCallIssue]
go.scale_by_galore(8, update_proj_gap="often")  # pyright: ignore[reportArgumentType]

# Correct calls type-check: optax's habits carry over.
decay = lambda p: {k: v.ndim > 1 for k, v in p.items()}
tx: optax.GradientTransformation = go.galore_adamw(
    1e-3, 128, 200, 0.25, "std", 0.9, 0.999, 1e-6, optax.linear_schedule(0.0, 0.1, 100), decay,
    projected=go.path_mask("attn"), refresh=go.randomized_refresh(8))
state = tx.init({"w": jnp.zeros((4, 4))})
