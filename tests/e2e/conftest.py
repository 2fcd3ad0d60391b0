# Makes the shared module (shardpush_e2e.py, next to this file) importable by the test files,
# whatever pytest's import mode.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
