"""pytest set-up only. The shared helpers live in ``tests/helpers.py``: this file's presence puts
``tests/`` on ``sys.path``, so every test module can ``from helpers import ...``."""
