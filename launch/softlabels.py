"""`python -m launch.softlabels`: the command over prep.softlabels (shim while the library split lands)."""
import sys

from prep.softlabels import main

if __name__ == "__main__":
    sys.exit(main())
