"""``python -m onex_export.cli``."""
from . import main

main()
