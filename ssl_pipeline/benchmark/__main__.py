import sys

from ssl_pipeline.benchmark.cli import main

sys.exit(main())
