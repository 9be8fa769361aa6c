"""Multi-process tests: every launch is bounded by a wall-clock timeout and a short process-group timeout."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
