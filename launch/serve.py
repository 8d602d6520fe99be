"""`python -m launch.serve`: the command over prep.serving (shim while the library split lands)."""
import sys

from prep.serving import main

if __name__ == "__main__":
    sys.exit(main())
