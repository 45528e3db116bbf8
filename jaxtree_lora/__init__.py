"""jaxtree_lora: continual learning of pre-trained models with low-rank adapters, in JAX."""
# First, so the ledger's clock starts with the package (its start-up line counts back from here).
from jaxtree_lora import ledger as _ledger  # noqa: F401
