"""`python -m launch.teacher`: the command over prep.teacher (shim while the library split lands)."""
import sys

from prep.teacher import main

if __name__ == "__main__":
    sys.exit(main())
