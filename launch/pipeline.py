"""`python -m launch.pipeline`: the command over prep.pipeline (shim while the library split lands)."""
import sys

from prep.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
