"""``python -m service.client``: the same CLI as ``python -m service.client``."""

import sys

from medseg_client.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
