"""TreeLoRA's reusable parts: similarity between task vectors (vmapped), the gradient-similarity tree
(fixed-shape arrays, built under jit), the layer-wise bandit, and a picture of the tree."""
from jaxtree_lora.tree import bandit, similarity, tree

__all__ = ["bandit", "similarity", "tree"]
