"""`python -m launch.predict`: the command over prep.predict (shim while the library split lands)."""
import sys

from prep.predict import main

if __name__ == "__main__":
    sys.exit(main())
