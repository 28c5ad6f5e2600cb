"""``python -m service``: run the gateway (flags and MEDSEG_* environment, see --help)."""

from __future__ import annotations

import asyncio
import logging
import sys

from service.server import serve
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
