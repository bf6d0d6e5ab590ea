import sys

from layerwatch.cli.main import main

sys.exit(main())
