"""Built-in SAE architectures, one file each; importing this package registers them all.

To add one: write ``<name>.py`` here with a config dataclass (subclass of ``SAEConfig`` whose ``architecture`` is
``Literal["<name>"]``) and a ``@register_architecture`` subclass of ``SparseAutoencoder``, then import it below.
"""

from . import relu, topk, batchtopk, matryoshka, jumprelu, gated, panneal, archetypal, matching_pursuit  # noqa: F401, I001  (registration order)
