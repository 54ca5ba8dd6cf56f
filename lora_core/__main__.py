"""`python -m lora_core ...`: see lora_core.runner."""

import sys

from lora_core.runner import main

if __name__ == "__main__":
    sys.exit(main())
