# ruff: noqa: I001  (the built-ins are imported in registration order)
"""Built-in SAE architectures, one file each; importing this package registers them all.

To add one: write ``<name>.py`` here with a config dataclass (subclass of ``SAEConfig`` whose ``architecture`` is
``Literal["<name>"]``) and a ``@register_architecture`` subclass of ``SparseAutoencoder``. Every module of this
package is imported (the built-ins first, in the order below, which is the registry's order), so nothing else needs
editing.
"""

import importlib
import pkgutil

from . import relu, topk, batchtopk, matryoshka, jumprelu, gated, panneal, archetypal, matching_pursuit  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
