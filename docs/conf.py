"""Sphinx configuration: numpydoc docstrings, autosummary API pages, the PyData theme and a
sphinx-gallery of the ``examples/`` scripts (run during the build; ``NUMBABN_DOCS_QUICK=1``
for small settings).  Nothing here reaches the network: no intersphinx."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout this conf.py belongs to

import numbabn  # noqa: E402

project = "numbabn"
author = "the numbabn developers"
copyright = "the numbabn developers"
version = release = numbabn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb", "auto_examples/*.py"]
default_role = "code"

autosummary_generate = True
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False  # the class template lists members itself
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"numbabn {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
html_show_sourcelink = False

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"mlp_model\.py$",
    "within_subsection_order": "ExampleTitleSortKey",  # the titles give the reading order
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "doc_module": (),
    "backreferences_dir": None,
}

# Every public name must have its API page: fail the build when api.rst and __all__ drift.
_listed = set(re.findall(r"^\s{3}(\w+)$", (Path(__file__).parent / "api.rst").read_text(), re.MULTILINE))
if _listed != set(numbabn.__all__):
    raise RuntimeError(f"docs/api.rst lists {sorted(_listed)}, numbabn.__all__ is {sorted(numbabn.__all__)}")
