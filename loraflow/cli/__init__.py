"""The command line (`loraflow`: main.py) and `loraflow cache` (cache.py)."""
