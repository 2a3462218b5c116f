"""Sphinx configuration of jaxnorm's documentation (built by `make docs` into docs/_build/html)."""

import os
import shutil
import sys

sys.path.insert(0, os.path.abspath('..'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

project = 'jaxnorm'
author = 'The jaxnorm maintainers'
copyright = '2026, The jaxnorm maintainers'  # noqa: A001

extensions = [
    'myst_nb',  # MyST Markdown (it includes myst_parser) and Jupyter notebooks
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]

source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', 'jupyter_execute']

# The notebooks (colabs/*.ipynb) are rendered as they are committed: source only, not executed
# here (the test suite executes them, tests/test_notebooks.py).
nb_execution_mode = 'off'

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3

autosummary_generate = True
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Dataclass fields are documented once, from the docstring's Attributes section, not again as
# autodoc members.
napoleon_use_ivar = True

html_theme = 'sphinx_book_theme'
html_title = 'jaxnorm'
html_theme_options = {
    'show_toc_level': 2,
    'use_download_button': False,
}
nitpicky = False
suppress_warnings = ['myst.header']


# ---------------------------------------------------------------------------------------------
# API reference: one page per public package, listing every public name it exports, written at
# each build (so no public symbol can be left out). Each name gets its own autosummary stub.

API_PACKAGES = {
    'jaxnorm.functional': 'Pure JAX functions: the math of every layer (no Flax import).',
    'jaxnorm.linen': 'Flax linen modules over `jaxnorm.functional`.',
    'jaxnorm.nnx': 'Flax NNX modules: the same layers for NNX code.',
    'jaxnorm.models': 'ResNets, Wide-ResNets and deep MLPs, generic in their normalization.',
    'jaxnorm.diagnostics': 'Signal propagation, theory, sweeps, spectra and plots.',
    'jaxnorm.diagnostics.theory': 'Closed-form predictions at initialization.',
    'jaxnorm.training': 'Data, jitted multi-device training, checkpoints, the launcher loop.',
    'jaxnorm.studies': 'The reproduction harness: claims, resumable study parts and runs.',
    'jaxnorm.invariants': 'chex checks of shape and variance invariants for your own tests.',
}


def public_names(package: str) -> list[str]:
  """The public names of ``package``: ``__all__`` if defined, else every non-underscore name that
  is not a module (``theory`` and other namespaces are documented as packages of their own)."""
  import importlib
  import types

  module = importlib.import_module(package)
  names = getattr(module, '__all__', None)
  if names is None:
    names = [n for n, v in vars(module).items()
             if not n.startswith('_') and not isinstance(v, types.ModuleType)
             and getattr(v, '__module__', package).startswith(package)]
  return sorted(names, key=str.lower)


def write_api_pages():
  """Writes ``api/<package>.md`` for every package of ``API_PACKAGES``."""
  here = os.path.dirname(os.path.abspath(__file__))
  out = os.path.join(here, 'api')
  os.makedirs(out, exist_ok=True)
  for package, summary in API_PACKAGES.items():
    lines = [f'# `{package}`', '', summary, '', '```{eval-rst}', f'.. automodule:: {package}',
             '   :no-members:', '', f'.. currentmodule:: {package}', '', '.. autosummary::',
             '   :toctree: generated', '   :nosignatures:', '']
    lines += [f'   {name}' for name in public_names(package)]
    lines += ['```', '']
    text = '\n'.join(lines)
    path = os.path.join(out, f'{package}.md')
    if not os.path.exists(path) or open(path).read() != text:
      with open(path, 'w') as f:
        f.write(text)


write_api_pages()  # Before autosummary reads the pages.


# ---------------------------------------------------------------------------------------------
# Notebooks: colabs/*.ipynb live outside the docs tree, so each build copies them into
# docs/colabs/ (a build product that ignores itself in git), where docs/notebooks.md lists them.


def copy_notebooks():
  """Copies ``colabs/*.ipynb`` into ``docs/colabs/`` (only the files that changed)."""
  here = os.path.dirname(os.path.abspath(__file__))
  src = os.path.join(os.path.dirname(here), 'colabs')
  out = os.path.join(here, 'colabs')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, '.gitignore'), 'w') as f:
    f.write('# Copied from colabs/ by docs/conf.py at each build.\n*\n')
  names = sorted(n for n in os.listdir(src) if n.endswith('.ipynb'))
  for name in set(os.listdir(out)) - set(names) - {'.gitignore'}:
    os.remove(os.path.join(out, name))
  for name in names:
    a, b = os.path.join(src, name), os.path.join(out, name)
    if not os.path.exists(b) or open(a, 'rb').read() != open(b, 'rb').read():
      shutil.copyfile(a, b)


copy_notebooks()
