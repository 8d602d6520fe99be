"""`python -m launch.estimate_memory`: the command over custom_losses.memory (shim while the library split lands)."""
import sys

from custom_losses.memory import main

if __name__ == "__main__":
    sys.exit(main())
