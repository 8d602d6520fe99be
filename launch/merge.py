"""`python -m launch.merge`: the command over custom_losses.merge (shim while the library split lands)."""
import sys

from custom_losses.merge import main

if __name__ == "__main__":
    sys.exit(main())
