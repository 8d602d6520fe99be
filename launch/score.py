"""`python -m launch.score`: the command over prep.score (shim while the library split lands)."""
import sys

from prep.score import main

if __name__ == "__main__":
    sys.exit(main())
