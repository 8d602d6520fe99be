"""`python -m launch.tiny_model`: the command over prep.tiny_model (shim while the library split lands)."""
import sys

from prep.tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
