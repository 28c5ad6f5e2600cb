"""``python -m service.auth new-token CALLER MODELS``: alias of :mod:`service.security.auth`'s CLI."""

import sys

from service.security.auth import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
