"""`python -m goosebit_reflash.serve HOST PORT`: gooseBit on HOST:PORT with its database tables made
first when they are missing (a new SQLite file, as in the tests), settings from GOOSEBIT_* as usual.

A production server migrates its database with gooseBit's own `aerich upgrade` instead.
"""

from __future__ import annotations

import asyncio
import sys


async def _schema() -> None:
    from tortoise import Tortoise

    from goosebit.db.config import TORTOISE_CONF

    await Tortoise.init(config=TORTOISE_CONF)
    try:
        await Tortoise.generate_schemas(safe=True)
    finally:
        await Tortoise.close_connections()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m goosebit_reflash.serve HOST PORT", file=sys.stderr)
        return 2
    import uvicorn

    asyncio.run(_schema())
    from goosebit import app

    uvicorn.run(app, host=argv[0], port=int(argv[1]), log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
