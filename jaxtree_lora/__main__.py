import sys

from jaxtree_lora.cli import main

sys.exit(main())
