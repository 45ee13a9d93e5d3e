"""``python -m fcmae.export`` is ``fcmae-export``."""
import sys

from .exporter import main

sys.exit(main())
