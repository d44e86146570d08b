"""python -m llmfast.bench: see llmfast/bench/__init__.py."""
import sys

from . import main

sys.exit(main())
