"""`python -m lora_core ...`: see lora_core.child_process."""

import sys

from lora_core.child_process import main

if __name__ == "__main__":
    sys.exit(main())
