"""``python -m icsd.chat_server``: the development chat server, which lives in :mod:`icsd.testing.chat_server`."""
from icsd.testing.chat_server import *  # noqa: F403
from icsd.testing.chat_server import main

if __name__ == "__main__":
    main()
