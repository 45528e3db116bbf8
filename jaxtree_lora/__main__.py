"""`python -m jaxtree_lora` is the `jaxtree-lora` command; importing this module runs nothing."""
import sys

from jaxtree_lora.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
