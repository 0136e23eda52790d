import os
import sys

# Tests import helpers (tests/hf_models.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
