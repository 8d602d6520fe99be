"""`python -m launch.records`: the command over prep.records (shim while the library split lands)."""
import sys

from prep.records import main

if __name__ == "__main__":
    sys.exit(main())
