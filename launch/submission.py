"""`python -m launch.submission`: the command over prep.submission (shim while the library split lands)."""
import sys

from prep.submission import main

if __name__ == "__main__":
    sys.exit(main())
