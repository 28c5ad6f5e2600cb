"""``python -m service.client``: an alias of ``python -m medseg_client`` (the same CLI)."""

import sys

from medseg_client.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
