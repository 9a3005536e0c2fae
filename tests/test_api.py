"""The public surface: signatures in source, their docs, warnings for no-ops, `describe`.

* every public factory's signature is written out (no `**kwargs`), each of its
  parameters is documented under Args and nothing else is, and the defaults of
  the GaLore and Adam options agree with the validated carriers unless the
  docstring says why;
* `ProjectionWarning` at init for a selector that selects nothing or a rank
  that leaves a matrix uncompressed, and none for an ordinary setup;
* `go.describe` attributes every byte of the state to a row.
"""

import dataclasses
import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from galore_optax.options import AdamOptions, GaLoreOptions
from examples import optimizers as registry

# The library's optimizers (the repository's registry) and the public parts they are built of.
FACTORIES = ["scale_by_galore", "galore", "scale_by_adam_8bit", "scale_by_conda",
             "scale_by_frugal", "scale_by_frugal_blocks"] + list(dict.fromkeys(
    getattr(spec.factory, "func", spec.factory).__name__ for spec in registry.library()))
# Defaults that differ from GaLoreOptions/AdamOptions on purpose; each docstring says why.
OWN_DEFAULTS = {
    ("fira_adamw", "scale"): 0.25,  # fira's scripts
    ("apollo_adamw", "rank"): 256, ("apollo_adamw8bit", "rank"): 256,  # APOLLO's scripts
    ("apollo_mini", "scale"): 128.0,
    ("conda", "update_proj_gap"): 2000, ("conda", "eps"): 1e-8,  # the official Conda's
    ("scale_by_conda", "update_proj_gap"): 2000, ("scale_by_conda", "eps"): 1e-8,
    ("frugal_adamw", "eps"): 1e-8, ("scale_by_frugal", "eps"): 1e-8,  # FRUGAL's (torch's)
    ("scale_by_frugal_blocks", "eps"): 1e-8,
    ("subtrack_adamw", "scale"): 0.25,  # SubTrack's scripts
    ("coap_adamw", "scale"): 0.25, ("coap_adamw", "update_proj_gap"): 40,  # COAP's 1B script
    ("subtrack_adamw", "realign_moments"): True,  # SubTrack++'s projection-aware moments
    ("golore_adamw", "realign_moments"): go.FirstMomentTransport(),  # GoLore's transport
    ("galore_adamw8bit", "eps"): 1e-8, ("apollo_adamw8bit", "eps"): 1e-8,  # bitsandbytes
    ("gradnorm_lorp8bit", "eps"): 1e-8, ("adamw_8bit", "eps"): 1e-8,
    ("scale_by_adam_8bit", "eps"): 1e-8,
    ("adamw_8bit", "weight_decay"): 1e-2,  # bitsandbytes' AdamW8bit
    ("galore_adafactor", "eps"): (1e-30, 1e-3),  # Adafactor's (eps1, eps2)
}


def documented_args(doc: str) -> list[str]:
  """The names under the Args: section of a Google-style docstring."""
  section = re.search(r"\n\s*Args:\n(.*?)(?:\n\s*\n\s*[A-Z][A-Za-z ]*:\n|\Z)", doc, re.S)
  assert section, "no Args: section"
  lines = section.group(1).splitlines()
  indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
  return [line.strip().split(":")[0] for line in lines
          if line.strip() and len(line) - len(line.lstrip()) == indent]


@pytest.mark.parametrize("name", FACTORIES)
def test_signature_is_written_out_and_documented(name):
  factory = getattr(go, name)
  params = inspect.signature(factory).parameters
  assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
  assert documented_args(factory.__doc__) == list(params), name
  assert not re.search(r"\{\w+_options\}", factory.__doc__)  # no template left unfilled


@pytest.mark.parametrize("name", FACTORIES)
def test_option_defaults_agree_with_the_carriers(name):
  params = inspect.signature(getattr(go, name)).parameters
  carriers = {f.name: f.default for cls in (GaLoreOptions, AdamOptions)
              for f in dataclasses.fields(cls)}
  for arg, p in params.items():
    if arg in carriers:
      want = OWN_DEFAULTS.get((name, arg), carriers[arg])
      assert p.default == want, (name, arg, p.default, want)


def test_optax_argument_order_where_the_meaning_is_the_same():
  optax_order = ["b1", "b2", "eps", "weight_decay", "mask"]
  for name in ["galore_adamw", "fira_adamw", "apollo_adamw", "gradnorm_lorp", "galore_adamw8bit"]:
    params = list(inspect.signature(getattr(go, name)).parameters)
    assert params[:5] == ["learning_rate", "rank", "update_proj_gap", "scale", "proj_type"]
    assert params[5:10] == optax_order, name
    kind = inspect.signature(getattr(go, name)).parameters["projected"].kind
    assert kind == inspect.Parameter.KEYWORD_ONLY


PARAMS = {"attn": {"kernel": jnp.zeros((64, 48)), "bias": jnp.zeros(48)}, "norm": jnp.ones(48)}


def test_a_selector_that_selects_nothing_warns_naming_the_leaves():
  tx = go.galore_adamw(1e-3, rank=8, projected=go.path_mask(r"mlp"))
  with pytest.warns(go.ProjectionWarning, match=r"selects none of the 3 parameters") as info:
    tx.init(PARAMS)
  assert "attn/kernel" in str(info[0].message)


def test_rank_at_the_smaller_side_warns_with_the_projector_bytes():
  tx = go.galore_adamw(1e-3, rank=1000)
  with pytest.warns(go.ProjectionWarning, match=r"attn/kernel \(64×48, rank clamped to 48") as info:
    jax.eval_shape(tx.init, PARAMS)  # at trace time too
  assert "projector 9,216 bytes" in str(info[0].message)  # 48×48 float32


@pytest.mark.parametrize("make", [
    lambda: go.galore_adamw(1e-3, rank=8),
    lambda: go.apollo_mini(1e-3),
    lambda: go.gradnorm_lorp8bit(1e-3, rank=8),
])
def test_an_ordinary_setup_does_not_warn(make):
  with warnings.catch_warnings():
    warnings.simplefilter("error", go.ProjectionWarning)
    make().init(PARAMS)


def test_fused_init_warns_about_the_model_not_its_parts():
  params = {"layers": {"w": jnp.ones((3, 32, 32))}, "head": jnp.ones((32, 8)), "norm": jnp.ones(8)}
  tx = go.galore_adamw(1e-3, rank=4, projected=go.path_mask("layers"))
  with warnings.catch_warnings():
    # the probe's leaves and the non-layer part select nothing; the model does
    warnings.simplefilter("error", go.ProjectionWarning)
    go.fused_init(tx, params)
  with pytest.warns(go.ProjectionWarning, match="selects none"):
    go.fused_init(go.galore_adamw(1e-3, rank=4, projected=go.path_mask("mlp")), params)


@pytest.mark.parametrize("make, norm_bytes", [
    (lambda: go.galore_adamw(1e-3, rank=8), 384),  # 2 float32 moments of 48, as AdamW
    (lambda: go.galore_adamw8bit(1e-3, rank=8, projector_bits=4, min_8bit_size=16,
                                 block_size=32), 2 * (64 + 2 * 4)),  # 2 blocks: codes, scales
    (lambda: go.apollo_mini(1e-3), 384),
    (lambda: optax.adamw(1e-3), 384),
])
def test_describe_accounts_for_every_byte(make, norm_bytes):
  tx = make()
  table = go.describe(tx, PARAMS)
  rows = {line.split()[0]: line for line in table.splitlines()[1:]}
  total_ours, total_adamw = (int(x.replace(",", "")) for x in rows["total"].split()[-2:])
  assert total_ours == go.tree_bytes(jax.eval_shape(tx.init, PARAMS))
  assert total_adamw == go.tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, PARAMS))
  assert rows["norm"].split()[-2:] == [str(norm_bytes), "384"]


def test_describe_shows_the_projected_leaf_and_its_bases():
  table = go.describe(go.galore_adamw(1e-3, rank=8), PARAMS)
  kernel = next(line for line in table.splitlines() if line.startswith("attn/kernel"))
  # Flax (in=64, out=48): 'std' compresses the output side, the smaller one: u (48 × 8)
  assert "yes" in kernel and "u 48×8 float32" in kernel
  # moments of the (8 × 64) low-rank gradient and the projector, all float32
  assert kernel.split()[-2:] == [f"{(2 * 8 * 64 + 48 * 8) * 4:,}", f"{2 * 64 * 48 * 4:,}"]
  bias = next(line for line in table.splitlines() if line.startswith("attn/bias"))
  assert " no " in bias


def _as_nnx_containers(tree):
  """`tree` with its dicts and NamedTuples turned into nnx.State, as nnx.Optimizer may."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  fields = getattr(tree, "_fields", None) if isinstance(tree, tuple) else None
  if isinstance(tree, dict) or fields:
    items = tree.items() if isinstance(tree, dict) else zip(fields, tree)
    return nnx.State({k: _as_nnx_containers(v) for k, v in items})
  if isinstance(tree, tuple):
    return tuple(_as_nnx_containers(v) for v in tree)
  return tree


@pytest.mark.parametrize("make", [
    lambda: go.galore_adamw8bit(1e-3, rank=8, min_8bit_size=16),
    lambda: go.apollo_adamw(1e-3, rank=8),
    lambda: go.sharding_aware(optax.contrib.galore(1e-3, rank=8)),
])
def test_state_comes_back_in_the_containers_it_came_in(make):
  # so that optax.apply_if_finite's lax.cond inside nnx.Optimizer sees one structure
  tx = make()
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  own = tx.init(PARAMS)
  given = _as_nnx_containers(own)
  assert jax.tree.structure(given) != jax.tree.structure(own)
  updates, new = jax.jit(tx.update)(grads, given, PARAMS)
  want_updates, want = tx.update(grads, own, PARAMS)
  assert jax.tree.structure(new) == jax.tree.structure(given)
  assert jax.tree.structure(updates) == jax.tree.structure(want_updates)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(_as_nnx_containers(want))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
