"""`python -m launch.distill`: the command over custom_losses.distill (shim while the library split lands)."""
import sys

from custom_losses.distill import main

if __name__ == "__main__":
    sys.exit(main())
