"""A griffe extension for the API reference (mkdocs.yml: mkdocstrings `extensions`).

- "Example:" sections. The docstrings head their doctests "Example:"; griffe's
  Google parser knows only "Examples:" and would render the `>>>` lines as
  quoted prose. A top-level "Example:" line is read as "Examples:".
- Public names. Each name in `galore_optax.__all__` must be a `def` or a `class`
  with a docstring: a name bound by an assignment (`f = wrap(g)`) is a
  "module attribute" to static analysis, shown with no signature and no
  docstring. Such a name is a warning, so `mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE_HEADING = re.compile(r"^Example:[ \t]*$", re.M)


class GaloreOptaxReference(griffe.Extension):
  """The two rules in the module docstring."""

  def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE_HEADING.sub("Examples:", obj.docstring.value)

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    if pkg.name != "galore_optax":
      return
    for name in [str(e) for e in pkg.exports or ()]:
      member = pkg.members.get(name)
      if member is None:
        griffe.logger.warning(
            f"galore_optax.__all__ names {name!r}, which the package does not define.")
        continue
      try:
        target = member.final_target if member.is_alias else member
      except griffe.AliasResolutionError:
        griffe.logger.warning(f"galore_optax.{name}: cannot resolve where it is defined.")
        continue
      if target.is_attribute:
        griffe.logger.warning(
            f"galore_optax.{name} is bound by an assignment ({target.relative_filepath}:"
            f"{target.lineno}), so the reference shows no signature or docstring for it; "
            "define it with def or class, or import such a definition.")
      elif not target.docstring:
        griffe.logger.warning(f"galore_optax.{name} ({target.path}) has no docstring.")
