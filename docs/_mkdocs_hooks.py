"""mkdocs hooks (mkdocs.yml `hooks:`): links that leave docs/, and reference coverage.

Links out of docs/. The prose pages link to files elsewhere in the repository
(`../benchmarks/results/memory.md`) so that they read on a repository browser.
The site holds only docs/, so mkdocs would report such links as not found and
publish them broken. Here each one is checked against the repository (a
missing target is a warning, which `mkdocs build --strict` turns into a
failure) and written in the site as the repository path in code: links inside
docs/ are left to mkdocs' own validation.

Coverage. Every name in `galore_optax.__all__` must have a `::: galore_optax.<name>`
entry on some page under docs/reference/; a missing one is a warning. `__all__`
is read from galore_optax/__init__.py with `ast`, without importing the package.
"""

from __future__ import annotations

import ast
import logging
import os
import re

log = logging.getLogger("mkdocs.hooks.galore_optax")

# [text](../path) or [text](../path#anchor); not images, not absolute URLs.
_OUTSIDE_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_REFERENCE_ENTRY = re.compile(r"^:::\s*galore_optax\.([A-Za-z_][A-Za-z0-9_]*)\s*$", re.M)


def _public_names(init_py: str) -> list[str]:
  with open(init_py, encoding="utf-8") as f:
    module = ast.parse(f.read(), init_py)
  for node in module.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
      return [ast.literal_eval(e) for e in node.value.elts]
  raise ValueError(f"{init_py} has no __all__")


def _rewrite_outside_links(markdown: str, src_path: str, docs_dir: str, repo_dir: str) -> str:
  here = os.path.dirname(src_path)

  def replace(match: re.Match) -> str:
    text, target = match.group(1), match.group(2)
    resolved = os.path.normpath(os.path.join(here, target))
    if os.path.commonpath([resolved, docs_dir]) == docs_dir:
      return match.group(0)  # Inside docs/: mkdocs validates it.
    repo_path = os.path.relpath(resolved, repo_dir).replace(os.sep, "/")
    if repo_path.startswith("../") or not os.path.exists(resolved):
      log.warning("%s links to '%s', which is not in the repository.",
                  os.path.relpath(src_path, docs_dir), target)
      return match.group(0)
    if text.strip("`") == repo_path:
      return f"`{repo_path}`"
    return f"{text} (`{repo_path}`)"

  out, in_fence = [], False
  for line in markdown.split("\n"):
    if _FENCE.match(line):
      in_fence = not in_fence
    out.append(line if in_fence else _OUTSIDE_LINK.sub(replace, line))
  return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
  docs_dir = os.path.abspath(config["docs_dir"])
  repo_dir = os.path.dirname(os.path.abspath(config["config_file_path"]))
  return _rewrite_outside_links(markdown, page.file.abs_src_path, docs_dir, repo_dir)


def on_files(files, config):
  docs_dir = os.path.abspath(config["docs_dir"])
  repo_dir = os.path.dirname(os.path.abspath(config["config_file_path"]))
  documented = set()
  reference_dir = os.path.join(docs_dir, "reference")
  for file in files.documentation_pages():
    if os.path.commonpath([file.abs_src_path, reference_dir]) == reference_dir:
      with open(file.abs_src_path, encoding="utf-8") as f:
        documented.update(_REFERENCE_ENTRY.findall(f.read()))
  public = _public_names(os.path.join(repo_dir, "galore_optax", "__init__.py"))
  missing = [name for name in public if name not in documented]
  if missing:
    log.warning("galore_optax.__all__ names with no '::: galore_optax.<name>' entry under "
                "docs/reference/: %s", ", ".join(missing))
  unknown = sorted(documented - set(public))
  if unknown:
    log.warning("docs/reference/ documents names that are not in galore_optax.__all__: %s",
                ", ".join(unknown))
  return files
